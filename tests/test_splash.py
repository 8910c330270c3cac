"""The splash kernel (Pallas interpreter on CPU) against the dense attention path: values, gradients, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from btoks_jax.model import attention, splash

# Distinct small sizes so shape bugs show; 128 is the smallest tile the kernel takes with segment ids.
BATCH, QUERY_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 4, 2, 32, 128
QUERY_LEN, NUM_BTOKS, TARGET_LEN = 128, 4, 92  # [Q | B | T] = 224 tokens: splash pads it to 256
TOL = 1e-5


def condensation_mask() -> np.ndarray:
    """Causal, with the target -> query block cut (PAPER section 3)."""
    mask = np.tri(QUERY_LEN + NUM_BTOKS + TARGET_LEN, dtype=bool)
    mask[QUERY_LEN + NUM_BTOKS:, :QUERY_LEN] = False
    return mask


def condensation_segment_ids(batch: int = BATCH) -> np.ndarray:
    """Per sample a different padding: the query left-padded inside its region, the target right-padded."""
    real_query, real_target = [100, 61], [40, TARGET_LEN]
    ids = np.zeros((batch, QUERY_LEN + NUM_BTOKS + TARGET_LEN), np.int32)
    for i in range(batch):
        ids[i, QUERY_LEN - real_query[i % 2]: QUERY_LEN + NUM_BTOKS + real_target[i % 2]] = 1 + i % 2
    return ids


def causal_case():
    """A plain causal mask (the kernel's lazy CausalMask, no sequence padding) with left- and right-padding."""
    ids = np.ones((BATCH, 256), np.int32)
    ids[0, :37] = 0
    ids[1, 201:] = 0
    return np.tri(256, dtype=bool), ids


def tile_aligned_case():
    """[Q | B | T] = [252 | 4 | 100] padded to 384: the target's tile row starts on a tile edge, so its query tile
    is empty for the real rows and for the padding rows, and the kernel skips it."""
    q, b, t = 252, 4, 100
    mask = np.tri(q + b + t, dtype=bool)
    mask[q + b:, :q] = False
    ids = np.zeros((BATCH, q + b + t), np.int32)
    ids[0, 40:] = 1
    ids[1, :q + b + 70] = 2
    return mask, ids


CASES = {"causal": causal_case, "condensation": lambda: (condensation_mask(), condensation_segment_ids()),
         "condensation_tile_aligned": tile_aligned_case}


def random_qkv(batch: int, seq_len: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq_len, QUERY_HEADS, HEAD_DIM))
    k = rng.standard_normal((batch, seq_len, KV_HEADS, HEAD_DIM))
    v = rng.standard_normal((batch, seq_len, KV_HEADS, HEAD_DIM))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def splash_fn(static_mask, segment_ids):
    block_sizes = splash.block_sizes_for(len(static_mask), BLOCK)
    return lambda q, k, v: splash.splash_attention(q, k, v, jnp.asarray(segment_ids), static_mask, HEAD_DIM ** -0.5,
                                                   block_sizes=block_sizes)


def dense_fn(static_mask, segment_ids):
    mask = attention.dense_mask(jnp.asarray(segment_ids), jnp.asarray(segment_ids), static_mask)
    return lambda q, k, v: attention.dense_attention(q, k, v, mask, HEAD_DIM ** -0.5)


