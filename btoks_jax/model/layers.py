"""Shared layers: Linear, RMSNorm, LayerNorm, activations and rotary embeddings.

Dimension legend used across the model files:
  B batch, T query length, S key length, D model width, N query heads, K kv heads, G = N // K,
  H head dim, F mlp hidden, V vocab, P vision patches, C patch features (3*2*14*14), E vision width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

_INIT = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: Axes) -> nnx.Param:
    """A parameter tagged with logical axis names; the mesh mapping is applied outside the model."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), sharding_names=axes, eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel + bias with kernel float[in, out] (the transpose of torch's Linear.weight)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.kernel = param(rngs, _INIT, (in_features, out_features), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, axes[1:]) if use_bias else None
        self.dtype = dtype
        self.axes = axes
        self.lora = nnx.data(None)  # an adapter attached by `btoks_jax.lora.apply_lora`

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.lora is not None:
            return self.lora(self, x)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel.value.astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Mirrors Qwen2VLRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.value.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with affine weight and bias, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x float[B, T, N, H]; cos, sin float[B, T, H] (broadcast over heads)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, ...]):
    """Multimodal RoPE of Qwen2-VL (mirrors Qwen2VLRotaryEmbedding).

    positions int[3, B, T] (temporal, height, width). Frequency slot j of the half head takes its
    angle from axis i % 3 of the section i that j falls in. Returns cos, sin float32[B, T, H].
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, H/2]
    if sum(mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    bounds = [0]
    for size in mrope_section:
        bounds.append(bounds[-1] + size)
    freqs = jnp.concatenate([freqs[i % 3, ..., lo:hi] for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))], -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb), jnp.sin(emb)


def vision_cos_sin(patch_positions: jax.Array, head_dim: int, theta: float):
    """2-D rotary of the vision tower (mirrors Qwen2VLVisionRotaryEmbedding).

    patch_positions int[B, P, 2] (row, column). Returns cos, sin float32[B, P, H].
    """
    spatial_dim = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial_dim, 2, dtype=jnp.float32) / spatial_dim))  # [H/4]
    freqs = patch_positions.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, H/4]
    freqs = freqs.reshape(*freqs.shape[:-2], -1)  # [B, P, H/2]: rows then columns
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, P, H]
    return jnp.cos(emb), jnp.sin(emb)
