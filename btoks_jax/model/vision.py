"""Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks and the 2x2 PatchMerger.

Mirrors `Qwen2VisionTransformerPretrainedModel`. Patches arrive per sample, padded to a static
budget P: float[B, P, C] with C = in_channels * temporal_patch * patch**2, each (image, frame)
group given its own segment id (attention is bidirectional inside a group only; padding is 0).

Legend: B batch, P patches, C patch features, E vision width, N heads, H head dim, F mlp hidden,
M = P // merge**2 merged tokens, D language-model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from btoks_jax.model import attention
from btoks_jax.model.layers import ACTIVATIONS, LayerNorm, Linear, apply_rotary, vision_cos_sin
from btoks_jax.model_config import VisionConfig
from btoks_jax.sharding import constrain


class PatchEmbed(nnx.Module):
    """The bias-free Conv3d with kernel = stride, computed as one matmul on flattened patches."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.embed_dim, use_bias=False, axes=("vis_patch", "vis_embed"),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)  # [B, P, E]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim, use_bias=True, axes=("vis_embed", "vis_qkv"), **kw)
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim, use_bias=True, axes=("vis_heads", "vis_embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        b, p, _ = x.shape
        qkv = self.qkv(x).reshape(b, p, 3, self.num_heads, self.head_dim)  # [B, P, 3, N, H]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, P, N, H]
        # The rotation runs in float32 whatever the compute dtype, as in the reference.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        out = attention.dense_attention(q, k, v, mask, self.head_dim**-0.5)  # [B, P, N, H]
        return self.proj(out.reshape(b, p, -1))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.embed_dim, cfg.mlp_dim, use_bias=True, axes=("vis_embed", "vis_mlp"), **kw)
        self.fc2 = Linear(cfg.mlp_dim, cfg.embed_dim, use_bias=True, axes=("vis_mlp", "vis_embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(cfg.embed_dim, 1e-6, **kw)
        self.norm2 = LayerNorm(cfg.embed_dim, 1e-6, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = VisionMlp(cfg, **kw)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm, concatenation of each 2x2 group of consecutive patches, Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group = cfg.spatial_merge_size**2
        width = cfg.embed_dim * self.group
        self.ln_q = LayerNorm(cfg.embed_dim, 1e-6, **kw)
        # HF names the two linears of its nn.Sequential "mlp.0" and "mlp.2".
        self.mlp_0 = Linear(width, width, use_bias=True, axes=("vis_merge", "vis_merge_hidden"), **kw)
        self.mlp_2 = Linear(width, cfg.hidden_size, use_bias=True, axes=("vis_merge_hidden", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, p, e = x.shape
        x = self.ln_q(x).reshape(b, p // self.group, self.group * e)  # [B, M, 4E]
        return self.mlp_2(ACTIVATIONS["gelu"](self.mlp_0(x)))  # [B, M, D]


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, remat: bool = False, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.remat = remat
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, **kw)

    def __call__(self, pixel_values: jax.Array, patch_positions: jax.Array, patch_segment_ids: jax.Array):
        """pixel_values float[B, P, C], patch_positions int[B, P, 2], patch_segment_ids int[B, P].

        Returns the merged features float[B, P // merge**2, D], in patch order.
        """
        cos, sin = vision_cos_sin(patch_positions, self.cfg.head_dim, self.cfg.rope_theta)  # [B, P, H]
        mask = attention.dense_mask(patch_segment_ids, patch_segment_ids)  # [B, P, P]
        x = self.patch_embed(pixel_values)
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda blk, h: blk(h, cos, sin, mask))(block, x)
            else:
                x = block(x, cos, sin, mask)
            x = constrain(x, ("batch", "seq", "vis_embed"))
        return self.merger(x)
