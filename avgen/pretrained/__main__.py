"""Download and convert pretrained weights (the original spec's download_pretrained step).

  python -m avgen.pretrained fetch --all --cache-dir D
  python -m avgen.pretrained fetch --kind clip_text [--source S] --cache-dir D
  python -m avgen.pretrained convert --kind K --source S --out D [--dtype bfloat16]

`fetch` downloads each kind's default hub checkpoint (or --source), converts it, checks every
tensor's shape against the module its config builds, and leaves the converted state in the
cache, so that training and sampling load it without converting. `convert` writes one converted
directory that `avgen.pretrained.load(K, D)` restores.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen import pretrained


def _summary(module) -> str:
  leaves = jax.tree.leaves(nnx.state(module))
  n = sum(int(np.prod(x.shape)) for x in leaves)
  dtypes = sorted({str(x.dtype) for x in leaves})
  return f"{type(module).__name__}, {n / 1e6:.1f}M parameters in {len(leaves)} arrays, {dtypes}"


def _fetch(args) -> int:
  if args.all == bool(args.kind):
    raise SystemExit("fetch: give exactly one of --all or --kind")
  if args.all and args.source:
    raise SystemExit("fetch: --source goes with --kind, not --all")
  if args.all:
    todo = list(pretrained.default_sources().items())
  else:
    source = args.source or pretrained.kind_module(args.kind).DEFAULT_SOURCE
    todo = [(args.kind, source)]
  failed = []
  for kind, source in todo:
    start = time.perf_counter()
    try:
      module = pretrained.load(kind, source, dtype=jnp.dtype(args.dtype), cache_dir=args.cache_dir)
    except Exception as e:  # report every kind, then fail as a whole
      print(f"FAILED {kind} <- {source}: {type(e).__name__}: {e}", file=sys.stderr)
      failed.append(kind)
      continue
    print(f"ok {kind} <- {source}: {_summary(module)} ({time.perf_counter() - start:.1f} s)")
  if failed:
    print(f"fetch: {len(failed)} of {len(todo)} failed: {failed}", file=sys.stderr)
    return 1
  return 0


def _convert(args) -> int:
  out = pretrained.convert(args.kind, args.source, args.out, dtype=jnp.dtype(args.dtype),
                           cache_dir=args.cache_dir)
  module = pretrained.load(args.kind, out, dtype=jnp.dtype(args.dtype), cache=False)
  print(f"converted {args.kind} <- {args.source} into {out}: {_summary(module)}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m avgen.pretrained", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fetch", help="download + convert + cache")
  f.add_argument("--all", action="store_true", help="every kind's default checkpoint")
  f.add_argument("--kind", choices=pretrained.KINDS)
  f.add_argument("--source", help="hub id or local dir (default: the kind's DEFAULT_SOURCE)")
  f.add_argument("--cache-dir", help="default $AVGEN_PRETRAINED_CACHE or ~/.cache/avgen/pretrained")
  f.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  c = sub.add_parser("convert", help="convert one checkpoint into a directory")
  c.add_argument("--kind", required=True, choices=pretrained.KINDS)
  c.add_argument("--source", required=True)
  c.add_argument("--out", required=True)
  c.add_argument("--cache-dir", help="where hub downloads go")
  c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  args = parser.parse_args(argv)
  return _fetch(args) if args.command == "fetch" else _convert(args)


if __name__ == "__main__":
  sys.exit(main())
