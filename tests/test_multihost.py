"""Multi-host training through launch/local.py (jax.distributed on localhost, gloo collectives).

Two processes with one CPU device each train the tiny config with fsdp=2, so every host holds
and saves its own half of the parameters and optimizer state and feeds its half of each batch.
One process with one device then restores the step-2 checkpoint (another mesh and host count)
and must log the same losses for steps 3 and 4: parameters, optimizer state, RNG and the data
position all carry over.
"""

import glob
import os
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import train_utils
from avgen.parallel import mesh as mesh_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiling the train step dominates this test; XLA's cheaper CPU pipeline halves it. Every run
# here uses the same flags, so the comparison is like for like.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LAUNCH = os.path.join(REPO, "launch")

sys.path.insert(0, LAUNCH)
import local as local_launcher  # noqa: E402  (launch/ is scripts, not a package)


def _env(devices: int | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("AVGEN_", "SLURM_"))}
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = FAST_COMPILE
  if devices is not None:
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
  return env


def _train(workdir, data_dir, *, processes: int, devices: int, data: int, fsdp: int) -> str:
  train = [sys.executable, "-m", "avgen.main", "--config=tests/train_utils.py",
           f"--workdir={workdir}", f"--config.data.path={data_dir}/*.array_record",
           f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
           "--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
  if processes > 1:
    command = [sys.executable, os.path.join(REPO, "launch", "local.py"),
               f"--num_processes={processes}", f"--devices_per_process={devices}",
               "--timeout=500", "--"] + train
    env = _env()
  else:
    command, env = train, _env(devices)
  run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  log = run.stdout + run.stderr
  assert run.returncode == 0, log[-6000:]
  return log


def _scalars(logdir, tag: str) -> dict[int, float]:
  """{step: value} of one scalar from tensorboardX event files (TFRecord framing)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
  return out


def test_two_process_run_restores_onto_one_process_and_another_mesh(tmp_path):
  config = train_utils.tiny_config()
  data_dir = tmp_path / "data"
  train_utils.make_shards(data_dir, config)
  workdir = tmp_path / "run"

  log = _train(workdir, data_dir, processes=2, devices=1, data=1, fsdp=2)
  assert "[p1] " in log and "process 1 of 2" in log
  two_hosts = _scalars(workdir / "tensorboard", "loss")
  assert sorted(two_hosts) == [1, 2, 3, 4], log[-3000:]
  for step in (2, 4):  # every host wrote its share of the state and its data position
    for p in range(2):
      assert os.path.exists(workdir / f"checkpoints/{step}/data/process_{p}-of-2.json")

  # Resume from step 2 on one process and one device.
  shutil.rmtree(workdir / "checkpoints" / "4")
  shutil.move(workdir / "tensorboard", tmp_path / "tensorboard_two_hosts")
  log = _train(workdir, data_dir, processes=1, devices=1, data=1, fsdp=1)
  assert "resumed from" in log and "restarts at global batch 2" in log, log[-3000:]
  one_host = _scalars(workdir / "tensorboard", "loss")
  assert sorted(one_host) == [3, 4], log[-3000:]
  np.testing.assert_allclose([one_host[3], one_host[4]], [two_hosts[3], two_hosts[4]], rtol=1e-4)
  # A wrong restore would not pass by luck: the losses move by far more than the tolerance.
  assert abs(two_hosts[3] - two_hosts[2]) > 1e-2 * abs(two_hosts[2])


def test_launcher_environment_per_process():
  base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x",
          "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "PATH": "/bin"}
  env = local_launcher.process_env(base, process_id=1, num_processes=3, port=1234,
                                   devices_per_process=2, platform="cpu")
  assert env["AVGEN_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["AVGEN_NUM_PROCESSES"], env["AVGEN_PROCESS_ID"]) == ("3", "1")
  assert not [k for k in env if k.startswith("SLURM_")]  # jax would take it for a SLURM job
  # One device-count flag (the last would win silently), other flags kept.
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x",
                                      "--xla_force_host_platform_device_count=2"]
  assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


def test_launcher_stops_the_job_when_one_process_fails():
  code = ("import os, sys, time\n"
          "if os.environ['AVGEN_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(120)")
  out = open(os.devnull, "w")
  start = time.monotonic()
  status = local_launcher.launch([sys.executable, "-c", code], num_processes=3, out=out)
  assert status == 3
  assert time.monotonic() - start < 60  # the sleepers were stopped, not waited for
  with pytest.raises(ValueError, match="num_processes"):
    local_launcher.launch(["true"], num_processes=0)


class _Device:

  def __init__(self, process_index):
    self.process_index = process_index


class _FakeMesh:
  """What process_batch_slot reads from a Mesh: devices laid out on the named axes."""

  def __init__(self, shape, processes):
    self.axis_names = ("data", "fsdp", "context", "tensor")
    self.shape = dict(zip(self.axis_names, shape))
    self.devices = np.array([_Device(p) for p in processes], dtype=object).reshape(shape)


@pytest.mark.parametrize("shape,processes,expected", [
    ((2, 2, 1, 1), [0, 0, 1, 1], [(0, 2), (1, 2)]),  # data across hosts
    ((1, 2, 1, 2), [0, 0, 1, 1], [(0, 2), (1, 2)]),  # fsdp across hosts, tensor inside
    ((1, 2, 2, 1), [0, 1, 0, 1], [(0, 1), (0, 1)]),  # context across hosts: same rows, same data
    ((4, 1, 1, 1), [0, 0, 1, 1], [(0, 2), (1, 2)]),  # two row blocks per host
])
def test_hosts_read_the_rows_their_devices_hold(shape, processes, expected):
  mesh = _FakeMesh(shape, processes)
  assert [mesh_lib.process_batch_slot(mesh, p) for p in (0, 1)] == expected


def test_scattered_batch_rows_are_refused():
  mesh = _FakeMesh((4, 1, 1, 1), [0, 1, 0, 1])  # host 0 would hold rows 0-1 and 4-5 of 8
  with pytest.raises(ValueError, match="not one contiguous run"):
    mesh_lib.process_batch_slot(mesh, 0)


def test_cluster_launch_files_are_well_formed():
  for script in ("slurm.sbatch", "tpu_pod.sh"):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)
  yaml = pytest.importorskip("yaml")
  container = lambda job: job["template"]["spec"]["template"]["spec"]["containers"][0]
  tpu = yaml.safe_load(open(os.path.join(LAUNCH, "gke_tpu_jobset.yaml")))
  tpu_env = container(tpu["spec"]["replicatedJobs"][0])["env"]
  assert {"name": "AVGEN_DISTRIBUTED", "value": "auto"} in tpu_env
  gpu = yaml.safe_load(open(os.path.join(LAUNCH, "gke_gpu_jobset.yaml")))
  job = gpu["spec"]["replicatedJobs"][0]
  env = {e["name"]: e for e in container(job)["env"]}
  name = gpu["metadata"]["name"]
  # Pod 0 of job 0 hosts the coordinator: <jobset>-<replicatedJob>-0-0.<jobset>.
  coordinator = env["AVGEN_COORDINATOR_ADDRESS"]["value"].split(":")[0]
  assert coordinator == f"{name}-{job['name']}-0-0.{name}"
  assert int(env["AVGEN_NUM_PROCESSES"]["value"]) == job["template"]["spec"]["parallelism"]
