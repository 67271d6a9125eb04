"""`AudioVideoGenerationPipeline`: load a trained model once, generate clips in four modes.

  from avgen.sample import AudioVideoGenerationPipeline
  pipe = AudioVideoGenerationPipeline.from_pretrained("/path/to/workdir", dtype="bfloat16")
  out = pipe(prompt="a red circle bounces", num_inference_steps=25, guidance_scale=3.0, seed=0)
  out.save("out.mp4")          # H.264 + AAC; "out.wav" writes the audio alone
  out.video, out.audio          # uint8 [T, H, W, 3], float32 [S]

Modes: text_to_audio_video (default); audio_to_video (audio_path= or audio=: the given sound is
returned sample for sample and a video is made for it); video_to_audio (video_path= or video=);
edit (both, plus strength: the share of the noise schedule to re-run, as in SDEdit).

JAX has no `.to(device)`: the weights are placed on the pipeline's `devices` (default: every
local device; replicated), and a batch of prompts is split across them in `shard_map` (each
device samples its own rows; no communication). A batch of B rows runs on min(B, devices)
devices and is padded to a multiple of that with copies of its last row, whose outputs are
dropped.

Compile cache: one XLA program per (frame shape, mode, sampler, steps to run, rows, devices).
Prompts, negative prompts, seeds, guidance scales and the conditioning inputs are arguments, so
changing them never recompiles; nor does a new edit strength that runs the same number of steps.
Programs live as long as the pipeline; `compile_cache_dir` also keeps them on disk (JAX's
persistent compilation cache, a process-wide setting) for the next process. JAX writes only
programs whose compile took at least `jax_persistent_cache_min_compile_time_secs` (1 s by
default), and keeps the first directory it opened for the rest of the process.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avgen import config as config_lib
from avgen.sample import inputs as inputs_lib
from avgen.sample import sampling
from avgen.sample.generate import Clip

_log = logging.getLogger(__name__)

MODES = sampling.MODES
DEFAULT_STRENGTH = 0.6
_ROWS = P("batch")


@dataclasses.dataclass
class GenerationOutput(Clip):
  """One generated clip: `.video` uint8 [T, H, W, 3], `.audio` float32 [S], `.save(path)`.

  `notes` lists what was done to the conditioning inputs (resampled, cropped, padded).
  """
  mode: str = "text_to_audio_video"
  seed: int = 0
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def duration(self) -> float:
    return len(self.video) / self.fps

  def spectrogram(self, **kwargs) -> np.ndarray:
    """A mel spectrogram picture of the audio, uint8 [H, W, 3] (visualize.waveform_spectrogram)."""
    from avgen.sample import visualize  # pylint: disable=g-import-not-at-top
    return visualize.waveform_spectrogram(self.audio, self.sample_rate, **kwargs)

  def to_html(self, scale: int | None = None) -> str:
    """An HTML <video> element with the mp4 (picture and sound) embedded, for notebooks."""
    scale = scale or max(1, 256 // self.video.shape[2])
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "clip.mp4")
      self.save(path, scale=scale)
      with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<video controls loop width="{self.video.shape[2] * scale}" '
            f'src="data:video/mp4;base64,{data}"></video>')

  def _repr_html_(self) -> str:
    return self.to_html()


@dataclasses.dataclass
class Request:
  """One row of a batch: a prompt and its own options (None: the call's or config's default)."""
  prompt: str = ""
  negative_prompt: str | None = None
  seed: int = 0
  guidance_video: float | None = None
  guidance_audio: float | None = None
  audio: Any = None  # path, or float array [S] / [S, C] with audio_sample_rate
  audio_sample_rate: float | None = None
  video: Any = None  # path, or uint8 array [T, H, W, 3] with video_fps
  video_fps: float | None = None


@dataclasses.dataclass(frozen=True)
class _Variant:
  """The model built for one clip shape (the parameters fit every shape)."""
  config: ml_collections.ConfigDict
  graphdef: Any
  rest: Any
  video_shape: tuple[int, ...]
  audio_shape: tuple[int, ...]
  num_samples: int


def resolve_checkpoint(source: str | os.PathLike) -> str:
  """A training workdir (holding checkpoints/) for a local path or a hub id 'owner/name[/sub]'.

  A hub repo holds a workdir's `checkpoints/` folder (orbax); only that folder is downloaded.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if os.path.isdir(path):
    if os.path.basename(path) == "checkpoints" and not os.path.isdir(
        os.path.join(path, "checkpoints")):
      return os.path.dirname(path)
    return path
  from avgen.pretrained import hub  # pylint: disable=g-import-not-at-top
  parsed = hub.parse_hub_id(os.fspath(source))
  if parsed is None or os.path.exists(path):
    raise FileNotFoundError(f"from_pretrained: {os.fspath(source)!r} is neither a directory (a "
                            "training workdir) nor a hub id 'owner/name[/subfolder][@revision]'")
  repo_id, subfolder, revision = parsed
  pattern = f"{subfolder}/checkpoints/*" if subfolder else "checkpoints/*"
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    root = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=[pattern])
  except Exception as e:  # network, auth, missing repo: one message with the way out.
    raise RuntimeError(
        f"from_pretrained: {os.fspath(source)!r} is not a local directory, and downloading hub "
        f"repo {repo_id!r} (revision {revision or 'main'}) failed: {type(e).__name__}: {e}. "
        "Download it elsewhere (`huggingface-cli download`) and pass the directory.") from e
  workdir = os.path.join(root, subfolder) if subfolder else root
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"from_pretrained: hub repo {repo_id!r} has no "
                            f"{pattern[:-2]} folder")
  return workdir


