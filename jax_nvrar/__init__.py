"""jax_nvrar: the NVRAR hierarchical all-reduce on NVSHMEM, as a drop-in
for ``jax.lax.psum`` inside ``jax.shard_map``."""

from jax_nvrar._psum import psum
from jax_nvrar._runtime import finalize, initialize, is_available

__all__ = ["psum", "initialize", "finalize", "is_available"]
__version__ = "0.1.0"
