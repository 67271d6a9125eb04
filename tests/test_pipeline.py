"""AudioVideoGenerationPipeline: the four modes on a tiny checkpoint, kept inputs, seeds, compile
reuse, batches split over the 8 fake CPU devices, input fitting and refusals, the CLI.

Every call uses 2 steps, so the programs compiled by one test are reused by the next.
"""

import os
import wave

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from avgen.diffusion import objectives
from avgen.sample import api, media, pipeline, sampling
from avgen.sample import __main__ as cli
from sample_utils import (FAST_COMPILE, build_checkpoint, random_params, sample_config,
                          shared_checkpoint, square_video, stack_blocks, tone)

STEPS = 2
PROMPT = "a red circle bounces"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  workdir = shared_checkpoint(tmp_path_factory)
  api.load_pipeline(workdir, compiler_options=FAST_COMPILE)  # the CLIs reuse this pipeline
  return workdir


@pytest.fixture(scope="module")
def pipe(ckpt):
  # The api's cached pipeline, so the CLI test below reuses its compiled programs.
  return api.load_pipeline(ckpt, compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A 1 s tone at 22.05 kHz and 12 frames of 32x24 at 12 fps: every field differs from the
  model's (16 kHz, 0.5 s, 8 fps, 16x16, 4 frames)."""
  d = tmp_path_factory.mktemp("pipeline_inputs")
  wav, mp4 = str(d / "in.wav"), str(d / "in.mp4")
  media.write_wav(wav, tone(1.0, 22050), 22050)
  media.write_mp4(mp4, square_video(12, 24, 32), 12)
  return wav, mp4


def _shape_ok(out, config):
  d = config.data
  assert out.video.shape == (d.num_frames, d.height, d.width, 3) and out.video.dtype == np.uint8
  assert out.audio.shape == (round(d.audio_seconds * d.sample_rate),)
  assert out.audio.dtype == np.float32 and out.fps == d.fps and out.sample_rate == d.sample_rate


def test_text_to_audio_video_seed_prompt_and_guidance_decide_the_clip(pipe, tmp_path):
  out = pipe(prompt=PROMPT, num_inference_steps=STEPS, seed=42)
  _shape_ok(out, pipe.config)
  again = pipe(prompt=PROMPT, num_inference_steps=STEPS, seed=42)
  np.testing.assert_array_equal(out.video, again.video)
  np.testing.assert_array_equal(out.audio, again.audio)
  for other in (dict(seed=43), dict(seed=42, prompt="a blue square"),
                dict(seed=42, guidance_scale=6.0), dict(seed=42, guidance_scale_audio=6.0),
                dict(seed=42, negative_prompt="noise")):
    changed = pipe(**{"prompt": PROMPT, **other}, num_inference_steps=STEPS)
    assert not np.array_equal(changed.audio, out.audio), other

  path = str(tmp_path / "out.mp4")
  out.save(path)
  info = media.probe(path)
  assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")
  assert info["num_frames"] == pipe.config.data.num_frames
  out.save(str(tmp_path / "out.wav"))
  audio, rate = media.read_wav(str(tmp_path / "out.wav"))
  assert rate == out.sample_rate and audio.shape == out.audio.shape
  assert 'src="data:video/mp4;base64,' in out.to_html()
  assert out.spectrogram().ndim == 3


def test_scanned_layers_sample_as_the_loop_model_does(tmp_path):
  """A model.scan_layers checkpoint (the 2B default) samples, and gives the clip of the same
  weights as unscanned blocks: the scan runs inside the sampler's own loop and jit."""
  loop_config = sample_config(model__depth=2)
  scan_config = sample_config(model__depth=2, model__scan_layers=True)
  params = random_params(loop_config, seed=3)
  clips = []
  for name, config, weights in (("loop", loop_config, params),
                                ("scan", scan_config, stack_blocks(params, scan_config))):
    workdir = build_checkpoint(tmp_path / name, config, params=weights)
    clip = pipeline.AudioVideoGenerationPipeline.from_pretrained(
        workdir, compiler_options=FAST_COMPILE)(prompt=PROMPT, num_inference_steps=STEPS, seed=7)
    _shape_ok(clip, config)
    clips.append(clip)
  np.testing.assert_allclose(clips[1].audio, clips[0].audio, atol=1e-4)
  assert np.abs(clips[1].video.astype(int) - clips[0].video.astype(int)).max() <= 1


def test_second_call_with_the_same_shapes_does_not_compile(pipe):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  pipe(prompt=PROMPT, num_inference_steps=STEPS, seed=1)
  programs = pipe.compiled_programs
  compiles.clear()
  pipe(prompt="another prompt", negative_prompt="blur", num_inference_steps=STEPS, seed=7,
       guidance_scale=1.5)
  assert compiles == [] and pipe.compiled_programs == programs
  jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the listener does hear compiles
  assert compiles


def test_audio_to_video_returns_the_given_audio_bit_exact(pipe, inputs):
  wav, _ = inputs
  d = pipe.config.data
  out = pipe(prompt=PROMPT, mode="audio_to_video", audio_path=wav, num_inference_steps=STEPS)
  _shape_ok(out, pipe.config)
  given = media.read_audio(wav, sample_rate=d.sample_rate)[:len(out.audio)]
  np.testing.assert_array_equal(out.audio, given)
  assert any("22050 Hz" in n for n in out.notes) and any("longer" in n for n in out.notes)
  # An array at the model's rate comes back as the same samples, and conditions the video.
  samples = tone(d.audio_seconds, d.sample_rate, freq=880.0)
  out2 = pipe(prompt=PROMPT, mode="audio_to_video", audio=samples,
              audio_sample_rate=d.sample_rate, num_inference_steps=STEPS)
  np.testing.assert_array_equal(out2.audio, samples)
  assert out2.notes == [] and not np.array_equal(out2.video, out.video)


def test_video_to_audio_returns_the_given_frames(pipe, inputs):
  _, mp4 = inputs
  d = pipe.config.data
  out = pipe(prompt=PROMPT, mode="video_to_audio", video_path=mp4, num_inference_steps=STEPS)
  _shape_ok(out, pipe.config)
  fitted, _ = media.read_video(mp4, fps=d.fps, size=(d.height, d.width), crop=True)
  np.testing.assert_array_equal(out.video, fitted[:d.num_frames])
  assert any("12 fps" in n for n in out.notes) and any("cropped" in n for n in out.notes)


def test_edit_runs_the_tail_of_the_schedule(pipe, inputs):
  wav, mp4 = inputs
  out = pipe(prompt=PROMPT, mode="edit", audio_path=wav, video_path=mp4, strength=0.5,
             num_inference_steps=STEPS)
  _shape_ok(out, pipe.config)
  full = sampling.schedule(pipe.objective, 10)
  np.testing.assert_array_equal(sampling.schedule(pipe.objective, 10, strength=0.3), full[7:])
  np.testing.assert_array_equal(sampling.schedule(pipe.objective, 10, strength=1.0), full)
  assert len(sampling.schedule(pipe.objective, 10, strength=0.01)) == 2  # at least one step
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="strength"):
      pipe(prompt=PROMPT, mode="edit", audio_path=wav, video_path=mp4, strength=bad)


