"""The AV-DiT: shapes, AdaLN-Zero start, parameter names, masking, joint attention, precision, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avgen.models import DiTOutput, TextEncoder, build_model, rope
from avgen.models import embeddings, temporal_alignment
from avgen.models.tokenizer import ByteTokenizer
from configs.base import get_base_config
from sample_utils import stack_blocks

LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "time", None}


def tiny_config(**model):
  c = get_base_config("demo")
  c.data.num_frames, c.data.fps, c.data.audio_seconds = 4, 8, 0.5
  c.data.height = c.data.width = 16
  c.data.caption_max_len = 16
  m = c.model
  m.width, m.depth, m.num_heads = 64, 1, 2
  m.audio_head_depth, m.video_head_depth, m.video_head_channels = 1, 1, 8
  m.align_width = 16
  m.text_width, m.text_depth, m.text_heads = 32, 1, 2
  c.mel.n_mels = 16
  for key, value in model.items():
    m[key] = value
  return c


def inputs(config, batch=2, seed=0, captions=("a red circle bounces", "beep")):
  d, n = config.data, rope.num_mel_frames(config)
  rng = np.random.default_rng(seed)
  h = d.height // config.latent.video_downsample
  w = d.width // config.latent.video_downsample
  video = rng.normal(size=(batch, d.num_frames, h, w, config.latent.video_channels)).astype(np.float32)
  audio = rng.normal(size=(batch, n, config.mel.n_mels)).astype(np.float32)
  t = rng.uniform(size=(batch,)).astype(np.float32)
  ids, mask = ByteTokenizer(d.caption_max_len)(list(captions)[:batch])
  return dict(video=jnp.asarray(video), audio=jnp.asarray(audio), t_video=jnp.asarray(t),
              t_audio=jnp.asarray(t[::-1].copy()), text_ids=jnp.asarray(ids), text_mask=jnp.asarray(mask))


def perturb(model, scale=0.05, seed=1):
  """Adds noise to every parameter, so zero-initialised gates and heads become active."""
  rng = np.random.default_rng(seed)  # numpy: nothing to compile
  noisy = lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype))
  nnx.update(model, jax.tree.map(noisy, nnx.state(model, nnx.Param)))
  return model


# One jitted function per kind of call: models with equal structure reuse the compiled code.
forward = nnx.jit(lambda model, batch: model(**batch))


@pytest.fixture(scope="module")
def fresh():
  """A tiny model as initialised, and its config."""
  config = tiny_config()
  return build_model(config, nnx.Rngs(0)), config


@pytest.fixture(scope="module")
def active(fresh):
  """The tiny model with every parameter perturbed (a copy; `fresh` stays as initialised)."""
  model, config = fresh
  return perturb(nnx.clone(model)), config


def _abstract_output(config, batch=2):
  model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  spec = jax.eval_shape(lambda: inputs(config, batch))
  return jax.eval_shape(lambda s, b: nnx.merge(graphdef, s)(**b), state, spec)


@pytest.mark.parametrize("name,config", [
    ("demo", get_base_config("demo")),
    ("shared_weights=False", tiny_config(shared_weights=False)),
    ("video_patch=(2,4,4)", tiny_config(video_patch=(2, 4, 4), align_window=2)),
])
def test_output_shapes(name, config):
  out = _abstract_output(config)
  d = config.data
  h, w = d.height // config.latent.video_downsample, d.width // config.latent.video_downsample
  windows = d.num_frames // config.model.align_window
  assert isinstance(out, DiTOutput), name
  assert out.video.shape == (2, d.num_frames, h, w, config.latent.video_channels)
  assert out.audio.shape == (2, rope.num_mel_frames(config), config.mel.n_mels)
  assert out.align_video.shape == out.align_audio.shape == (2, windows, config.model.align_width)
  assert all(x.dtype == jnp.float32 for x in out)


def test_demo_token_counts():
  model = nnx.eval_shape(lambda: build_model(get_base_config("demo"), nnx.Rngs(0)))
  # 8 frames of 32x32 in (2, 4, 4) patches; 64 mel frames in 4-frame patches.
  assert (model.dit.num_video, model.dit.num_audio) == (4 * 8 * 8, 16)


def test_init_predicts_zero_and_every_block_is_identity(fresh):
  model, config = fresh
  batch = inputs(config)
  out = forward(model, batch)
  assert np.all(np.asarray(out.video) == 0) and np.all(np.asarray(out.audio) == 0)
  # Alignment features are live from the start (they sit before the zero gates).
  assert np.std(np.asarray(out.align_video)) > 0 and np.std(np.asarray(out.align_audio)) > 0

  dit = model.dit
  rng = np.random.default_rng(0)
  length = dit.num_video + dit.num_audio
  x = jnp.asarray(rng.normal(size=(2, length, config.model.width)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(2, config.model.width)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 16, config.model.text_width)), jnp.float32)
  positions = np.concatenate(rope.token_positions(config))
  tables = rope.rope_tables(positions, rope.rope_sections(dit.head_dim), config.model.rope_theta)
  call = nnx.jit(lambda module, *args: module(*args))
  for block in dit.blocks:
    np.testing.assert_array_equal(call(block, x, c, -c, text, jnp.array([3, 16]), tables), x)
  xv, xa, _, _ = call(dit.align, x[:, :dit.num_video], x[:, dit.num_video:])
  np.testing.assert_array_equal(xv, x[:, :dit.num_video])
  np.testing.assert_array_equal(xa, x[:, dit.num_video:])


def test_every_param_has_logical_names():
  model = nnx.eval_shape(lambda: build_model(tiny_config(shared_weights=False), nnx.Rngs(0)))
  count = 0
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Param):
      names = node.get_metadata().get("out_sharding")
      assert names is not None, f"{path} has no logical names"
      assert len(names) == node.ndim, f"{path}: names {names} for shape {node.shape}"
      assert set(names) <= LOGICAL_NAMES, f"{path}: unknown names {names}"
      count += 1
  assert count > 100
  q = model.dit.blocks[0].attn[0].q.kernel
  out = model.dit.blocks[0].attn[0].out.kernel
  assert q.get_metadata()["out_sharding"] == ("embed", "heads", "kv")
  assert out.get_metadata()["out_sharding"] == ("heads", "kv", "embed")
  assert model.dit.blocks[0].mlp[1].fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")


def test_padded_text_positions_do_not_matter(active):
  model, config = active
  batch = inputs(config)
  base = forward(model, batch)
  ids, mask = np.asarray(batch["text_ids"]).copy(), np.asarray(batch["text_mask"])
  ids[~mask] = np.random.default_rng(3).integers(3, 259, size=int((~mask).sum()))
  same = forward(model, dict(batch, text_ids=jnp.asarray(ids)))
  for a, b in zip(base, same):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # ...while a token inside the mask does matter.
  ids[0, 2] += 1
  changed = forward(model, dict(batch, text_ids=jnp.asarray(ids)))
  assert np.max(np.abs(np.asarray(changed.video[0]) - np.asarray(base.video[0]))) > 1e-4


@pytest.mark.parametrize("shared", [True, False])
def test_audio_output_depends_on_video_input(shared, active):
  if shared:
    model, config = nnx.clone(active[0]), active[1]
  else:
    config = tiny_config(shared_weights=False)
    model = perturb(build_model(config, nnx.Rngs(0)))
  batch = inputs(config)
  other_video = dict(batch, video=batch["video"][::-1])
  for align_gates in ("on", "zero"):
    if align_gates == "zero":  # only the joint self-attention can carry video into audio now
      model.dit.align.gate_a[...] = jnp.zeros_like(model.dit.align.gate_a[...])
    base, other = forward(model, batch), forward(model, other_video)
    assert np.max(np.abs(np.asarray(other.audio) - np.asarray(base.audio))) > 1e-4, align_gates
  # A sample's audio prediction depends on its own video, not on another sample's.
  zeroed = dict(batch, video=batch["video"].at[1].set(0.0))
  np.testing.assert_allclose(forward(model, zeroed).audio[0], base.audio[0], atol=1e-6)


def test_bfloat16_compute_is_close_to_float32(active):
  model, config = active
  bf16 = build_model(tiny_config(dtype="bfloat16"), nnx.Rngs(0))
  nnx.update(bf16, nnx.state(model, nnx.Param))
  batch = inputs(config)
  ref, low = forward(model, batch), forward(bf16, batch)
  for name, a, b in zip(DiTOutput._fields, ref, low):
    assert b.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(b) - np.asarray(a)) / np.linalg.norm(np.asarray(a))
    assert 1e-5 < rel < 0.05, f"{name}: relative error {rel:.3g} (0 would mean bfloat16 was not used)"


def test_remat_variants_give_the_same_gradients():
  # Remat wraps the DiT blocks, so the gradients of the trunk (embeddings + blocks) show it; the
  # rest of the model would only lengthen the compiles.
  config = tiny_config()
  batch = inputs(config)
  text = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, config.model.text_width)), jnp.float32)
  args = (batch["video"], batch["audio"], batch["t_video"], batch["t_audio"], text, batch["text_mask"])

  def loss(dit):
    xv, xa, _, _ = dit.trunk(*args)
    return jnp.mean(jnp.square(xv)) + jnp.mean(jnp.sin(xa))

  grads = nnx.jit(nnx.grad(loss))
  state = None
  for mode in ("none", "full", "dots"):
    model = build_model(tiny_config(remat=mode), nnx.Rngs(0))
    state = state or nnx.state(perturb(model), nnx.Param)
    nnx.update(model, state)
    got = grads(model.dit)
    if mode == "none":
      ref = got
      assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref)) > 0
    else:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, ref)


def test_alignment_features_get_gradients_at_init(fresh):
  model, config = fresh
  align = model.dit.align
  rng = np.random.default_rng(0)
  xv = jnp.asarray(rng.normal(size=(2, model.dit.num_video, config.model.width)), jnp.float32)
  xa = jnp.asarray(rng.normal(size=(2, model.dit.num_audio, config.model.width)), jnp.float32)

  def loss(module):
    _, _, align_video, align_audio = module(xv, xa)
    return jnp.mean(align_video * align_audio)

  grads = nnx.jit(nnx.grad(loss))(align)
  for name in ("conv_v", "conv_a", "norm_v", "norm_a"):
    assert float(jnp.max(jnp.abs(jax.tree.leaves(grads[name])[0]))) > 0, name


def test_alignment_windows_pool_the_right_tokens():
  # Demo timing: 2 audio tokens per frame; window of 2 frames -> audio tokens 4w..4w+3.
  times = rope.audio_token_times(64, 4, 250, 16000, 8)
  frames = temporal_alignment.audio_token_frames(times, 8)
  np.testing.assert_array_equal(frames, np.repeat(np.arange(8), 2))
  pool_a = temporal_alignment.audio_window_pooling(frames, 8, 2)
  np.testing.assert_allclose(pool_a, np.kron(np.eye(4), np.full((1, 4), 0.25)))
  # Temporal patches of 2 frames, windows of 1 frame: each window reads its covering patch.
  pool_v = temporal_alignment.video_window_pooling(8, 2, 1)
  np.testing.assert_allclose(pool_v, np.repeat(np.eye(4), 2, axis=0))
  with pytest.raises(ValueError, match="no audio token"):
    temporal_alignment.audio_window_pooling(np.array([0, 0, 2, 2]), 4, 1)


def test_patchify_round_trip_and_token_order():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 8, 12, 3)), jnp.float32)
  tokens = embeddings.patchify_video(x, (2, 4, 4))
  assert tokens.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(embeddings.unpatchify_video(tokens, (2, 2, 3), (2, 4, 4)), x)
  # Token 4 (t=0, row=1, col=1) starts at pixel (frame 0, y 4, x 4), as its RoPE position says.
  positions = rope.video_positions(4, 8, 12, (2, 4, 4))
  assert tuple(positions[4]) == (0.5, 1.0, 1.0)
  np.testing.assert_array_equal(tokens[:, 4, :3], x[:, 0, 4, 4, :])
  audio = jnp.asarray(rng.normal(size=(2, 16, 5)), jnp.float32)
  np.testing.assert_array_equal(
      embeddings.unpatchify_audio(embeddings.patchify_audio(audio, 4), 4), audio)


def test_text_encoder_protocol_and_names():
  model = nnx.eval_shape(lambda: build_model(tiny_config(), nnx.Rngs(0)))
  assert isinstance(model.text_encoder, TextEncoder)
  assert model.text_encoder.width == 32
  frozen = nnx.eval_shape(lambda: build_model(tiny_config(text_encoder="t5_encoder"), nnx.Rngs(0)))
  assert frozen.text_encoder is None  # held outside the model; see test_text_encoders_wiring.py
  with pytest.raises(ValueError, match="model.text_encoder"):
    build_model(tiny_config(text_encoder="bert"), nnx.Rngs(0))


def test_bad_config_and_inputs_raise_clear_errors(active):
  model, config = active
  batch = inputs(config)
  with pytest.raises(ValueError, match="video must be"):
    model(**dict(batch, video=batch["video"][:, :2]))
  with pytest.raises(ValueError, match="audio must be"):
    model(**dict(batch, audio=batch["audio"][:, :-4]))
  with pytest.raises(ValueError, match="t_audio"):
    model(**dict(batch, t_audio=batch["t_audio"][:1]))
  with pytest.raises(ValueError, match="model.remat"):
    build_model(tiny_config(remat="some"), nnx.Rngs(0))
  with pytest.raises(ValueError, match="video_patch"):
    build_model(tiny_config(video_patch=(3, 4, 4)), nnx.Rngs(0))
  with pytest.raises(ValueError, match="align_window"):
    build_model(tiny_config(align_window=3), nnx.Rngs(0))


@pytest.mark.parametrize("window", [0.0, 1.0])
def test_attention_window_limits_what_a_token_sees(window):
  """With a +-1 frame window (and one block), frame-0 tokens ignore video frames >= 2."""
  config = tiny_config(video_patch=(1, 4, 4), attention_window=window, depth=1)
  config.data.num_frames, config.data.audio_seconds = 8, 1.0
  model = perturb(build_model(config, nnx.Rngs(0)))
  batch = inputs(config)
  far = dict(batch, video=batch["video"].at[:, 2:].add(1.0))
  trunk = nnx.jit(lambda m, b: m.dit.trunk(b["video"], b["audio"], b["t_video"], b["t_audio"],
                                            m.text_encoder(b["text_ids"], b["text_mask"]),
                                            b["text_mask"])[0])
  tokens_per_frame = (16 // 4) * (16 // 4)
  change = np.abs(np.asarray(trunk(model, far)) - np.asarray(trunk(model, batch)))
  first_frame = change[:, :tokens_per_frame].max()
  if window:
    assert first_frame < 1e-6
    assert change[:, 2 * tokens_per_frame:].max() > 1e-3  # the perturbed frames themselves move
  else:
    assert first_frame > 1e-4


def test_attention_window_pallas_matches_xla():
  """The window mask reaches the pallas kernel (interpret mode here) with the same result."""
  outs = {}
  for impl in ("xla", "pallas"):
    config = tiny_config(video_patch=(1, 4, 4), attention_window=1.0, depth=1, attention_impl=impl)
    config.data.num_frames, config.data.audio_seconds = 8, 1.0
    model = perturb(build_model(config, nnx.Rngs(0)))
    outs[impl] = forward(model, inputs(config))
  for a, b in zip(outs["xla"], outs["pallas"]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def _with_stacked_blocks(loop_model, config):
  """A scan_layers model holding the loop model's weights (blocks stacked on a leading axis)."""
  scanned = build_model(config, nnx.Rngs(1))
  nnx.update(scanned, stack_blocks(nnx.state(loop_model, nnx.Param), config))
  return scanned


