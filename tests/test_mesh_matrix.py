"""Every mesh trains like one device (the issue-7 matrix on 8 fake CPU devices), and DCN meshes.

One child process (8 devices, XLA's cheaper CPU compile pipeline) trains the tiny model for 5
steps on one device and on each mesh (data, fsdp, context, tensor) of MESHES, from the same
perturbed parameters (every gate and zero-initialised output non-zero, so every branch shows in
the loss and the gradients) and the same batches. The tests compare what it reports: losses and
gradient norms per step, per-example outputs, and the parameter bytes each device holds.

The (2, 4, 1, 1) run also covers two options at no extra compile: its mesh is built as a hybrid
mesh (mesh.data=1 per slice x mesh.dcn_data=2 slices, over two fake granules that interleave
the devices), and its optimizer state lives in pinned host memory (train.offload_optimizer).

XLA's partitioner got two of these wrong before the model worked around it: on (2, 2, 1, 2)
(checked on a forward pass) it swapped batch rows in the audio head (see
`sharding.param_for_compute`); on (1, 1, 8, 1) it multiplied the video head's conv kernel
gradients by 4 (spatially sharded convs; the gradient norm shows it). Neither showed in losses
from the initial parameters: the gates that carry those branches start at zero.
"""

import collections
import json
import math
import os
import subprocess
import sys
import traceback

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sample_utils
import train_utils
from avgen.config import ConfigError, mesh_shape
from avgen.parallel import mesh as mesh_lib
from avgen.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1, 1, 1), (2, 4, 1, 1), (1, 2, 2, 2), (1, 1, 8, 1))
HYBRID_OFFLOADED = (2, 4, 1, 1)
# Checked on a forward pass only (a train step compile per mesh is what this file spends).
FORWARD_MESHES = ((2, 2, 1, 2),)
SCANNED_MESH = (1, 2, 2, 2)
STEPS = 5
# As in test_multihost: compiling dominates, and every run here uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh_matrix")
  env = {k: v for k, v in os.environ.items() if not k.startswith("AVGEN_")}
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = FAST_COMPILE + " --xla_force_host_platform_device_count=8"
  run = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
  with open(out / "report.json") as f:
    return json.load(f)


def _key(mesh):
  return ",".join(map(str, mesh))


def _result(report, mesh):
  got = report[_key(mesh)]
  if "error" in got:
    pytest.fail(f"mesh {mesh} failed in the child process:\n{got['error']}")
  return got


@pytest.mark.parametrize("mesh", FORWARD_MESHES, ids=_key)
def test_mesh_forward_matches_one_device(report, mesh):
  np.testing.assert_allclose(_result(report, mesh)["outputs"],
                             _result(report, (1, 1, 1, 1))["outputs"], rtol=1e-4, atol=1e-5,
                             err_msg="per-example output sums")


@pytest.mark.parametrize("mesh", MESHES, ids=_key)
def test_mesh_trains_like_one_device(report, mesh):
  one, got = _result(report, (1, 1, 1, 1)), _result(report, mesh)
  # float32 sums in another order leave ~1e-6 (Adam's division by small second moments grows it).
  np.testing.assert_allclose(got["loss"], one["loss"], rtol=2e-5, err_msg="loss per step")
  np.testing.assert_allclose(got["grad_norm"], one["grad_norm"], rtol=2e-5,
                             err_msg="gradient norm per step")
  # Per example: a mesh that mixes up batch rows can keep the mean loss close.
  np.testing.assert_allclose(got["outputs"], one["outputs"], rtol=1e-4, atol=1e-5,
                             err_msg="per-example output sums")


def test_scanned_blocks_train_like_the_loop_on_one_device(report):
  """The same weights as scanned blocks, on a (1, 2, 2, 2) mesh with the optimizer state in host
  memory (the update streamed over the layer axis): the one-device loop model's losses."""
  one, got = _result(report, (1, 1, 1, 1)), report["scan:" + _key(SCANNED_MESH)]
  assert "error" not in got, got.get("error")
  np.testing.assert_allclose(got["loss"], one["loss"], rtol=2e-5, err_msg="loss per step")
  np.testing.assert_allclose(got["grad_norm"], one["grad_norm"], rtol=2e-5)
  np.testing.assert_allclose(got["outputs"], one["outputs"], rtol=1e-4, atol=1e-5)
  assert got["opt_state_memory"] == ["pinned_host"]