def test_sample_rows_edit_start_conditions_and_row_independence():
  """With a model that predicts zero velocity, each mode's result is its starting state."""
  flow = objectives.RectifiedFlow(prediction="v")
  vshape, ashape = (2, 4, 4, 3), (8, 5)
  zero = lambda v, a, tv, ta, text: (jnp.zeros_like(v), jnp.zeros_like(a))
  rng = np.random.default_rng(0)
  v0 = rng.normal(size=(3,) + vshape).astype(np.float32)
  a0 = rng.normal(size=(3,) + ashape).astype(np.float32)
  text = {"ids": np.ones((3, 5), np.int32)}
  keys = sampling.row_keys([5, 6, 7])
  times = sampling.schedule(flow, 8, strength=0.25)
  run = lambda mode, v, a: sampling.sample_rows(
      zero, flow, text, text, keys, v, a, np.ones(3, np.float32), np.ones(3, np.float32),
      jnp.asarray(times), mode=mode, sampler="euler", video_shape=vshape, audio_shape=ashape)

  def results():  # one program for everything: each compile costs ~1 s on a busy CPU
    return (run("edit", v0, a0), run("audio_to_video", None, a0),
            sampling.row_noise(keys, vshape, ashape),
            sampling.row_noise(keys[1:2], vshape, ashape))

  compiled = jax.jit(results).lower().compile(FAST_COMPILE)
  (video, audio), (a2v_video, a2v_audio), (noise_v, noise_a), (alone_v, alone_a) = compiled()
  np.testing.assert_allclose(video, 0.75 * v0 + 0.25 * noise_v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(audio, 0.75 * a0 + 0.25 * noise_a, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(a2v_audio, a0)
  np.testing.assert_allclose(a2v_video, noise_v, atol=1e-6)
  # A row's noise is its own: the same key alone or inside a batch draws the same.
  np.testing.assert_array_equal(alone_v[0], noise_v[1])
  np.testing.assert_array_equal(alone_a[0], noise_a[1])
  with pytest.raises(ValueError, match="needs audio_x0"):
    run("audio_to_video", None, None)


def test_batch_is_split_over_the_local_devices(pipe):
  assert len(jax.devices()) == 8
  requests = [pipeline.Request(prompt=f"prompt {i}", seed=100 + i) for i in range(8)]
  video, audio, *_ = pipe.sample_latents(requests, num_inference_steps=STEPS)
  assert len(video.sharding.device_set) == 8
  assert {s.data.shape[0] for s in video.addressable_shards} == {1}
  # Each row equals the same request run alone on one device.
  for i in (0, 5):
    alone, alone_audio, *_ = pipe.sample_latents([requests[i]], num_inference_steps=STEPS)
    np.testing.assert_allclose(np.asarray(video[i]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(audio[i]), np.asarray(alone_audio[0]), rtol=1e-5,
                               atol=1e-5)
  # The same program serves the decoded call; rows keep their order, prompts and seeds.
  programs = pipe.compiled_programs
  outs = pipe([r.prompt for r in requests], num_inference_steps=STEPS, seed=100)
  assert [o.seed for o in outs] == [r.seed for r in requests]
  assert [o.prompt for o in outs] == [r.prompt for r in requests]
  assert pipe.compiled_programs == programs


def test_other_clip_shapes_and_bfloat16(pipe):
  d = pipe.config.data
  out = pipe(prompt=PROMPT, num_frames=8, num_inference_steps=STEPS, audio_duration=1.0)
  assert out.video.shape == (8, d.height, d.width, 3)
  assert out.audio.shape == (d.sample_rate,)
  half = pipeline.AudioVideoGenerationPipeline(pipe.config, pipe.generator, pipe.params,
                                               dtype="bfloat16", compiler_options=FAST_COMPILE)
  assert half.weight_bytes * 2 == pipe.weight_bytes
  a = pipe.sample_latents([pipeline.Request(PROMPT, seed=3)], num_inference_steps=STEPS)[1]
  b = half.sample_latents([pipeline.Request(PROMPT, seed=3)], num_inference_steps=STEPS)[1]
  a, b = np.asarray(a), np.asarray(b)
  assert np.all(np.isfinite(b)) and np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_bad_requests_are_refused_naming_the_input(pipe, inputs, tmp_path):
  wav, mp4 = inputs
  d = pipe.config.data
  cases = [
      (dict(fps=24), "fps=24"),
      (dict(audio_duration=10.0), "audio_duration=10.0"),
      (dict(height=18), "height=18"),
      (dict(mode="image"), "mode"),
      (dict(mode="audio_to_video"), "audio_path"),
      (dict(mode="text_to_audio_video", audio_path=wav), "takes no audio"),
      (dict(mode="edit", video_path=mp4), "audio_path"),
      (dict(mode="audio_to_video", audio=np.zeros(100, np.float32)), "audio_sample_rate"),
      (dict(mode="audio_to_video", audio=np.zeros(100, np.int16), audio_sample_rate=16000),
       "floating point"),
      (dict(mode="video_to_audio", video=np.zeros((4, 16, 16, 3), np.float32), video_fps=8),
       "uint8"),
      (dict(mode="audio_to_video", audio_path=str(tmp_path / "missing.wav")), "no such file"),
      (dict(sampler="ddim"), "sampler"),
      (dict(strength=0.5), "strength"),
      (dict(num_inference_steps=0), "num_inference_steps"),
      (dict(seed=[1, 2]), "seed"),
      # A rate goes with an array only: a file has its own, and no input has none.
      (dict(mode="audio_to_video", audio_path=wav, audio_sample_rate=16000),
       "audio_sample_rate=16000: only with audio= .* read from the file"),
      (dict(audio_sample_rate=16000), "audio_sample_rate=16000: .* no audio was given"),
      (dict(mode="video_to_audio", video_path=mp4, video_fps=12), "video_fps=12"),
  ]
  for kwargs, match in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      pipe(prompt=PROMPT, **kwargs)
  with pytest.raises(FileNotFoundError, match="neither a directory"):
    pipeline.resolve_checkpoint(str(tmp_path / "nope"))
  # The batch generator's Requests reach the same rule in inputs.py.
  with pytest.raises(ValueError, match="audio_sample_rate=22050: only for an array of audio"):
    pipe.generate([pipeline.Request(PROMPT, audio=wav, audio_sample_rate=22050)],
                  mode="audio_to_video", num_inference_steps=STEPS)
  with pytest.raises(ValueError, match="video_fps=12: only for an array of video"):
    pipe.generate([pipeline.Request(PROMPT, video=mp4, video_fps=12)], mode="video_to_audio",
                  num_inference_steps=STEPS)
  assert d.fps == 8  # the cases above assume the tiny config


def test_hub_id_downloads_only_the_checkpoints_folder(ckpt, monkeypatch, tmp_path):
  import huggingface_hub
  calls = []

  def fake_download(repo_id, revision=None, allow_patterns=None):
    calls.append((repo_id, revision, allow_patterns))
    root = tmp_path / "snapshot"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    if not (root / "sub" / "checkpoints").exists():
      os.symlink(os.path.join(ckpt, "checkpoints"), root / "sub" / "checkpoints")
    return str(root)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  workdir = pipeline.resolve_checkpoint("someone/avgen-demo/sub@v1")
  assert calls == [("someone/avgen-demo", "v1", ["sub/checkpoints/*"])]
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))
  assert pipeline.resolve_checkpoint(os.path.join(ckpt, "checkpoints")) == ckpt


def test_memory_estimate_reads_the_compiled_program(pipe):
  pipe(prompt=PROMPT, num_inference_steps=STEPS)
  programs = pipe.compiled_programs
  est = pipe.memory_estimate(1, num_inference_steps=STEPS)  # the program that just ran
  assert pipe.compiled_programs == programs
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pipe.weights))
  assert est["weights"] == params and 0.5 * params < est["arguments"] <= params + 10_000
  assert est["temporaries"] > 0
  assert est["peak_estimate"] == est["arguments"] + est["outputs"] + est["temporaries"]
  assert {r["mode"] for r in pipe.memory_report()} >= {"text_to_audio_video", "edit"}


