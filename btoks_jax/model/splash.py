"""Splash attention (TPU Pallas, block-sparse) with exactly the semantics of `attention.dense_attention`."""

# Who may attend to whom is the dense path's description: a static boolean mask [T, T] that already
# contains causality (e.g. the BToks condensation mask), AND-ed with per-token segment ids (a query
# sees only keys of its own segment; padding is segment 0). The static mask becomes the kernel's
# block-sparse mask, so (block_q x block_kv) tiles that are entirely False are never computed; the
# segment ids are applied inside the tiles that are.
#
# Legend: B batch, T sequence length (queries and keys), N query heads, K kv heads, G = N // K,
# H head dim.

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from btoks_jax import sharding

# For a call inside `jit` under `jax.set_mesh(mesh)`: a Pallas call cannot be partitioned by the compiler,
# so the kernel runs per shard through `shard_map`, with the shards the sharding rules give the logical
# axes "batch" and "q_heads" / "kv_heads" (the heads only when they split into whole kv heads per shard).
# Other mesh axes see the kernel replicated; the kernel cannot split the sequence.

# A (block_q x block_kv) tile is the unit the kernel skips; 512 keeps the TPU MXU busy on long
# sequences, and the kernel needs multiples of 128 (the TPU lane width) for segment ids.
DEFAULT_BLOCK = 512
_LANES = 128


def block_sizes_for(seq_len: int, block: int = DEFAULT_BLOCK) -> splash.BlockSizes:
    """Square tiles of `block` for every kernel (forward, dq, dkv), shrunk for sequences shorter than that."""
    if block % _LANES:
        raise ValueError(f"block={block} must be a multiple of {_LANES}")
    b = min(block, _round_up(seq_len, _LANES))
    return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                             block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def block_skip_fraction(static_mask: np.ndarray, block_q: int, block_kv: int) -> float:
    """Fraction of (block_q x block_kv) tiles of `static_mask` bool[T, T] that are entirely False.

    Measured on the mask the kernel actually runs: padded to whole tiles as `splash_attention` pads it.
    """
    padded = _pad_static_mask(_check_static_mask(static_mask), _round_up(len(static_mask), math.lcm(block_q, block_kv)))
    t = len(padded)
    tiles = padded.reshape(t // block_q, block_q, t // block_kv, block_kv).any(axis=(1, 3))
    return float(1.0 - tiles.mean())


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, static_mask: np.ndarray,
                     scale: float, *, interpret: bool | None = None,
                     block_sizes: splash.BlockSizes | None = None) -> jax.Array:
    """Softmax attention through the splash kernel; the same result as `dense_attention` with `dense_mask`.

    q float[B, T, N, H], k and v float[B, T, K, H] (N a multiple of K), segment_ids int[B, T] (0 = padding),
    static_mask bool[T, T] (numpy, causality included, True on the diagonal), scale the logit scale
    (head_dim ** -0.5). Returns float[B, T, N, H]. `interpret=None` runs the Pallas interpreter off TPU;
    `block_sizes` overrides `block_sizes_for(T)` (it needs the backward blocks for gradients).
    """
    b, t, n, _ = q.shape
    num_kv = k.shape[2]
    if n % num_kv:
        raise ValueError(f"query heads {n} must be a multiple of kv heads {num_kv}")
    static_mask = _check_static_mask(static_mask)
    if static_mask.shape != (t, t) or segment_ids.shape != (b, t):
        raise ValueError(f"static_mask {static_mask.shape} / segment_ids {segment_ids.shape} do not match T={t}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    if block_sizes is None:
        block_sizes = block_sizes_for(t)
    padded_len = _round_up(t, _tile_multiple(block_sizes))
    static_mask = _pad_static_mask(static_mask, padded_len)
    # The kernel does not scale the logits; folding the scale into q is the cheapest place.
    q = q * jnp.asarray(scale, q.dtype)

    # Splittable when some repeat of the kv heads gives every head shard whole kv heads (then N divides too).
    head_shards = sharding.current_shards("q_heads")
    split_heads = head_shards > 1 and _kv_repeats(n, num_kv, head_shards) is not None
    if split_heads and num_kv % head_shards:
        # Too few kv heads to split: duplicate each just enough that every head shard owns whole kv heads
        # (cheaper than leaving the whole attention replicated across the head shards).
        reps = _kv_repeats(n, num_kv, head_shards)
        k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)  # [B, T, K * reps, H]

    def attend(q, k, v, segment_ids):
        # Built per shard from the local head count; the MaskInfo depends only on the static mask,
        # which is the same for every head, so it is identical on every shard.
        kernel = splash.make_splash_mha_single_device(
            splash.MultiHeadMask([_kernel_mask(static_mask)] * q.shape[2]), block_sizes=block_sizes,
            interpret=interpret)
        seq_pad = ((0, 0), (0, 0), (0, padded_len - t), (0, 0))
        q, k, v = (jnp.pad(x.transpose(0, 2, 1, 3), seq_pad) for x in (q, k, v))  # [B, heads, Tp, H]
        # Padding gets an id no real token has, so it attends only to padding and is sliced off below.
        fresh_id = jnp.max(segment_ids) + 1
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded_len - t)), constant_values=fresh_id)  # [B, Tp]
        # Native grouped-query kernel: q head i reads kv head i // G in place, and the dkv kernel sums the
        # G query heads' gradients in VMEM, so kv is never repeated in HBM.
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q, k, v, segment_ids)
        return out[:, :, :t].transpose(0, 2, 1, 3)  # [B, T, N, H]

    heads, kv_heads = ("q_heads", "kv_heads") if split_heads else (None, None)
    act_btnh = sharding.current_spec(("batch", None, heads, None), q.shape, where="splash attention q")
    act_btkh = sharding.current_spec(("batch", None, kv_heads, None), k.shape, where="splash attention k, v")
    seg_bt = sharding.current_spec(("batch", None), segment_ids.shape, where="splash attention segment ids")
    if act_btnh is None or not any(act_btnh):  # no mesh, or nothing split on it
        return attend(q, k, v, segment_ids)
    if act_btkh != act_btnh:
        raise ValueError(f"the splash kernel needs q and kv heads on the same shards; the sharding rules give "
                         f"q {act_btnh}, k and v {act_btkh}")
    out_spec = jax.typeof(q).sharding.spec
    q, k, v, segment_ids = (sharding.reshard_explicit(x, spec)
                            for x, spec in ((q, act_btnh), (k, act_btnh), (v, act_btnh), (segment_ids, seg_bt)))
    # The library's pallas_call declares no per-axis variance for its outputs, which check_vma requires.
    in_specs = (act_btnh, act_btnh, act_btnh, seg_bt)
    out = jax.shard_map(attend, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs, out_specs=act_btnh,
                        check_vma=False)(q, k, v, segment_ids)
    # Explicit mesh axes are part of the array type: hand the output back sharded as q came in.
    return sharding.reshard_explicit(out, out_spec)


