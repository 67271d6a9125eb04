"""Sampling: the generation pipeline, the Generator, clips and media I/O.

`from avgen.sample import AudioVideoGenerationPipeline` loads the pipeline on first use, so
that importing `avgen.sample.media` (data workers do) does not pull in JAX and Flax.
"""

_LAZY = {
    "AudioVideoGenerationPipeline": "avgen.sample.pipeline",
    "GenerationOutput": "avgen.sample.pipeline",
    "Request": "avgen.sample.pipeline",
    "Clip": "avgen.sample.generate",
    "Generator": "avgen.sample.generate",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'avgen.sample' has no attribute {name!r}")
