"""Conversion between Hugging Face checkpoints and btoks-jax parameters."""