def test_losses_move(report):
  """The comparison means something: training changes the loss, and examples differ."""
  one = _result(report, (1, 1, 1, 1))
  loss = np.asarray(one["loss"])
  assert np.ptp(loss) > 1e-3 * np.abs(loss).max(), loss
  assert np.ptp(np.asarray(one["outputs"])) > 1e-3


def test_parameter_bytes_per_device_fall_as_fsdp_grows(report):
  by_fsdp = {int(k): v for k, v in report["bytes_by_fsdp"].items()}
  sizes = sorted(by_fsdp)
  assert sizes == [1, 2, 4, 8]
  for small, large in zip(sizes, sizes[1:]):
    assert by_fsdp[large] < 0.75 * by_fsdp[small], by_fsdp
  # The arrays the runs trained hold what the shardings say (device 0's shards).
  for mesh in MESHES:
    got = _result(report, mesh)
    assert got["device0_param_bytes"] == got["expected_param_bytes"], mesh
  assert (_result(report, (2, 4, 1, 1))["device0_param_bytes"]
          < 0.5 * _result(report, (8, 1, 1, 1))["device0_param_bytes"])


def test_offloaded_optimizer_state_stays_in_host_memory(report):
  got = _result(report, HYBRID_OFFLOADED)
  assert got["opt_state_memory"] == ["pinned_host"]
  assert got["params_memory"] == ["device"]
  # An orbax checkpoint (as the trainer's) restores it into the same host-memory layout.
  assert got["restored_opt_state_memory"] == ["pinned_host"]
  assert got["restored_equal"]


def test_gathered_weight_gives_the_right_rows():
  """The smallest case of the row swap `sharding.param_for_compute` avoids: x [B, K] split over
  (data, fsdp) x tensor, w [K, N] over tensor x fsdp, the product wanted over tensor on N."""
  c = train_utils.tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 2, 2, 1, 2
  mesh = mesh_lib.build_mesh(c, jax.devices()[:8])
  rules = tuple(tuple(r) for r in c.mesh.rules)
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(8, 64)).astype(np.float32), rng.normal(size=(64, 64)).astype(np.float32)

  def product(x, w):
    with sharding.use_rules(mesh, rules):
      x = sharding.constrain(x, ("batch", "act_mlp"))
      w = sharding.param_for_compute(w, ("mlp", "embed"))
      return sharding.constrain(x @ w, ("batch", "act_mlp"))

  w_sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, P("tensor", "fsdp")))
  np.testing.assert_allclose(jax.jit(product)(x, w_sharded), x @ w, rtol=1e-5, atol=1e-4)
  # Outside the trainer's rules it is the identity.
  assert sharding.param_for_compute(w, ("mlp", "embed")) is w


# ----------------------------------------------------------------------------- DCN meshes


def _ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices)


def _dcn_config(**sizes):
  c = train_utils.tiny_config()
  for k, v in sizes.items():
    c.mesh[k] = v
  return c


def test_dcn_axis_runs_across_granules():
  # 4 granules ("hosts") of 2 devices; data and fsdp each span 2 of them.
  granule = lambda d: d.id // 2
  c = _dcn_config(data=1, fsdp=2, dcn_data=2, dcn_fsdp=2)
  mesh = mesh_lib.build_mesh(c, jax.devices()[:8], granule_of=granule)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  g = np.vectorize(lambda d: granule(d))(mesh.devices)[..., 0, 0]  # [data, fsdp]
  # Along data: always another granule. Along fsdp: pairs inside a granule (the fast links),
  # and the pairs from different granules (the DCN part is the major index).
  assert all(g[0, j] != g[1, j] for j in range(4))
  assert all(g[i, 0] == g[i, 1] != g[i, 2] == g[i, 3] for i in range(2))
  assert len(set(_ids(mesh).ravel())) == 8


def test_dcn_granules_from_interleaved_devices():
  granule = lambda d: d.id % 2  # granule 0 = even ids, 1 = odd ids
  c = _dcn_config(data=1, fsdp=4, dcn_data=2)
  ids = _ids(mesh_lib.build_mesh(c, jax.devices()[:8], granule_of=granule))[..., 0, 0]
  np.testing.assert_array_equal(ids % 2, [[0] * 4, [1] * 4])


