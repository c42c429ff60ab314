"""Tensor-parallel Llama 3.x in Flax NNX, with its all-reduce pluggable (``jax.lax.psum`` or
``jax_nvrar.psum``). ``python -m models.decode --help`` runs it; see ``models/tp.py`` for the layout."""