def max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_dense(case):
    static_mask, segment_ids = CASES[case]()
    q, k, v = random_qkv(BATCH, len(static_mask))
    got = jax.jit(splash_fn(static_mask, segment_ids))(q, k, v)
    want = dense_fn(static_mask, segment_ids)(q, k, v)
    assert got.shape == want.shape == q.shape
    # Every row is compared, padding included: the kernel must reproduce what the dense path does there too.
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_dense(case):
    static_mask, segment_ids = CASES[case]()
    q, k, v = random_qkv(BATCH, len(static_mask), seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    got = jax.jit(lambda *qkv: jax.vjp(splash_fn(static_mask, segment_ids), *qkv)[1](cotangent))(q, k, v)
    want = jax.vjp(dense_fn(static_mask, segment_ids), q, k, v)[1](cotangent)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert max_diff(g, w) <= TOL


@pytest.mark.parametrize("mesh_shape, axis_type", [((2, 2, 2), AxisType.Explicit), ((2, 1, 4), AxisType.Auto)])
def test_sharded_matches_unsharded(mesh_shape, axis_type):
    """Batch over (data, fsdp), heads over tensor. With tensor=4 the 2 kv heads do not split, so each is
    duplicated to give every head shard its own."""
    assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"
    static_mask, batch = condensation_mask(), 4
    segment_ids = condensation_segment_ids(batch)
    q, k, v = random_qkv(batch, len(static_mask), seed=3)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(splash_fn(static_mask, segment_ids)(q, k, v)))

    step = jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = jax.jit(step)(q, k, v)

    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    with jax.set_mesh(mesh):
        act_btnh = NamedSharding(mesh, P(("data", "fsdp")))
        sharded = [jax.device_put(x, act_btnh) for x in (q, k, v)]
        shard_maps = [e for e in jax.make_jaxpr(step)(*sharded).eqns if e.primitive.name == "shard_map"]
        got = jax.jit(step)(*sharded)
    # The kernel really runs per shard: batch over data and fsdp, heads over tensor.
    assert any(P(("data", "fsdp"), None, "tensor", None) in e.params["in_specs"] for e in shard_maps)
    if axis_type == AxisType.Explicit:
        assert got[1][0].sharding.spec == P(("data", "fsdp"), None, None, None)
    # Each shard runs the same per-sample kernel; the loss is a sum of ~1e5 terms (|loss| ~ 500) reduced in
    # another order across shards, so it is compared relative to its size, the gradients at the usual TOL.
    assert abs(float(got[0] - want[0])) <= 1e-6 * abs(float(want[0]))
    assert max_diff(got[1], want[1]) <= TOL


def test_block_skip_fraction():
    # 512 tokens in 4 x 4 tiles of 128: causal leaves the 6 tiles above the diagonal empty.
    causal = np.tri(512, dtype=bool)
    assert splash.block_skip_fraction(causal, 128, 128) == 6 / 16
    # [Q | B | T] = [256 | 128 | 128]: cutting T -> Q also empties the target row's 2 query tiles.
    condensation = causal.copy()
    condensation[384:, :256] = False
    assert splash.block_skip_fraction(condensation, 128, 128) == 8 / 16
    # Tiles of 128 x 256: 4 x 2, empty are (0, 1), (1, 1), and the target row's query tile (3, 0).
    assert splash.block_skip_fraction(condensation, 128, 256) == 3 / 8
    # 200 tokens are padded to 256 as the kernel pads them: of 2 x 2 tiles only the one above the diagonal is empty.
    assert splash.block_skip_fraction(np.tri(200, dtype=bool), 128, 128) == 1 / 4
    # Padding rows of a non-causal mask see only padding: [252 | 4 | 100] padded to 384 skips the 3 tiles above the
    # diagonal and the target row's query tile (2, 0), which padding rows seeing every column would keep alive.
    assert splash.block_skip_fraction(tile_aligned_case()[0], 128, 128) == 4 / 9


def test_block_sizes_and_mask_checks():
    assert splash.block_sizes_for(200).block_q == 256  # short sequences: one tile rounded up to 128
    assert splash.block_sizes_for(8192).block_kv_dq == splash.DEFAULT_BLOCK
    q, k, v = random_qkv(1, 128)
    no_diagonal = np.tri(128, k=-1, dtype=bool)
    with pytest.raises(ValueError, match="diagonal"):
        splash.splash_attention(q, k, v, jnp.ones((1, 128), jnp.int32), no_diagonal, HEAD_DIM ** -0.5)