def test_dcn_sizes_are_checked_against_the_devices():
  c = _dcn_config(data=2, fsdp=2, dcn_data=2)
  assert mesh_shape(c, 8) == {"data": 4, "fsdp": 2, "context": 1, "tensor": 1}
  with pytest.raises(ConfigError, match=r"per-slice sizes .* times DCN sizes .* 8 devices"):
    mesh_shape(_dcn_config(data=2, fsdp=1, dcn_data=2), 8)
  c = _dcn_config(data=-1, fsdp=2, dcn_fsdp=2)  # -1 fills the per-slice share: 8 / 2 / 2
  assert mesh_shape(c, 8) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
  with pytest.raises(ConfigError, match=r"config\.mesh\.dcn_tensor=0"):
    mesh_shape(_dcn_config(dcn_tensor=0), 8)
  with pytest.raises(ConfigError, match=r"config\.mesh\.dcn_\*: 8 devices do not split"):
    mesh_shape(_dcn_config(data=1, dcn_data=3), 8)
  # Fake CPU devices are one process: a DCN axis has no second granule to run across.
  with pytest.raises(ConfigError, match=r"dcn_\*: DCN sizes multiply to 2.*the 1 processes"):
    mesh_lib.build_mesh(_dcn_config(data=4, dcn_data=2), jax.devices()[:8])
  with pytest.raises(ConfigError, match=r"dcn_\*.*multiply to 2.*form 1 slices/hosts"):
    mesh_lib.build_mesh(_dcn_config(data=4, dcn_data=2), jax.devices()[:8],
                        granule_of=lambda d: 0)
  with pytest.raises(ConfigError, match=r"need 4 devices in each slice/host"):
    mesh_lib.build_mesh(_dcn_config(data=4, dcn_data=2), jax.devices()[:8],
                        granule_of=lambda d: d.id < 6)