def test_scanned_layers_equal_the_loop():
  """model.scan_layers stacks the blocks (names gain 'layers') and computes the same trunk and
  gradients (with remat inside the scan, the harder case)."""
  loop = perturb(build_model(tiny_config(depth=2, remat="dots"), nnx.Rngs(0)))
  scanned = _with_stacked_blocks(loop, tiny_config(depth=2, remat="dots", scan_layers=True))
  kernel = scanned.dit.blocks.mlp[0].fc1.kernel
  assert kernel.shape[0] == 2 and kernel.get_metadata()["out_sharding"][0] == "layers"
  batch = inputs(config=tiny_config())
  text = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 32)), jnp.float32)
  args = (batch["video"], batch["audio"], batch["t_video"], batch["t_audio"], text, batch["text_mask"])

  def loss(dit):
    xv, xa, _, _ = dit.trunk(*args)
    return jnp.mean(jnp.square(xv)) + jnp.mean(jnp.sin(xa))

  value_and_grad = nnx.jit(nnx.value_and_grad(loss))
  (l_loop, g_loop), (l_scan, g_scan) = value_and_grad(loop.dit), value_and_grad(scanned.dit)
  np.testing.assert_allclose(float(l_scan), float(l_loop), rtol=1e-6)
  g_loop, g_scan = nnx.to_pure_dict(g_loop), nnx.to_pure_dict(g_scan)
  blocks = g_loop["blocks"]
  g_loop["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[i] for i in sorted(blocks)])
  assert float(jnp.max(jnp.abs(g_loop["blocks"]["mlp"][0]["fc1"]["kernel"]))) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), g_loop, g_scan)


