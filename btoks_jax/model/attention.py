"""Attention kernels: the dense XLA path (any backend) and the splash path (TPU Pallas kernel).

Both take the same description of who may attend to whom: per-token segment ids (a query attends
only to keys of its own segment; padding is segment 0) and an optional static boolean block mask
bool[T, S] that already contains causality. `btoks_jax.mask` builds that static mask. The dense path
runs the mask's row blocks (`row_blocks`) one by one, each against only the columns it may see.

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


def row_blocks(static_mask: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    """The row ranges of a static mask bool[T, T] and the key columns each needs: ((r0, r1, c0, c1), ...).

    Consecutive rows whose first allowed column is the same form a block, spanning the columns from that one to
    the last any of its rows allows. The condensation mask of a `[Q | B | T]` layout gives two blocks, [Q ; B]
    against the columns of Q and B and T against those of B and T: the score tiles of the authors' two passes,
    where one dense square would also compute the T -> Q scores that the mask discards. Attention of each
    block over its span alone is the same function, because every row may attend to its own column (so no row
    of a block is left with nothing to attend, whatever the segment ids). A mask that is not square, or leaves
    a row without its own column, or that blocks would not make cheaper, gives the one block of everything.
    """
    t, s = static_mask.shape
    whole = ((0, t, 0, s),)
    if t != s or not static_mask.diagonal().all():
        return whole
    first = static_mask.argmax(axis=1)  # every row allows its own column, so argmax finds a True
    last = s - 1 - static_mask[:, ::-1].argmax(axis=1)
    starts = np.flatnonzero(np.diff(first, prepend=-1))
    blocks = tuple((int(r0), int(r1), int(first[r0]), int(last[r0:r1].max()) + 1)
                   for r0, r1 in zip(starts, [*starts[1:], t]))
    if sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in blocks) >= t * s:
        return whole
    return blocks


Block = tuple[tuple[int, int, int, int], jax.Array]  # ((r0, r1, c0, c1), its mask bool[B, r1 - r0, c1 - c0])


def block_masks(segment_ids: jax.Array, static_mask: np.ndarray) -> tuple[Block, ...]:
    """((r0, r1, c0, c1), bool[B, r1 - r0, c1 - c0]) per block of `row_blocks(static_mask)`: the parts of
    `dense_mask(segment_ids, segment_ids, static_mask)` that `blocked_dense_attention` reads. A model builds them
    once per forward pass; every layer reads the same."""
    return tuple(((r0, r1, c0, c1), dense_mask(segment_ids[:, r0:r1], segment_ids[:, c0:c1],
                                                static_mask[r0:r1, c0:c1]))
                 for r0, r1, c0, c1 in row_blocks(static_mask))


def blocks_from(masks: tuple[Block, ...], start: int) -> tuple[Block, ...]:
    """The blocks of `masks` for the query rows `start..` alone, their row ranges counted from `start`: what
    `blocked_dense_attention` needs when only those rows' outputs are wanted (q holds rows `start..`, k and v
    every column)."""
    return tuple(((max(r0, start) - start, r1 - start, c0, c1), mask[:, max(r0, start) - r0:])
                 for (r0, r1, c0, c1), mask in masks if r1 > start)


def blocked_dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, masks: tuple[Block, ...],
                            scale: float) -> jax.Array:
    """`dense_attention` under `dense_mask(segment_ids, segment_ids, static_mask)`, computed block by block from
    `masks = block_masks(segment_ids, static_mask)`: each block of query rows scores only the key columns its
    mask may allow."""
    outs = [dense_attention(q[:, r0:r1], k[:, c0:c1], v[:, c0:c1], mask, scale)
            for (r0, r1, c0, c1), mask in masks]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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