def _kv_repeats(num_heads: int, num_kv: int, head_shards: int) -> int | None:
    """Smallest r dividing G with K * r a multiple of `head_shards` (r = 1: no repeat); None if none exists."""
    group = num_heads // num_kv
    return next((r for r in range(1, group + 1) if group % r == 0 and (num_kv * r) % head_shards == 0), None)


def _check_static_mask(static_mask) -> np.ndarray:
    static_mask = np.asarray(static_mask, bool)
    if static_mask.ndim != 2 or static_mask.shape[0] != static_mask.shape[1]:
        raise ValueError(f"static_mask must be square [T, T], got {static_mask.shape}")
    # Every token (padding included, which shares segment 0) then sees at least itself, so no softmax row
    # is empty: the dense path would average all values there while the kernel skips the tiles.
    if not np.diagonal(static_mask).all():
        raise ValueError("static_mask must be True on the diagonal (every token attends to itself)")
    return static_mask


def _pad_static_mask(static_mask: np.ndarray, padded_len: int) -> np.ndarray:
    """bool[Tp, Tp]: real rows unchanged and blind to padding; padded rows see only the padding, causally.

    Padding carries a segment id of its own, so what a padded row may see among the real columns is
    irrelevant to every output. A causal mask stays plain causal, so that the lazy `CausalMask` still
    applies; any other mask (the condensation mask) keeps its padded rows off the real columns, so that the
    tiles the mask empties are empty in the padded rows too and the kernel skips them (with causal padded
    rows, the 512-row tile holding the target and the padding would see every query column).
    """
    t = len(static_mask)
    if padded_len == t:
        return static_mask
    if np.array_equal(static_mask, np.tri(t, dtype=bool)):
        return np.tri(padded_len, dtype=bool)
    padded = np.zeros((padded_len, padded_len), dtype=bool)
    padded[:t, :t] = static_mask
    padded[t:, t:] = np.tri(padded_len - t, dtype=bool)
    return padded


def _kernel_mask(static_mask: np.ndarray) -> splash.Mask:
    """The library's lazy causal mask (computed in the kernel, no mask tiles stored) when it fits, else a NumpyMask."""
    t = len(static_mask)
    if np.array_equal(static_mask, np.tri(t, dtype=bool)):
        return splash.CausalMask((t, t))
    return splash.NumpyMask(static_mask)


def _tile_multiple(block_sizes: splash.BlockSizes) -> int:
    fields = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
              "block_q_dq", "block_kv_dq")
    return math.lcm(*(getattr(block_sizes, f) for f in fields if getattr(block_sizes, f) is not None))


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
