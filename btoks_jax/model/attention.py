"""Attention kernels: the dense XLA path (any backend) and the splash path (TPU Pallas kernel).

Both take the same description of who may attend to whom: per-token segment ids (a query attends
only to keys of its own segment; padding is segment 0) and an optional static boolean block mask
float[T, S] that already contains causality. `btoks_jax.btoks.mask` builds that static mask.

Legend: B batch, T query length, S key length, N query heads, K kv heads, G = N // K, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = float(np.finfo(np.float32).min)


def dense_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, static_mask: np.ndarray | None = None,
               causal: bool = False) -> jax.Array:
    """bool[B, T, S]: same segment, and allowed by `static_mask` [T, S] and/or causality."""
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    if causal:
        mask &= jnp.tril(jnp.ones((t, s), bool))[None]
    if static_mask is not None:
        mask &= jnp.asarray(static_mask)[None]
    return mask


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention with grouped kv heads, softmax in float32 (as eager PyTorch does).

    q float[B, T, N, H], k and v float[B, S, K, H], mask bool[B, T, S]; returns float[B, T, N, H].
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale  # [B, K, G, T, S]
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


def splash_attention(q, k, v, segment_ids, static_mask, scale):
    """The TPU Pallas splash kernel with the same semantics as `dense_attention` (see `splash.py`)."""
    from btoks_jax.model import splash  # Pallas is imported only when the splash path is chosen.

    return splash.splash_attention(q, k, v, segment_ids, static_mask, scale)