def test_cli_writes_mp4_and_wav(ckpt, inputs, tmp_path):
  _, mp4 = inputs
  out = str(tmp_path / "cli" / "clip.mp4")
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["avgen.sample", f"--checkpoint={ckpt}", "--prompt=a red circle", f"--out={out}",
               "--steps=2", "--mode=video_to_audio", f"--video={mp4}", "--seed=3"])
  try:
    cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  info = media.probe(out)
  assert info["num_frames"] == 4 and info["audio_codec"] == "aac"
  assert os.path.isfile(out[:-4] + ".wav")
  # The CLI's clip is the API's for the same options (api keeps the loaded pipeline).
  clip = api.generate_from_workdir(ckpt, "a red circle", mode="video_to_audio", video_path=mp4,
                                   num_steps=2, seed=3)
  audio, _ = media.read_wav(out[:-4] + ".wav")
  # Half a step of rounding, or a whole one where +1.0 is held at 32767 / 32768.
  np.testing.assert_allclose(audio, clip.audio, atol=1.0 / 32768)


def test_cli_refuses_an_input_its_mode_does_not_read(inputs, tmp_path):
  wav, mp4 = inputs
  cases = [("text_to_audio_video", [f"--audio={wav}"], "--audio"),
           ("audio_to_video", [f"--audio={wav}", f"--video={mp4}"], "--video")]
  for mode, given, refused in cases:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["avgen.sample", f"--workdir={tmp_path}", f"--mode={mode}", *given,
                 f"--out={tmp_path / 'x.mp4'}"])
    try:
      with pytest.raises(SystemExit, match=f"{refused} is not used by --mode={mode}"):
        cli.main([])
    finally:
      flags.FLAGS.unparse_flags()
  assert not os.listdir(tmp_path)  # refused before anything was loaded or written


def test_wav_round_trip_is_exact_and_full_scale_does_not_wrap(tmp_path):
  """One int16 convention (k <-> k / 32768) for writing and both readers."""
  every_int16 = np.arange(-32768, 32768, dtype=np.float32) / 32768
  out_of_range = np.array([1.0, -1.0, 3.0, -3.0, 1.0 - 0.4 / 32768, 1e30], np.float32)
  audio = np.concatenate([every_int16, out_of_range])
  path = str(tmp_path / "all.wav")
  media.write_wav(path, audio, 16000)
  with wave.open(path, "rb") as f:
    pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
  np.testing.assert_array_equal(pcm[:65536], np.arange(-32768, 32768))
  # +1.0 (and above) holds at the largest int16 rather than wrapping to -32768.
  np.testing.assert_array_equal(pcm[65536:], [32767, -32768, 32767, -32768, 32767, 32767])
  back, rate = media.read_wav(path)
  assert rate == 16000 and back.dtype == np.float32
  np.testing.assert_array_equal(back[:65536], every_int16)
  # ffmpeg (read_audio, and so audio_to_video's kept sound) reads the file to the same floats.
  np.testing.assert_array_equal(media.read_audio(path, sample_rate=16000), back)

