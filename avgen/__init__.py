"""avgen: joint audio-video generation with a diffusion transformer in JAX/Flax."""

from flax import nnx as _nnx

# Parameters carry logical axis names (`embed`, `mlp`, ...) as metadata only; the trainer maps
# them to mesh axes when it builds the sharded state. Eager sharding would need a mesh at module
# construction time, which models must not know about.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
