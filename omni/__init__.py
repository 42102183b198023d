"""omni: a JAX/Flax trainer for early-fusion omni models (text, image patches and codec audio in one sequence)."""

__version__ = "0.1.0"
