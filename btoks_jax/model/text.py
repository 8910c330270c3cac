"""Qwen2 decoder of Qwen2-VL: GQA with q/k/v biases, RMSNorm, SwiGLU and multimodal RoPE.

Mirrors `Qwen2VLTextModel`. Attention is described by segment ids (padding is 0) plus a static
block mask that already holds causality, so the condensation mask of BToks is just another mask.

Legend: B batch, T sequence, D width, N query heads, K kv heads, H head dim, F mlp hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btoks_jax.model import attention
from btoks_jax.model.layers import ACTIVATIONS, Linear, RMSNorm, apply_rotary, mrope_cos_sin, param
from btoks_jax.model_config import TextConfig
from btoks_jax.sharding import constrain


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, h = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, h
        self.attention_impl = attention_impl
        self.q_proj = Linear(d, self.num_heads * h, use_bias=True, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, self.num_kv_heads * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, self.num_kv_heads * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(self.num_heads * h, d, use_bias=False, axes=("q_heads", "embed"), **kw)

    def __call__(self, x, cos, sin, segment_ids, static_mask, masks=None, start: int = 0):
        """`masks`: `attention.block_masks(segment_ids, static_mask)` for the dense path, built here when None.
        `start`: the output holds query rows `start..` only (keys and values still come from every column)."""
        b, t, _ = x.shape
        # The splash kernel's query and key lengths are one: it takes every row, and its output rows are cut.
        rows = 0 if self.attention_impl == "splash" else start
        q = self.q_proj(x[:, rows:]).reshape(b, t - rows, self.num_heads, self.head_dim)  # [B, T', N, H]
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)  # [B, T, K, H]
        q = apply_rotary(q, cos[:, rows:].astype(q.dtype), sin[:, rows:].astype(q.dtype))
        k = apply_rotary(k, cos.astype(k.dtype), sin.astype(k.dtype))
        scale = self.head_dim**-0.5
        if self.attention_impl == "splash":
            out = attention.splash_attention(q, k, v, segment_ids, static_mask, scale)[:, start:]
        else:
            if masks is None:
                masks = attention.block_masks(segment_ids, static_mask)
            if start:
                masks = attention.blocks_from(masks, start)
            out = attention.blocked_dense_attention(q, k, v, masks, scale)  # [B, T - start, N, H]
        return self.o_proj(out.reshape(b, t - start, -1))


class Mlp(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, use_bias=False, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, use_bias=False, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, use_bias=False, axes=("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, attention_impl=attention_impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = Mlp(cfg, **kw)

    def __call__(self, x, cos, sin, segment_ids, static_mask, masks=None, start: int = 0):
        """The layer's output for columns `start..` (every column's keys and values enter its attention)."""
        x = x[:, start:] + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, static_mask, masks, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final RMSNorm (HF: `model.language_model`)."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, attention_impl: str = "dense", remat: bool = False,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention_impl = attention_impl
        self.embed_tokens = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                                  param_dtype, ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(cfg, attention_impl=attention_impl, **kw) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens.value, input_ids, axis=0).astype(self.dtype)  # [B, T, D]

    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 static_mask: np.ndarray | None, start: int = 0) -> jax.Array:
        """inputs_embeds float[B, T, D], positions int[3, B, T], segment_ids int[B, T] (0 = padding),
        static_mask bool[T, T] (numpy, causal included) or None for plain causal.

        Returns the final (post-norm) hidden states float[B, T - start, D] of columns `start..`. The earlier
        columns reach those only through the last layer's keys and values, so with `start` > 0 the last layer
        computes queries, attention output, MLP and norm for columns `start..` alone (the same values).
        """
        t = inputs_embeds.shape[1]
        if not 0 <= start < t:
            raise ValueError(f"start {start} is not a column of the {t}-column sequence")
        if static_mask is None:
            static_mask = np.tril(np.ones((t, t), bool))
        cos, sin = mrope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)
        # The dense path's masks, once for all layers (the splash kernel takes the static mask itself).
        masks = attention.block_masks(segment_ids, static_mask) if self.attention_impl != "splash" else None
        x = inputs_embeds

        def run(s):  # a closure: `s` stays a Python int under remat
            return lambda lyr, h: lyr(h, cos, sin, segment_ids, static_mask, masks, s)

        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            fn = run(start if i == last else 0)
            x = nnx.remat(fn)(layer, x) if self.remat else fn(layer, x)
            x = constrain(x, ("batch", "seq", "embed"))
        return self.norm(x)
