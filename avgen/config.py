"""Config checks that run before anything is built or compiled.

Every rule names the field it checks, so `--config.x=y` mistakes fail in a second with a message
saying which field and why, instead of as a shape error deep inside a jitted step.
"""

from __future__ import annotations

import math

import ml_collections

from avgen.diffusion.samplers import SAMPLERS as _SAMPLER_OBJECTIVE
from avgen.kernels import IMPLS

# objective -> the samplers that fit it (one table, kept by the samplers module)
SAMPLERS = {obj: tuple(s for s, o in _SAMPLER_OBJECTIVE.items() if o == obj)
            for obj in sorted(set(_SAMPLER_OBJECTIVE.values()))}
TEXT_ENCODERS = ("byte", "clip_text", "t5_encoder")
VIDEO_LATENTS = ("pixels", "sd_vae")
VOCODERS = ("griffin_lim", "bigvgan", "hifigan")
VOCODER_MELS = ("bridge", "native")  # how a pretrained vocoder reads the latent mel
# model.adaln: each block's AdaLN projection ("per_block", DiT's AdaLN-Zero) or one projection
# per modality shared by the blocks, each adding learned offsets ("single", PixArt-alpha).
ADALN = ("per_block", "single")
# model.remat: what the DiT blocks keep for the backward pass (avgen.models.dit maps each name to
# a jax.checkpoint policy). "none": no remat; "full" / "nothing_saveable": keep only block inputs;
# "dots": matmul outputs without batch dims (weights-only matmuls); "dots_saveable": every matmul;
# "everything_saveable": all (remat in name only); "save_attention_out": the self-attention
# result; "offload_dots": like "dots" but parked in pinned host memory until the backward pass;
# "dots_attention": "dots" plus the attention kernels' outputs and softmax statistics (the
# backward pass then never reruns a long attention's forward; short ones such as the text
# cross-attention are rerun).
REMAT = ("none", "full", "nothing_saveable", "dots", "dots_saveable", "everything_saveable",
         "save_attention_out", "offload_dots", "dots_attention")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "context", "tensor")
# config.mesh.dcn_<axis>: how many slices (TPU multislice) or hosts (GPU nodes) the axis spans;
# the axis is then mesh.<axis> devices per slice times this many slices.
DCN_AXES = tuple(f"dcn_{a}" for a in MESH_AXES)
CONTEXT_PARALLEL = ("ring", "all_to_all")  # avgen.parallel.context_parallel.STRATEGIES