def test_adaln_single_is_per_block_adaln_with_tied_projections():
  """adaLN-single computes what per-block AdaLN computes when every block's projection has the
  shared kernel and the shared bias plus that block's offset (DiT blocks and audio head alike);
  it starts as the identity too, and saves 6 x width^2 parameters per replaced projection."""
  single = perturb(build_model(tiny_config(adaln="single", depth=2), nnx.Rngs(0)))
  per_block = build_model(tiny_config(depth=2), nnx.Rngs(1))
  s = nnx.to_pure_dict(nnx.state(single, nnx.Param))

  def tied(shared, owner):
    """Per-block AdaLN params equivalent to `owner`'s offsets on the `shared` projection."""
    return {"proj": {"kernel": shared["proj"]["kernel"],
                     "bias": shared["proj"]["bias"] + owner["offset"]}}

  dit, head = s["dit"], s["dit"]["audio_head"]
  for block in dit["blocks"].values():
    block["adaln_v"] = tied(dit["blocks_adaln_v"], block["adaln_v"])
    block["adaln_a"] = tied(dit["blocks_adaln_a"], block["adaln_a"])
  for layer in head["layers"].values():
    layer["adaln"] = tied(head["layers_adaln"], layer["adaln"])
  del dit["blocks_adaln_v"], dit["blocks_adaln_a"], head["layers_adaln"]
  state = nnx.state(per_block, nnx.Param)
  nnx.replace_by_pure_dict(state, s)
  nnx.update(per_block, state)

  config = tiny_config(depth=2)
  batch = inputs(config)
  want, got = forward(per_block, batch), forward(single, batch)
  assert float(jnp.std(want.video)) > 0 and float(jnp.std(want.audio)) > 0
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  w = config.model.width
  replaced = 2 * config.model.depth + config.model.audio_head_depth  # AdaLN projections
  projection = 6 * w * w + 6 * w
  # per_block: `replaced` projections; single: 3 shared projections + an offset per block.
  assert count(per_block) - count(single) == replaced * projection - 3 * projection - replaced * 6 * w

  fresh_single = build_model(tiny_config(adaln="single"), nnx.Rngs(0))
  out = forward(fresh_single, inputs(tiny_config(adaln="single")))
  assert np.all(np.asarray(out.video) == 0) and np.all(np.asarray(out.audio) == 0)
