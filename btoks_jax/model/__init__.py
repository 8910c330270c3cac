"""The Qwen2-VL port in Flax NNX: vision tower, text decoder and the composed model."""

from btoks_jax.model.qwen2vl import Qwen2VL

__all__ = ["Qwen2VL"]