class ConfigError(ValueError):
  """A config field breaks a rule; the message names the field."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def latent_shapes(c: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """Per-example diffusion shapes: video [T, h, w, C], audio mel [N, n_mels]."""
  d = c.data
  down = c.latent.video_downsample
  n_mel_frames = round(d.audio_seconds * d.sample_rate / c.mel.hop_length)
  return {
      "video": (d.num_frames, d.height // down, d.width // down, c.latent.video_channels),
      "audio": (n_mel_frames, c.mel.n_mels),
  }


def dcn_shape(c: ml_collections.ConfigDict) -> dict[str, int]:
  """Across-slice (DCN) factor of each mesh axis; 1 where a config has none (older configs)."""
  sizes = {}
  for a in MESH_AXES:
    s = c.mesh.get(f"dcn_{a}", 1)
    _require(isinstance(s, int) and not isinstance(s, bool) and s >= 1,
             f"config.mesh.dcn_{a}={s!r} must be an int >= 1 (slices or hosts the axis spans)")
    sizes[a] = s
  return sizes


def ici_shape(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Per-slice (ICI) axis sizes: config.mesh.<axis>, a single -1 filled from the devices."""
  dcn = dcn_shape(c)
  slices = math.prod(dcn.values())
  sizes = {a: int(c.mesh[a]) for a in MESH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  _require(len(unknown) <= 1, f"config.mesh: at most one axis may be -1, got {unknown}")
  for a, s in sizes.items():
    _require(s == -1 or s >= 1, f"config.mesh.{a}={s} must be >= 1 or -1")
  dcn_note = "" if slices == 1 else f" (per slice: {num_devices} devices / {slices} DCN slices)"
  _require(num_devices % slices == 0,
           f"config.mesh.dcn_*: {num_devices} devices do not split into "
           f"{' * '.join(str(dcn[a]) for a in MESH_AXES)} = {slices} equal slices")
  per_slice = num_devices // slices
  known = math.prod(s for s in sizes.values() if s != -1)
  if unknown:
    _require(per_slice % known == 0,
             f"config.mesh: {per_slice} devices{dcn_note} are not divisible by the fixed axes' "
             f"product {known}")
    sizes[unknown[0]] = per_slice // known
  if slices == 1:
    _require(math.prod(sizes.values()) == num_devices,
             f"config.mesh: sizes {sizes} multiply to {math.prod(sizes.values())}, "
             f"but there are {num_devices} devices")
  else:
    _require(math.prod(sizes.values()) * slices == num_devices,
             f"config.mesh: per-slice sizes {sizes} (product {math.prod(sizes.values())}) times "
             f"DCN sizes {dcn} (product {slices}) must equal the {num_devices} devices")
  return sizes


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Whole mesh axis sizes: per-slice size times DCN factor (a single -1 filled)."""
  ici, dcn = ici_shape(c, num_devices), dcn_shape(c)
  return {a: ici[a] * dcn[a] for a in MESH_AXES}


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ConfigError naming the first field that breaks a rule."""
  d, m, mo, df, lo, t = c.data, c.mel, c.model, c.diffusion, c.loss, c.train

  # data and time
  _require(d.num_frames >= 1, f"config.data.num_frames={d.num_frames} must be >= 1")
  _require(d.fps > 0, f"config.data.fps={d.fps} must be > 0")
  clip_seconds = d.num_frames / d.fps
  _require(abs(d.audio_seconds - clip_seconds) < 1e-6,
           f"config.data.audio_seconds={d.audio_seconds} must equal data.num_frames / data.fps = "
           f"{d.num_frames}/{d.fps} = {clip_seconds:g}")
  samples = d.audio_seconds * d.sample_rate
  _require(abs(samples - round(samples)) < 1e-6,
           f"config.data.audio_seconds * data.sample_rate = {samples:g} must be a whole number of samples")
  _require(round(samples) % m.hop_length == 0,
           f"config.mel.hop_length={m.hop_length} must divide the clip's {round(samples)} audio samples")
  _require(set(d.modalities) <= {"video", "audio"} and len(d.modalities) >= 1,
           f"config.data.modalities={tuple(d.modalities)} must be a non-empty subset of ('video', 'audio')")
  _require(d.batch_size >= 1, f"config.data.batch_size={d.batch_size} must be >= 1")

  # latent spaces
  _require(c.latent.video in VIDEO_LATENTS, f"config.latent.video={c.latent.video!r} not in {VIDEO_LATENTS}")
  _require(c.latent.vocoder in VOCODERS, f"config.latent.vocoder={c.latent.vocoder!r} not in {VOCODERS}")
  mu_dtype = c.train.get("adam_mu_dtype", "float32")
  _require(mu_dtype in ("float32", "bfloat16"),
           f"config.train.adam_mu_dtype={mu_dtype!r} not in ('float32', 'bfloat16')")
  vocoder_mel = c.latent.get("vocoder_mel", "native")
  _require(vocoder_mel in VOCODER_MELS,
           f"config.latent.vocoder_mel={vocoder_mel!r} not in {VOCODER_MELS}")
  if c.latent.video == "pixels":
    _require(c.latent.video_downsample == 1 and c.latent.video_channels == 3,
             "config.latent.video='pixels' needs latent.video_downsample=1 and latent.video_channels=3")
  down = c.latent.video_downsample
  for name in ("height", "width"):
    _require(d[name] % down == 0,
             f"config.data.{name}={d[name]} must be divisible by latent.video_downsample={down}")
  shapes = latent_shapes(c)
  frames, h, w, _ = shapes["video"]
  n_mel, _ = shapes["audio"]

  # model
  pt, ph, pw = mo.video_patch
  for axis, size, patch in (("frames", frames, pt), ("height", h, ph), ("width", w, pw)):
    _require(patch >= 1 and size % patch == 0,
             f"config.model.video_patch={tuple(mo.video_patch)}: patch {patch} must divide the video "
             f"latent's {axis} {size}")
  _require(mo.audio_patch >= 1 and n_mel % mo.audio_patch == 0,
           f"config.model.audio_patch={mo.audio_patch} must divide the {n_mel} mel frames of a clip")
  _require(mo.width % mo.num_heads == 0,
           f"config.model.num_heads={mo.num_heads} must divide config.model.width={mo.width}")
  head_dim = mo.width // mo.num_heads
  _require(head_dim % 8 == 0,
           f"config.model.width / num_heads = {head_dim} must be a multiple of 8 (3D RoPE sections)")
  context_parallel = mo.get("context_parallel", "ring")  # absent in configs saved before it
  _require(context_parallel in CONTEXT_PARALLEL,
           f"config.model.context_parallel={context_parallel!r} not in {CONTEXT_PARALLEL}")
  _require(mo.get("adaln", "per_block") in ADALN,
           f"config.model.adaln={mo.get('adaln')!r} not in {ADALN}")
  _require(mo.attention_impl in IMPLS, f"config.model.attention_impl={mo.attention_impl!r}: unknown "
           f"attention impl; known: {IMPLS}")
  _require(mo.text_encoder in TEXT_ENCODERS,
           f"config.model.text_encoder={mo.text_encoder!r} not in {TEXT_ENCODERS}")
  if mo.text_encoder == "byte":
    _require(mo.text_width % mo.text_heads == 0,
             f"config.model.text_heads={mo.text_heads} must divide config.model.text_width="
             f"{mo.text_width}")
  for name in ("text_encoder_source", "text_tokenizer_source"):
    _require(isinstance(mo.get(name, ""), str),
             f"config.model.{name}={mo.get(name)!r} must be a string (local dir or hub id; '' for "
             "the default)")
  # Widths and token counts of a frozen encoder are checked against its checkpoint's config
  # (text_encoder.check_frozen_checkpoint): they are not known without reading it.
  _require(mo.remat in REMAT, f"config.model.remat={mo.remat!r} not in {REMAT}")
  _require(mo.dtype in DTYPES and mo.param_dtype in DTYPES,
           f"config.model.dtype={mo.dtype!r} / param_dtype={mo.param_dtype!r} must be in {DTYPES}")
  _require(frames % pt == 0 and mo.align_window % pt == 0 and frames % mo.align_window == 0,
           f"config.model.align_window={mo.align_window} must divide data.num_frames={frames} and be a "
           f"multiple of the temporal patch {pt}")
  windows = frames // mo.align_window
  audio_tokens = n_mel // mo.audio_patch
  _require(audio_tokens % windows == 0,
           f"config.model.align_window={mo.align_window}: the {audio_tokens} audio tokens must split evenly "
           f"into {windows} time windows")

  # diffusion and losses
  _require(df.objective in SAMPLERS, f"config.diffusion.objective={df.objective!r} not in {tuple(SAMPLERS)}")
  _require(c.sample.sampler in SAMPLERS[df.objective],
           f"config.sample.sampler={c.sample.sampler!r} does not fit objective {df.objective!r}; "
           f"use one of {SAMPLERS[df.objective]}")
  _require(df.flow_prediction in ("v", "x0"),
           f"config.diffusion.flow_prediction={df.flow_prediction!r} must be 'v' or 'x0'")
  _require(df.ddpm_schedule in ("cosine", "linear"), f"config.diffusion.ddpm_schedule={df.ddpm_schedule!r}")
  _require(df.ddpm_prediction in ("eps", "v"), f"config.diffusion.ddpm_prediction={df.ddpm_prediction!r}")
  for name in ("share_t_prob", "audio_to_video_prob", "video_to_audio_prob", "text_drop_prob"):
    _require(0.0 <= df[name] <= 1.0, f"config.diffusion.{name}={df[name]} must be in [0, 1]")
  _require(df.audio_to_video_prob + df.video_to_audio_prob <= 1.0,
           "config.diffusion.audio_to_video_prob + video_to_audio_prob must be <= 1")
  for name in ("diffusion", "align", "perceptual", "temporal", "audio_weight", "video_weight"):
    _require(lo[name] >= 0.0, f"config.loss.{name}={lo[name]} must be >= 0")
  _require(lo.align_temperature > 0, f"config.loss.align_temperature={lo.align_temperature} must be > 0")
  _require(c.sample.num_steps >= 1, f"config.sample.num_steps={c.sample.num_steps} must be >= 1")

  # training
  _require(t.num_steps >= 1, f"config.train.num_steps={t.num_steps} must be >= 1")
  _require(t.checkpoint_every >= 1, f"config.train.checkpoint_every={t.checkpoint_every} must be >= 1")
  _require(t.grad_accum >= 1 and d.batch_size % t.grad_accum == 0,
           f"config.train.grad_accum={t.grad_accum} must be >= 1 and divide data.batch_size={d.batch_size}")
  _require(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate} must be > 0")
  _require(0.0 <= t.ema_decay < 1.0, f"config.train.ema_decay={t.ema_decay} must be in [0, 1)")
  offload = t.get("offload_optimizer", False)  # absent in configs saved before it
  _require(isinstance(offload, bool),
           f"config.train.offload_optimizer={offload!r} must be True or False")

  # in-training evaluation (absent from configs saved before it existed)
  ev = c.get("eval")
  if ev is not None:
    from avgen.metrics.in_training import KNOWN_METRICS  # pylint: disable=g-import-not-at-top
    _require(isinstance(ev.every, int) and ev.every >= 0,
             f"config.eval.every={ev.every!r} must be an int >= 0 (0 disables)")
    unknown = sorted(set(ev.metrics) - set(KNOWN_METRICS))
    _require(not unknown and len(ev.metrics) > 0,
             f"config.eval.metrics={tuple(ev.metrics)}: unknown {unknown}; use a non-empty subset "
             f"of {KNOWN_METRICS}")

  # mesh
  if num_devices is not None:
    sizes = mesh_shape(c, num_devices)
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = d.batch_size // t.grad_accum
    _require(micro % batch_shards == 0,
             f"config.data.batch_size={d.batch_size} / train.grad_accum={t.grad_accum} = {micro} must be "
             f"divisible by mesh data*fsdp = {batch_shards}")
    if sizes["context"] > 1 and mo.get("context_parallel", "ring") == "all_to_all":
      tensor = sizes["tensor"] if mo.num_heads % sizes["tensor"] == 0 else 1
      _require((mo.num_heads // tensor) % sizes["context"] == 0,
               f"config.model.context_parallel='all_to_all' splits the {mo.num_heads // tensor} heads "
               f"per device over mesh.context={sizes['context']}, which must divide them; use 'ring'")