def test_default_granules_are_slices_or_blocks_of_processes():
  Device = collections.namedtuple("Device", "id process_index slice_index")
  # 2 GPU nodes with one process per GPU (SLURM numbers a node's tasks consecutively).
  gpus = [Device(i, i, None) for i in range(16)]
  granule = mesh_lib.default_granules(gpus, 2)
  assert [granule(d) for d in gpus] == [0] * 8 + [1] * 8
  # One process per node: the process is the granule.
  nodes = [Device(i, i // 4, None) for i in range(8)]
  assert [mesh_lib.default_granules(nodes, 2)(d) for d in nodes] == [0] * 4 + [1] * 4
  # TPU multislice: slices, whatever the hosts.
  tpus = [Device(i, i // 2, i // 4) for i in range(8)]
  assert [mesh_lib.default_granules(tpus, 2)(d) for d in tpus] == [0] * 4 + [1] * 4
  with pytest.raises(ConfigError, match=r"multiply to 3.*16 processes"):
    mesh_lib.default_granules(gpus, 3)


# ----------------------------------------------------------------------------- child process


def _child(out_dir: str) -> None:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from avgen.models import rope, tokenizer  # pylint: disable=g-import-not-at-top
  from avgen.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from avgen.train import step as step_lib  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()
  # 72 tokens (64 video + 8 audio) split 8 ways on context; batch 8 over data * fsdp <= 8.
  config = train_utils.tiny_config(train__learning_rate=1e-3, train__warmup_steps=1,
                                   train__num_steps=STEPS)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, abstract = state_lib.abstract_state(config, tx)

  # One initialisation for every mesh (a sharded init would compile once per mesh).
  base = jax.jit(lambda key: state_lib.init_state(config, tx, key)[2])(jax.random.key(0))
  rng = np.random.default_rng(1)
  base = jax.device_get(base)
  base = base.replace(params=jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), base.params))
  base = base.replace(ema_params=base.params)

  d = config.data
  b = d.batch_size
  ids, mask = tokenizer.ByteTokenizer(d.caption_max_len)(
      [f"a shape number {i} bounces" for i in range(b)])
  batches = [{
      "video": rng.uniform(-1, 1, (b, d.num_frames, d.height, d.width, 3)).astype(np.float32),
      "audio": rng.normal(size=(b, rope.num_mel_frames(config), config.mel.n_mels)).astype(
          np.float32),
      "text_ids": np.asarray(ids), "text_mask": np.asarray(mask),
      "skipped_records": np.zeros((b,), np.int32)} for _ in range(STEPS)]
  t = np.linspace(0.1, 0.9, b, dtype=np.float32)

  def output_sums(params, batch, graphdef=graphdef, rest=rest):
    """Per-example weighted sums of every model output: rows on the wrong example show."""
    model = nnx.merge(graphdef, params, rest)
    out = model(batch["video"], batch["audio"], jnp.asarray(t), jnp.asarray(t[::-1].copy()),
                text_ids=batch["text_ids"], text_mask=batch["text_mask"])
    return jnp.stack([jnp.sum(x.reshape(b, -1) * jnp.linspace(-1, 1, x[0].size), 1)
                      for x in out], 1)

  def bytes_on_device0(tree):
    first = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == first)

  def expected_bytes(shardings, tree):
    first = jax.devices()[0]
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(tree))
               if first in s.device_set)

  def memory_kinds(tree):
    return sorted({x.sharding.memory_kind for x in jax.tree.leaves(tree)})

  def run(shape, model=(config, graphdef, rest, abstract, base), offload=False):
    config, graphdef, rest, abstract, base = model
    config.mesh.data, config.mesh.fsdp, config.mesh.context, config.mesh.tensor = shape
    granule_of = None
    config.mesh.dcn_data = 1
    if shape == HYBRID_OFFLOADED:
      config.mesh.data, config.mesh.dcn_data = 1, 2
      offload, granule_of = True, lambda device: device.id % 2
    mesh = mesh_lib.build_mesh(config, jax.devices()[:math.prod(shape)], granule_of=granule_of)
    assert tuple(mesh.shape.values()) == shape, (mesh.shape, shape)
    shardings = state_lib.state_shardings(abstract, mesh, rules, offload_optimizer=offload)
    state = jax.device_put(base, shardings)

    def forward(params, batch):
      with sharding.use_rules(mesh, rules):
        return output_sums(params, batch, graphdef, rest)

    outputs = jax.jit(forward)(state.params, mesh_lib.global_batch(batches[0], mesh))
    got = {"outputs": np.asarray(outputs).tolist()}
    if shape in FORWARD_MESHES:
      return got
    got["device0_param_bytes"] = bytes_on_device0(state.params)
    got["expected_param_bytes"] = expected_bytes(shardings.params, abstract.params)
    train_step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                          mesh_lib.batch_sharding(mesh))
    got["loss"], got["grad_norm"] = [], []
    for batch in batches:
      state, metrics = train_step(state, mesh_lib.global_batch(batch, mesh))
      values = metrics.compute()
      got["loss"].append(float(values["loss"]))
      got["grad_norm"].append(float(values["grad_norm"]))
    if offload:
      got["opt_state_memory"] = memory_kinds(state.opt_state)
      got["params_memory"] = memory_kinds(state.params)
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)
      path = os.path.join(out_dir, "offloaded_" + _key(shape) + str(config.model.scan_layers))
      with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(path, target)
      got["restored_opt_state_memory"] = memory_kinds(restored.opt_state)
      got["restored_equal"] = all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored)),
                                               jax.tree.leaves(jax.device_get(state))))
    return got

  report = {}
  for shape in ((1, 1, 1, 1),) + MESHES + FORWARD_MESHES:
    try:
      report[_key(shape)] = run(shape)
    except Exception:  # pylint: disable=broad-except
      # One failing mesh fails its own tests (with this text), not the whole file.
      report[_key(shape)] = {"error": traceback.format_exc()[-4000:]}

  # Scanned blocks (model.scan_layers, the large configs' default: one lax.scan over blocks
  # stacked on a `layers` axis) holding the same weights, on a mesh that splits everything else,
  # with the optimizer state offloaded (so the update streams over the layers).
  try:
    scan_config = train_utils.tiny_config(train__learning_rate=1e-3, train__warmup_steps=1,
                                          train__num_steps=STEPS, model__scan_layers=True)
    scan_graphdef, scan_rest, scan_abstract = state_lib.abstract_state(scan_config, tx)
    scan_params = sample_utils.stack_blocks(base.params, scan_config)
    scan_base = base.replace(params=scan_params, ema_params=scan_params,
                             opt_state=jax.device_get(jax.jit(tx.init)(scan_params)))
    report["scan:" + _key(SCANNED_MESH)] = run(
        SCANNED_MESH, (scan_config, scan_graphdef, scan_rest, scan_abstract, scan_base),
        offload=True)
  except Exception:  # pylint: disable=broad-except
    report["scan:" + _key(SCANNED_MESH)] = {"error": traceback.format_exc()[-4000:]}

  # The same count from shardings alone, for fsdp = 1..8 (what create_sharded_state lays out).
  report["bytes_by_fsdp"] = {}
  config.mesh.dcn_data = 1
  for fsdp in (1, 2, 4, 8):
    config.mesh.data, config.mesh.fsdp = 8 // fsdp, fsdp
    config.mesh.context = config.mesh.tensor = 1
    mesh = mesh_lib.build_mesh(config, jax.devices())
    shardings = state_lib.state_shardings(abstract, mesh, rules)
    report["bytes_by_fsdp"][fsdp] = expected_bytes(shardings.params, abstract.params)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  _child(sys.argv[1])
