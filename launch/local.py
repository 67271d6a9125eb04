"""Runs N copies of a command on this machine as one multi-process JAX job (for testing).

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      python -m avgen.main --config=configs/stage2.py:demo --workdir=/tmp/mp

Each copy gets the variables that `avgen.parallel.distributed.initialize_from_environment`
reads (AVGEN_COORDINATOR_ADDRESS on 127.0.0.1, AVGEN_NUM_PROCESSES, AVGEN_PROCESS_ID), CPU as
its platform with `--devices_per_process` fake devices, and gloo CPU collectives, so that a
laptop exercises the same code paths as a multi-host pod. Output lines are prefixed with
`[p<i>]`. When one process fails, the others are stopped (a peer waiting in a collective would
otherwise hang until the coordinator times out); the exit status is the first failure's.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, port: int,
                devices_per_process: int, platform: str) -> dict:
  """The environment of process `process_id`: coordinator, platform and device count."""
  env = dict(base)
  env["AVGEN_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
  env["AVGEN_NUM_PROCESSES"] = str(num_processes)
  env["AVGEN_PROCESS_ID"] = str(process_id)
  # A SLURM allocation around this launcher must not make jax read SLURM_* instead.
  for key in [k for k in env if k.startswith("SLURM_")]:
    del env[key]
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    # Replace (not append) an inherited device-count flag: the last one would win silently.
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    count = f"--xla_force_host_platform_device_count={devices_per_process}"
    env["XLA_FLAGS"] = f"{flags.strip()} {count}".strip()
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()
  stream.close()


def launch(command: list[str], *, num_processes: int, devices_per_process: int = 1,
           platform: str = "cpu", port: int | None = None, timeout: float | None = None,
           out=None) -> int:
  """Starts the processes, streams their output, returns the job's exit status."""
  if num_processes < 1:
    raise ValueError(f"launch: num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"launch: devices_per_process must be >= 1, got {devices_per_process}")
  if not command:
    raise ValueError("launch: no command given (put it after `--`)")
  out = out or sys.stdout
  port = port or free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(os.environ, process_id=i, num_processes=num_processes, port=port,
                      devices_per_process=devices_per_process, platform=platform)
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
    t.start()
    pumps.append(t)

  deadline = None if timeout is None else time.monotonic() + timeout
  status = None
  try:
    while True:
      codes = [p.poll() for p in procs]  # every process, every time (any() would stop early)
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        status = codes[failed[0]]
        out.write(f"[launch] process {failed[0]} exited with {status}; stopping the others\n")
        break
      if all(c == 0 for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        out.write(f"[launch] timed out after {timeout:g} s; stopping all processes\n")
        break
      time.sleep(0.1)
  finally:
    _stop(procs)
    for t in pumps:
      t.join(timeout=5)
  if status is None:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status


def _stop(procs) -> None:
  """SIGTERM the ones still running (the trainer saves on SIGTERM), then SIGKILL after 10 s."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  end = time.monotonic() + 10
  for p in procs:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="%(prog)s [options] -- command [args...]")
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process (platform cpu)")
  parser.add_argument("--platform", choices=("cpu", "inherit"), default="cpu",
                      help="cpu: force CPU with gloo collectives; inherit: keep JAX_PLATFORMS")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1:]
  else:
    options, command = argv, []
  args = parser.parse_args(options)
  if not command:
    parser.error("no command: give it after `--`, e.g. -- python -m avgen.main ...")
  return launch(command, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process, platform=args.platform,
                port=args.port or None, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
