"""Test set-up: 8 fake CPU devices (sharding tests), fast XLA compiles, one persistent compilation
cache for the run's processes, and the repo root on sys.path (configs/).

The suite compiles far more than it runs. Without LLVM's optimization passes XLA's CPU backend
compiles about twice as fast, and these tiny programs run about as fast; the numerics are the
same (XLA's CPU backend does no fast-math at any level). `XLA_FLAGS` set by the caller wins.

Many tests compile the same program again (a trainer restarted on its workdir, the shared
sampling checkpoint in each xdist worker): JAX's persistent cache turns those into loads. It
lives in a fresh directory per run, made by the first process (the xdist controller) before its
workers start, so they inherit its path; set AVGEN_TEST_COMPILATION_CACHE to keep one across
runs. Subprocesses that tests start are unaffected (they set up JAX themselves).
"""

import os
import shutil
import sys
import tempfile

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CACHE_ENV = "AVGEN_TEST_COMPILATION_CACHE"
_OWN_CACHE = _CACHE_ENV not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="avgen_test_jax_cache_")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
# A size limit makes JAX lock the directory around reads and writes: two workers share it.
jax.config.update("jax_compilation_cache_max_size", 16 << 30)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)
