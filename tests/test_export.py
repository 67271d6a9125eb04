"""Exported inference: the jax.export sampler and denoiser, reloaded in a process that cannot
import avgen or flax, equal the in-process ones; int8 weights stay within their bound."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from avgen.models.tokenizer import ByteTokenizer
from avgen.sample import api, export, exported_runtime, pipeline
from sample_utils import FAST_COMPILE, shared_checkpoint

PROMPTS = ["a red circle bounces", "a blue square"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return api.load_pipeline(shared_checkpoint(tmp_path_factory), compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def reference(pipe):
  """The in-process latents for PROMPTS / SEEDS (the batch tests compile this program too)."""
  requests = [pipeline.Request(p, seed=s) for p, s in zip(PROMPTS, SEEDS)]
  video, audio, *_ = pipe.sample_latents(requests, num_inference_steps=2)
  return np.asarray(video), np.asarray(audio)


_RUN_WITHOUT_AVGEN = textwrap.dedent("""
    import sys
    import numpy as np
    for name in ("avgen", "flax", "orbax", "optax"):  # the model code must not be needed
      sys.modules[name] = None
    sys.path.insert(0, sys.argv[1])
    import avgen_exported
    sampler = avgen_exported.load(sys.argv[1], {{"xla_backend_optimization_level": 0}})
    video, audio = sampler.sample({prompts!r}, seeds={seeds!r})
    inputs = np.load(sys.argv[2])
    text = sampler.tokenize({prompts!r})
    negative = sampler.tokenize([""] * {n})
    dv, da = sampler.denoise(text, negative, inputs["video_t"], inputs["audio_t"], 0.7, 0.4,
                             guidance_video=2.0, guidance_audio=3.0)
    np.savez(sys.argv[3], video=video, audio=audio, dv=dv, da=da)
""")


def test_exported_sampler_runs_without_avgen_and_equals_the_pipeline(pipe, reference,
                                                                     tmp_path):
  directory = export.export_sampler(pipe, str(tmp_path / "exp"), batch_size=2,
                                    num_inference_steps=2)
  assert sorted(os.listdir(directory)) == sorted(
      ["sampler.jaxexport", "denoiser.jaxexport", "weights.npz", "meta.json",
       export.RUNTIME_NAME])
  rng = np.random.default_rng(0)
  variant = pipe._variant()  # pylint: disable=protected-access
  video_t = rng.normal(size=(2,) + variant.video_shape).astype(np.float32)
  audio_t = rng.normal(size=(2,) + variant.audio_shape).astype(np.float32)
  np.savez(tmp_path / "inputs.npz", video_t=video_t, audio_t=audio_t)
  script = _RUN_WITHOUT_AVGEN.format(prompts=PROMPTS, seeds=SEEDS, n=len(PROMPTS))
  env = dict(os.environ, PYTHONPATH="", XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, directory, str(tmp_path / "inputs.npz"),
                         str(tmp_path / "out.npz")], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  for name, ours, ref in zip(("video", "audio"), (got["video"], got["audio"]), reference):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{name}: exported vs in-process relative error {err:.2e}"

  text = pipe.text_inputs(PROMPTS)
  negative = pipe.text_inputs([""] * 2)
  args = (pipe.weights, text, negative, video_t, audio_t, np.full(2, 0.7, np.float32),
          np.full(2, 0.4, np.float32), np.full(2, 2.0, np.float32), np.full(2, 3.0, np.float32))
  dv, da = jax.jit(pipe.denoiser_fn()).lower(*args).compile(FAST_COMPILE)(*args)
  for ours, ref in ((got["dv"], dv), (got["da"], da)):
    ref = np.asarray(ref)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_runtime_tokenizer_is_avgens():
  texts = ["", "a red circle", "ünïcode ♪ and a prompt longer than the twenty-four tokens"]
  ours = exported_runtime.byte_tokenize(texts, 24)
  ref = ByteTokenizer(24)(texts)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_array_equal(ours[1], ref[1])


def test_int8_weights_within_half_a_step_and_the_export_close(pipe, reference, tmp_path):
  _, _, flat = export.flatten_params(pipe.weights)
  quantized = export.quantize_int8(flat, min_size=1024)
  n_quantized = 0
  for name, w in flat.items():
    entry = quantized[name]
    if w.ndim < 2 or w.size < 1024:
      assert entry is w
      continue
    n_quantized += 1
    assert entry["q"].dtype == np.int8 and entry["scale"].shape == (w.shape[-1],)
    error = np.abs(w - entry["q"].astype(np.float32) * entry["scale"])
    assert np.all(error <= entry["scale"] / 2 + 1e-7), name
  assert n_quantized >= 4

  int8_dir = export.export_sampler(pipe, str(tmp_path / "int8"), batch_size=2,
                                   num_inference_steps=2, quantize="int8", min_size=1024)
  with open(os.path.join(int8_dir, "meta.json")) as f:
    meta = json.load(f)
  f32_bytes = sum(w.nbytes for w in flat.values())
  assert meta["quantize"] == "int8" and meta["weight_bytes"] < 0.5 * f32_bytes
  got = export.load(int8_dir, FAST_COMPILE).sample(PROMPTS, seeds=SEEDS)
  for ours, r in zip(got, reference):
    err = np.abs(ours - r).max() / np.abs(r).max()
    assert 0 < err < 0.1, err  # changed (the weights did), but not far