def _dtype_name(dtype) -> str:
  name = jnp.dtype(dtype).name
  if name not in config_lib.DTYPES:
    raise ValueError(f"dtype: must be one of {config_lib.DTYPES}, got {name!r}")
  return name


class AudioVideoGenerationPipeline:
  """Generation from a trained avgen model; see the module docstring for modes and caching."""

  def __init__(self, config: ml_collections.ConfigDict, generator, params, *, dtype=None,
               attention_impl: str | None = None, vae_frames_per_chunk: int | None = None,
               vocoder_chunk_frames: int | None = None,
               devices: Sequence[jax.Device] | None = None,
               compiler_options: dict[str, Any] | None = None):
    """Wraps a loaded `Generator` (see `from_pretrained`); options as in `from_pretrained`."""
    self.generator = generator
    self.objective = generator.objective
    self.tokenizer = generator.tokenizer
    config = ml_collections.ConfigDict(config.to_dict())
    rebuild = False
    # A frozen text encoder's weights (None for the byte encoder, which is part of `params`).
    text_params = getattr(generator, "text_params", None)
    if dtype is not None:
      name = _dtype_name(dtype)
      rebuild |= config.model.dtype != name
      config.model.dtype = name
      cast = lambda x: x.astype(name) if jnp.issubdtype(x.dtype, jnp.floating) else x
      # One program for the whole tree; leaf by leaf would compile one convert per shape.
      params, text_params = jax.jit(lambda t: jax.tree.map(cast, t))((params, text_params))
    if attention_impl is not None:
      from avgen.kernels import IMPLS  # pylint: disable=g-import-not-at-top
      if attention_impl not in IMPLS:
        raise ValueError(f"attention_impl: must be one of {IMPLS}, got {attention_impl!r}")
      rebuild |= config.model.attention_impl != attention_impl
      config.model.attention_impl = attention_impl
    # Inference needs no activation checkpointing; remat only costs time here.
    rebuild |= config.model.remat != "none"
    config.model.remat = "none"
    codec_options = {"vae_frames_per_chunk": vae_frames_per_chunk,
                     "vocoder_chunk_frames": vocoder_chunk_frames}
    for name, value in codec_options.items():
      if value is not None:
        if isinstance(value, bool) or int(value) != value or value < 1:
          raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        config.latent[name] = int(value)
    self.config = config
    self.params = params
    self.text_params = text_params
    self._rebuild = rebuild
    self._rebuild_codecs(codec_options)
    self.devices = list(devices) if devices is not None else jax.local_devices()
    if not self.devices:
      raise ValueError("devices: need at least one device")
    self._variants: dict[tuple, _Variant] = {}
    self._programs: dict[tuple, Any] = {}
    self._executables: dict[tuple, Any] = {}
    self.compiler_options = dict(compiler_options or {})
    self._placed: tuple[tuple, Any] | None = None

  @classmethod
  def from_pretrained(cls, source: str | os.PathLike, *, dtype=None, step: int | None = None,
                      use_ema: bool = True, attention_impl: str | None = None,
                      vae_frames_per_chunk: int | None = None,
                      vocoder_chunk_frames: int | None = None,
                      devices: Sequence[jax.Device] | None = None,
                      compile_cache_dir: str | None = None,
                      compiler_options: dict[str, Any] | None = None
                      ) -> "AudioVideoGenerationPipeline":
    """Loads a checkpoint: a training workdir, its checkpoints/ folder, or a hub id.

    Args:
      source: local directory or hub id ('owner/name[/subfolder][@revision]') holding a
        workdir's `checkpoints/`. The VAE / vocoder / text-encoder weights come from the
        sources named in the checkpoint's config (`latent.video_source`, ...), converted once
        into avgen's pretrained cache.
      dtype: weights and compute dtype ("float32", "bfloat16", "float16"); None keeps the
        checkpoint config's compute dtype and float32 weights. bfloat16 halves weight memory.
      step: checkpoint step (default: the latest).
      use_ema: the EMA weights (default) or the raw training weights.
      attention_impl: attention backend ("auto", "xla", "cudnn", "pallas").
      vae_frames_per_chunk: frames per SD-VAE decoder call (VAE slicing: lower peak memory).
      vocoder_chunk_frames: mel frames per vocoder call.
      devices: devices to place the weights on and split batches over (default: all local).
      compile_cache_dir: directory for JAX's persistent compilation cache (process-wide; see
        the module docstring for what JAX writes there).
      compiler_options: XLA options for the sampling programs, e.g.
        {"xla_backend_optimization_level": 0} compiles about twice as fast on a CPU.
    """
    from avgen.sample.load import load_generator  # pylint: disable=g-import-not-at-top
    if compile_cache_dir:
      path = os.path.abspath(compile_cache_dir)
      active = jax.config.jax_compilation_cache_dir
      if active and os.path.abspath(active) != path:
        # JAX opens its cache once per process, at the first compile after a directory is set.
        _log.warning("compile_cache_dir=%r: this process already set JAX's compilation cache "
                     "to %r; once JAX has compiled with it, it keeps using that directory",
                     path, active)
      os.makedirs(path, exist_ok=True)
      jax.config.update("jax_compilation_cache_dir", path)
    workdir = resolve_checkpoint(source)
    config, generator, params = load_generator(workdir, step=step, use_ema=use_ema)
    return cls(config, generator, params, dtype=dtype, attention_impl=attention_impl,
               vae_frames_per_chunk=vae_frames_per_chunk,
               vocoder_chunk_frames=vocoder_chunk_frames, devices=devices,
               compiler_options=compiler_options)

  # ---------------------------------------------------------------------------------------------
  # Options and shapes

  def _rebuild_codecs(self, options: dict[str, int | None]) -> None:
    """Rebuilds a pretrained codec whose chunking option was set (its weights load again)."""
    from avgen.models import autoencoders  # pylint: disable=g-import-not-at-top
    if options["vae_frames_per_chunk"] is not None and self.config.latent.video != "pixels":
      self.generator.video_codec = autoencoders.build_video_codec(self.config)
    if (options["vocoder_chunk_frames"] is not None
        and self.config.latent.vocoder != "griffin_lim"):
      self.generator.audio_codec = autoencoders.build_audio_codec(self.config)

  @property
  def trained_shape(self) -> dict[str, Any]:
    d = self.config.data
    return dict(num_frames=d.num_frames, height=d.height, width=d.width, fps=d.fps,
                audio_duration=d.audio_seconds, sample_rate=d.sample_rate)

  def _variant(self, num_frames=None, height=None, width=None, fps=None,
               audio_duration=None) -> _Variant:
    d = self.config.data
    if fps is not None and abs(float(fps) - d.fps) > 1e-9:
      raise ValueError(f"fps={fps}: this model was trained at {d.fps:g} fps; its time axis "
                       f"(and the audio's alignment to frames) is in those units. Generate at "
                       f"{d.fps:g} fps and resample the mp4 if you need another rate")
    t = d.num_frames if num_frames is None else num_frames
    h = d.height if height is None else height
    w = d.width if width is None else width
    for name, value in (("num_frames", t), ("height", h), ("width", w)):
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    t, h, w = int(t), int(h), int(w)
    seconds = t / d.fps
    if audio_duration is not None and abs(float(audio_duration) - seconds) > 0.5 / d.sample_rate:
      raise ValueError(f"audio_duration={audio_duration}: the model makes audio and video of one "
                       f"length, num_frames / fps = {t}/{d.fps:g} = {seconds:g} s; pass "
                       f"audio_duration={seconds:g} or change num_frames")
    key = (t, h, w)
    if key in self._variants:
      return self._variants[key]
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.data.num_frames, config.data.height, config.data.width = t, h, w
    config.data.audio_seconds = seconds
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as e:
      raise ValueError(f"num_frames={t}, height={h}, width={w}: this model cannot make clips of "
                       f"that shape: {e}") from None
    if key == (d.num_frames, d.height, d.width) and not self._rebuild:
      graphdef, rest = self.generator.graphdef, self.generator.rest
    else:
      if key != (d.num_frames, d.height, d.width):
        _log.warning("generating %d frames of %dx%d: the model was trained on %d frames of "
                     "%dx%d; other shapes extend its positions beyond what it saw", t, w, h,
                     d.num_frames, d.width, d.height)
      graphdef, rest = self._build(config)
    shapes = config_lib.latent_shapes(config)
    variant = _Variant(config, graphdef, rest, tuple(shapes["video"]), tuple(shapes["audio"]),
                       int(round(seconds * d.sample_rate)))
    self._variants[key] = variant
    return variant

  def _build(self, config):
    """The graph of the model for `config`, checked against the loaded parameters' shapes."""
    from avgen import models  # pylint: disable=g-import-not-at-top
    from avgen.train import state as state_lib  # pylint: disable=g-import-not-at-top
    abstract = nnx.eval_shape(lambda: models.build_model(config, nnx.Rngs(0)))
    graphdef, params, rest = state_lib.split_model(abstract)
    shapes = lambda tree: {jax.tree_util.keystr(path): tuple(x.shape)
                           for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    ours, theirs = shapes(params), shapes(self.params)
    if ours != theirs:
      differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
      raise ValueError("the model built for this shape/option needs parameters the checkpoint "
                       f"does not have (or of other shapes): {differ[:5]}; use the trained shape")
    return graphdef, rest

  # ---------------------------------------------------------------------------------------------
  # The compiled program

  @property
  def weights(self) -> tuple[Any, Any]:
    """(DiT parameters, frozen text-encoder parameters or None): the programs' first argument."""
    return self.params, self.text_params

  def _model_fn(self, variant: _Variant, params):
    model = nnx.merge(variant.graphdef, params, variant.rest)

    def model_fn(video_t, audio_t, t_video, t_audio, text_cond):
      out = model(video_t, audio_t, t_video, t_audio, **text_cond)
      return out.video, out.audio
    return model_fn

  def _text_condition(self, text_params, tokens) -> dict:
    """The model's text arguments for (ids, mask): the ids themselves for the byte encoder, or
    the frozen encoder's states, computed once per call rather than in every step."""
    ids, mask = tokens
    encode = getattr(self.generator, "text_inputs", None)
    if encode is None:
      return dict(text_ids=ids, text_mask=mask)
    return encode(text_params, ids, mask)

  def text_inputs(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask [B, L] for `prompts`; warns about prompts cut at the length limit."""
    ids, mask = self.tokenizer(list(prompts))
    from avgen.models.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
    for prompt, row, row_mask in zip(prompts, ids, np.asarray(mask)):
      if isinstance(self.tokenizer, ByteTokenizer):
        if self.tokenizer.decode(row) != prompt:
          _log.warning("prompt %r is longer than the model's %d tokens and was cut to %r",
                       prompt, ids.shape[1], self.tokenizer.decode(row))
      elif row_mask.all():
        _log.warning("prompt %r fills all %d tokens of the text encoder and may have been cut",
                     prompt, ids.shape[1])
    return ids, mask

  def _mesh(self, count: int) -> Mesh:
    return Mesh(np.array(self.devices[:count]), ("batch",))

  def _params_on(self, mesh: Mesh):
    key = tuple(d.id for d in mesh.devices.flat)
    if self._placed is None or self._placed[0] != key:
      self._placed = None  # drop the old copy before placing the new one
      self._placed = (key, jax.device_put(self.weights, NamedSharding(mesh, P())))
    return self._placed[1]

  def sampling_fn(self, mode: str, sampler: str, variant: _Variant | None = None):
    """The pure sampling function `(weights, text, negative, keys, video_x0, audio_x0,
    scale_video, scale_audio, times) -> (video, audio)`: weights as `self.weights`, text and
    negative as (ids, mask) token arrays [B, L]; the rest as in `sampling.sample_rows`."""
    variant = variant or self._variant()
    objective = self.objective

    def rows(weights, text, negative, keys, video_x0, audio_x0, scale_video, scale_audio, times):
      params, text_params = weights
      return sampling.sample_rows(
          self._model_fn(variant, params), objective, self._text_condition(text_params, text),
          self._text_condition(text_params, negative), keys, video_x0, audio_x0, scale_video,
          scale_audio, times, mode=mode, sampler=sampler, video_shape=variant.video_shape,
          audio_shape=variant.audio_shape)
    return rows

  def denoiser_fn(self, variant: _Variant | None = None):
    """The pure guided model call `(weights, text, negative, video_t, audio_t, t_video,
    t_audio, scale_video, scale_audio) -> (video_out, audio_out)` (`sampling.guided_step`)."""
    variant = variant or self._variant()

    def step(weights, text, negative, video_t, audio_t, t_video, t_audio, scale_video,
             scale_audio):
      params, text_params = weights
      return sampling.guided_step(
          self._model_fn(variant, params), self._text_condition(text_params, text),
          self._text_condition(text_params, negative), video_t, audio_t, t_video, t_audio,
          scale_video, scale_audio)
    return step

  def _program(self, variant: _Variant, mode: str, sampler: str, steps: int, mesh: Mesh) -> tuple:
    """The key of the jitted sampling program for these options (built on first use)."""
    key = ((variant.video_shape, variant.audio_shape), mode, sampler, steps,
           tuple(d.id for d in mesh.devices.flat))
    if key not in self._programs:
      specs = (P(), _ROWS, _ROWS, _ROWS, _ROWS, _ROWS, _ROWS, _ROWS, P())
      self._programs[key] = jax.jit(jax.shard_map(
          self.sampling_fn(mode, sampler, variant), mesh=mesh, in_specs=specs,
          out_specs=(_ROWS, _ROWS), check_vma=False))
    return key

  def _executable(self, program_key: tuple, rows: int, args: tuple):
    """The compiled program for `args` (compiled ahead of time once per signature).

    Keeping the executables here, rather than in jit's own cache, makes the cache explicit:
    `compiled_programs` counts them and `memory_report` reads XLA's memory analysis of each.
    """
    signature = (program_key, rows)
    if signature not in self._executables:
      lowered = self._programs[program_key].lower(*args)
      self._executables[signature] = lowered.compile(self.compiler_options or None)
    return self._executables[signature]

  @property
  def compiled_programs(self) -> int:
    """Programs compiled so far, one per (shape, mode, sampler, steps, devices, rows)."""
    return len(self._executables)

  def memory_report(self) -> list[dict[str, Any]]:
    """XLA's memory analysis (bytes per device) of every program compiled so far."""
    out = []
    for (key, rows), executable in self._executables.items():
      (video_shape, _), mode, sampler, steps, devices = key
      out.append(dict(mode=mode, sampler=sampler, steps=steps, rows=rows,
                      devices=len(devices), video_latent=video_shape,
                      **_memory(executable, self.weight_bytes)))
    return out

  # ---------------------------------------------------------------------------------------------
  # Generation

  def resolve_options(self, mode, num_inference_steps=None, sampler=None, strength=None):
    """(steps, sampler, times) for a call: defaults filled in from the config, all checked."""
    if mode not in MODES:
      raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
    s = self.config.sample
    steps = s.num_steps if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
      raise ValueError(f"num_inference_steps: must be an integer >= 1, got {steps!r}")
    sampler = sampler or s.sampler
    from avgen.diffusion import samplers as samplers_lib  # pylint: disable=g-import-not-at-top
    if samplers_lib.SAMPLERS.get(sampler) != self.objective.name:
      fits = [k for k, v in samplers_lib.SAMPLERS.items() if v == self.objective.name]
      raise ValueError(f"sampler: {sampler!r} does not fit this model's "
                       f"{self.objective.name!r} objective; use one of {fits}")
    if mode != "edit" and strength is not None:
      raise ValueError(f"strength: only mode='edit' takes it (mode={mode!r})")
    if mode == "edit":
      strength = DEFAULT_STRENGTH if strength is None else float(strength)
    times = sampling.schedule(self.objective, int(steps), strength=strength)
    return int(steps), sampler, times

  def _conditions(self, requests: Sequence[Request], mode: str, variant: _Variant):
    """Kept inputs (what the output returns as given) and their latents, per row."""
    d = variant.config.data
    wants_audio = mode in ("audio_to_video", "edit")
    wants_video = mode in ("video_to_audio", "edit")
    kept_audio, kept_video, notes = [], [], []
    for i, r in enumerate(requests):
      row_notes = []
      for name, wanted, value in (("audio", wants_audio, r.audio), ("video", wants_video, r.video)):
        if wanted and value is None:
          raise ValueError(f"mode={mode!r} needs {name}_path= (or {name}=) for row {i}")
        if not wanted and value is not None:
          raise ValueError(f"{name}_path/{name}: mode={mode!r} takes no {name} input (row {i}); "
                           f"use mode='{'audio_to_video' if name == 'audio' else 'video_to_audio'}'"
                           " or 'edit'")
      if wants_audio:
        audio, n = inputs_lib.load_audio(r.audio, sample_rate=d.sample_rate,
                                         num_samples=variant.num_samples,
                                         source_rate=r.audio_sample_rate)
        kept_audio.append(audio)
        row_notes += n
      if wants_video:
        video, n = inputs_lib.load_video(r.video, fps=d.fps, height=d.height, width=d.width,
                                         num_frames=d.num_frames, source_fps=r.video_fps)
        kept_video.append(video)
        row_notes += n
      notes.append(row_notes)
    audio_x0 = video_x0 = None
    if kept_audio:
      audio_x0 = np.stack([self.generator.audio_codec.encode(a) for a in kept_audio])
      self._check_latent("audio", audio_x0, variant.audio_shape)
    if kept_video:
      video_x0 = np.stack([self.generator.video_codec.encode(v) for v in kept_video])
      self._check_latent("video", video_x0, variant.video_shape)
    return kept_audio or None, kept_video or None, video_x0, audio_x0, notes

  @staticmethod
  def _check_latent(name, latent, shape):
    if latent.shape[1:] != tuple(shape):
      raise ValueError(f"{name}: the codec made a latent of shape {latent.shape[1:]}, the model "
                       f"needs {tuple(shape)}")

  def sample_latents(self, requests: Sequence[Request], *, mode: str = "text_to_audio_video",
                     num_inference_steps: int | None = None, sampler: str | None = None,
                     strength: float | None = None, guidance_scale: float | None = None,
                     num_frames: int | None = None, height: int | None = None,
                     width: int | None = None, fps: float | None = None,
                     audio_duration: float | None = None, pad_to: int | None = None):
    """Samples latents for `requests` (all with the same mode and options).

    Returns (video [B, T, h, w, C], audio [B, N, n_mels], split over the devices as they ran),
    and per row the kept audio / video inputs and the notes about them.
    """
    requests = list(requests)
    if not requests:
      raise ValueError("requests: need at least one")
    steps, sampler, times = self.resolve_options(mode, num_inference_steps, sampler, strength)
    variant = self._variant(num_frames, height, width, fps, audio_duration)
    s = self.config.sample

    def scale(row_value, modality_default):
      value = row_value if row_value is not None else (
          guidance_scale if guidance_scale is not None else modality_default)
      if not np.isfinite(float(value)):
        raise ValueError(f"guidance scale: must be finite, got {value!r}")
      return float(value)

    scale_video = np.array([scale(r.guidance_video, s.guidance_video) for r in requests],
                           np.float32)
    scale_audio = np.array([scale(r.guidance_audio, s.guidance_audio) for r in requests],
                           np.float32)
    for r in requests:
      if isinstance(r.seed, bool) or int(r.seed) != r.seed:
        raise ValueError(f"seed: must be an integer, got {r.seed!r}")
    kept_audio, kept_video, video_x0, audio_x0, notes = self._conditions(requests, mode, variant)
    text = self.text_inputs([r.prompt or "" for r in requests])
    negative = self.text_inputs([s.negative_prompt if r.negative_prompt is None
                                 else r.negative_prompt for r in requests])
    keys = sampling.row_keys([r.seed for r in requests])

    b = len(requests)
    rows = max(b, pad_to or 0)
    count = min(rows, len(self.devices))
    rows = -(-rows // count) * count

    def pad(x):  # copies of the last row; their outputs are dropped below
      return np.concatenate([x, np.repeat(x[-1:], rows - b, axis=0)]) if rows > b else x

    args = jax.tree.map(pad, (text, negative, keys, video_x0, audio_x0, scale_video,
                              scale_audio))
    mesh = self._mesh(count)
    key = self._program(variant, mode, sampler, len(times) - 1, mesh)
    args = (self._params_on(mesh), *jax.device_put(args, NamedSharding(mesh, _ROWS)),
            jax.device_put(jnp.asarray(times), NamedSharding(mesh, P())))
    video, audio = self._executable(key, rows, args)(*args)
    if rows > b:
      video, audio = video[:b], audio[:b]
    return video, audio, kept_audio, kept_video, notes

  def generate(self, requests: Sequence[Request], *, mode: str = "text_to_audio_video",
               **options) -> list[GenerationOutput]:
    """Clips for `requests` (one compiled program for all rows; options as `sample_latents`)."""
    requests = list(requests)
    video, audio, kept_audio, kept_video, notes = self.sample_latents(requests, mode=mode,
                                                                      **options)
    clips = self.generator.decode(np.asarray(video), np.asarray(audio),
                                  [r.prompt or "" for r in requests])
    outputs = []
    for i, (clip, r) in enumerate(zip(clips, requests)):
      out = GenerationOutput(video=clip.video, audio=clip.audio, fps=clip.fps,
                             sample_rate=clip.sample_rate, prompt=clip.prompt, mode=mode,
                             seed=int(r.seed), notes=notes[i])
      # A given input comes back as given, not as its latent's decoding.
      if mode == "audio_to_video":
        out.audio = kept_audio[i]
      elif mode == "video_to_audio":
        out.video = kept_video[i]
      outputs.append(out)
    return outputs

  def __call__(self, prompt: str | Sequence[str] = "", *, negative_prompt: str | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               guidance_scale_video: float | None = None,
               guidance_scale_audio: float | None = None, height: int | None = None,
               width: int | None = None, num_frames: int | None = None, fps: float | None = None,
               audio_duration: float | None = None, seed: int | Sequence[int] = 0,
               mode: str = "text_to_audio_video", audio_path: str | None = None,
               video_path: str | None = None, audio: np.ndarray | None = None,
               audio_sample_rate: float | None = None, video: np.ndarray | None = None,
               video_fps: float | None = None, strength: float | None = None,
               sampler: str | None = None, output_path: str | None = None):
    """Generates one clip (a str prompt) or one per prompt (a list); see the module docstring.

    guidance_scale sets both modalities' classifier-free guidance; guidance_scale_video /
    guidance_scale_audio override it per modality. With a list of prompts, row i uses seed + i
    (or seed[i] when a list is given). height / width / num_frames default to the trained shape;
    fps must be the trained one and audio_duration, if given, num_frames / fps. output_path
    saves the clip (a single prompt only): .mp4 (H.264 + AAC) or .wav.
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts:
      raise ValueError("prompt: need at least one prompt")
    if audio_path is not None and audio is not None:
      raise ValueError("audio_path and audio: give one of them")
    if video_path is not None and video is not None:
      raise ValueError("video_path and video: give one of them")
    for rate_name, rate, array_name, array, path in (
        ("audio_sample_rate", audio_sample_rate, "audio", audio, audio_path),
        ("video_fps", video_fps, "video", video, video_path)):
      if rate is not None and array is None:
        raise ValueError(f"{rate_name}={rate!r}: only with {array_name}= (an array); "
                         + (f"the rate of {array_name}_path is read from the file"
                            if path is not None else f"no {array_name} was given"))
    if isinstance(seed, (list, tuple)):
      if len(seed) != len(prompts):
        raise ValueError(f"seed: {len(seed)} seeds for {len(prompts)} prompts")
      seeds = list(seed)
    else:
      seeds = [seed + i for i in range(len(prompts))]
    for name, path in (("audio_path", audio_path), ("video_path", video_path)):
      if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: no such file: {path!r}")
    if output_path is not None and not single:
      raise ValueError("output_path: only for a single prompt; save each output yourself")
    requests = [Request(prompt=p, negative_prompt=negative_prompt, seed=s,
                        guidance_video=guidance_scale_video, guidance_audio=guidance_scale_audio,
                        audio=audio_path if audio_path is not None else audio,
                        audio_sample_rate=audio_sample_rate,
                        video=video_path if video_path is not None else video,
                        video_fps=video_fps)
                for p, s in zip(prompts, seeds)]
    outputs = self.generate(requests, mode=mode, num_inference_steps=num_inference_steps,
                            sampler=sampler, strength=strength, guidance_scale=guidance_scale,
                            num_frames=num_frames, height=height, width=width, fps=fps,
                            audio_duration=audio_duration)
    if output_path is not None:
      outputs[0].save(output_path)
    return outputs[0] if single else outputs

  # ---------------------------------------------------------------------------------------------
  # Memory

  @property
  def weight_bytes(self) -> int:
    """Bytes of the weights (DiT and frozen text encoder; each device holds a copy)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.weights)))

  def memory_estimate(self, batch_size: int = 1, *, mode: str = "text_to_audio_video",
                      num_inference_steps: int | None = None, sampler: str | None = None,
                      strength: float | None = None) -> dict[str, int]:
    """XLA's own account of one device's memory for a sampling call (compiles, runs nothing).

    The program is kept, so a later call of this shape does not compile again. Returns bytes:
    weights (all of them), arguments (the buffers the program reads: weights it uses, inputs),
    outputs, temporaries (activations, sampler state) and peak_estimate = arguments + outputs
    + temporaries. The VAE decoder and the vocoder run afterwards and are not included.
    """
    _, sampler, times = self.resolve_options(mode, num_inference_steps, sampler, strength)
    variant = self._variant()
    count = min(batch_size, len(self.devices))
    rows = -(-batch_size // count) * count
    mesh = self._mesh(count)
    key = self._program(variant, mode, sampler, len(times) - 1, mesh)
    spec = lambda shape, dtype, sharded=True: jax.ShapeDtypeStruct(
        shape, dtype, sharding=NamedSharding(mesh, _ROWS if sharded else P()))
    text = jax.tree.map(lambda x: spec((rows,) + x.shape[1:], x.dtype), self.text_inputs([""]))
    video = spec((rows,) + variant.video_shape, jnp.float32)
    audio = spec((rows,) + variant.audio_shape, jnp.float32)
    params = jax.tree.map(lambda x: spec(x.shape, x.dtype, sharded=False), self.weights)
    args = (params, text, text, spec((rows, 2), jnp.uint32),
            video if mode in ("video_to_audio", "edit") else None,
            audio if mode in ("audio_to_video", "edit") else None,
            spec((rows,), jnp.float32), spec((rows,), jnp.float32),
            spec(times.shape, jnp.float32, sharded=False))
    return _memory(self._executable(key, rows, args), self.weight_bytes)


def _memory(executable, weight_bytes: int) -> dict[str, int]:
  stats = executable.memory_analysis()
  out = dict(weights=weight_bytes, arguments=int(stats.argument_size_in_bytes),
             outputs=int(stats.output_size_in_bytes), temporaries=int(stats.temp_size_in_bytes))
  out["peak_estimate"] = out["arguments"] + out["outputs"] + out["temporaries"]
  return out
