"""The fused, chunked vocabulary projection + NTP loss (`losses.fused_token_nll_sum`) equals the full-logits loss:
values and gradients, for a plain head, the BToks model's tied head with its BTok rows, and inside the train step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_utils as U

from btoks_jax import losses, train_step

RTOL = 1e-5  # float32: only the order of the sums differs


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(float(np.abs(b).max()), 1e-30)
    assert float(np.abs(a - b).max()) <= rtol * scale, (float(np.abs(a - b).max()), scale)


def _case(seed=0, b=3, lt=10, d=12, v=50):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, lt, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, lt)), jnp.int32)
    mask = np.arange(lt)[None] < np.array([7, 3, 0])[:b, None]  # the last row generates nothing
    mask[0, 0] = False  # an unscored token inside a row
    weights = jnp.asarray(mask / mask.sum(), jnp.float32)
    return hidden, table, labels, weights


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 16])
def test_plain_head_loss_and_gradients(chunk):
    """Chunks that divide Lt, do not (the last one padded) or exceed it; all-zero chunks are skipped."""
    hidden, table, labels, weights = _case()

    def full(h, t, w):
        return jnp.sum(w * losses.token_nll(jnp.einsum("btd,vd->btv", h, t), labels))

    def fused(h, t, w):
        return losses.fused_token_nll_sum(lambda x: jnp.einsum("btd,vd->btv", x, t), h, labels, w, chunk=chunk)

    ref, ref_g = jax.value_and_grad(full, argnums=(0, 1))(hidden, table, weights)
    got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(hidden, table, weights)
    _close(got, ref)
    for g, r in zip(got_g, ref_g):  # d/d hidden, d/d table
        _close(g, r)
    assert np.all(np.asarray(got_g[2]) == 0)  # the weights are constants of the loss
    # Rows that are not scored get exactly zero gradient, as with the full logits.
    assert np.all(np.asarray(got_g[0])[2] == 0)


@pytest.mark.parametrize("groups,chunk,projected", [(1, 1, 2), (2, 1, 2), (2, 2, 1), (4, 1, 3)])
def test_only_chunks_holding_scored_positions_are_projected(groups, chunk, projected):
    """The scored positions of each group of rows are gathered at the front, so the head runs on
    ceil(most scored positions in a group / (chunk x rows per group)) chunks; the loss and gradients are the full
    logits'. Rows score 3, 1, 0 and 2 of 8 positions, some not at the start of their row."""
    rng = np.random.default_rng(4)
    b, lt, d, v = 4, 8, 6, 40
    hidden = jnp.asarray(rng.standard_normal((b, lt, d)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, (b, lt)), jnp.int32)
    mask = np.zeros((b, lt), bool)
    mask[0, [1, 2, 6]] = True
    mask[1, 7] = True
    mask[3, [0, 4]] = True
    weights = jnp.asarray(mask / mask.sum(), jnp.float32)
    calls = []

    def head(x, t):
        jax.debug.callback(lambda: calls.append(1))  # runs only when a chunk is projected
        return jnp.einsum("btd,vd->btv", x, t)

    def fused(h, t):
        return losses.fused_token_nll_sum(lambda x: head(x, t), h, labels, weights, chunk=chunk, groups=groups)

    ref, ref_g = jax.value_and_grad(lambda h, t: jnp.sum(weights * losses.token_nll(
        jnp.einsum("btd,vd->btv", h, t), labels)), argnums=(0, 1))(hidden, table)
    got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, table)
    jax.effects_barrier()
    assert len(calls) == projected, calls
    _close(got, ref)
    for g, r in zip(got_g, ref_g):
        _close(g, r)
    assert np.all(np.asarray(got_g[0])[~mask] == 0)  # unscored positions get exactly zero gradient
    with pytest.raises(ValueError, match="4 rows do not split into 3 groups"):
        losses.fused_token_nll_sum(lambda x: head(x, table), hidden, labels, weights, chunk=1, groups=3)


def test_bf16_head_matches_full_logits():
    """A bfloat16 head (the recipe's compute dtype): the same casts as the full path, so the same values."""
    hidden, table, labels, weights = _case(seed=1)
    hidden, table = hidden.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    head = lambda t: (lambda x: jnp.einsum("btd,vd->btv", x, t))  # noqa: E731
    ref, ref_g = jax.value_and_grad(lambda h, t: jnp.sum(weights * losses.token_nll(head(t)(h), labels)),
                                    argnums=(0, 1))(hidden, table)
    got, got_g = jax.value_and_grad(lambda h, t: losses.fused_token_nll_sum(head(t), h, labels, weights, chunk=4),
                                    argnums=(0, 1))(hidden, table)
    _close(got, ref, 1e-5)
    assert got_g[0].dtype == jnp.bfloat16
    for g, r in zip(got_g, ref_g):
        _close(g.astype(jnp.float32), r.astype(jnp.float32), 1e-2)  # bf16 gradients: one rounding apart


def test_btoks_tied_head_gradients_reach_the_btoks():
    """The model's own head (tied table, the BTok rows replaced by the BTok vectors): same loss and the same
    gradients for the hidden states, the BToks and the table."""
    from flax import nnx

    from btoks_jax.btoks import BToksModel
    from btoks_jax.model_config import tiny_config

    model = BToksModel(tiny_config(vocab_size=151700), 4, rngs=nnx.Rngs(0))
    model.btoks.value = model.btoks.value + 0.1 * jax.random.normal(jax.random.key(1), model.btoks.shape)
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.standard_normal((2, 6, 48)), jnp.float32)
    labels = np.asarray(rng.integers(0, 151700, (2, 6)), np.int32)
    labels[0, :2] = model.btok_ids[:2]  # targets that are the BTok rows themselves
    weights = jnp.full((2, 6), 1 / 12, jnp.float32)
    graphdef, state = nnx.split(model)

    def loss(state, h, fused):
        m = nnx.merge(graphdef, state)
        if fused:
            return losses.fused_token_nll_sum(m.target_logits, h, labels, weights, chunk=4)
        return jnp.sum(weights * losses.token_nll(m.target_logits(h), labels))

    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    ref, (ref_s, ref_h) = both(state, hidden, False)
    got, (got_s, got_h) = both(state, hidden, True)
    _close(got, ref)
    _close(got_h, ref_h)
    _close(got_s["btoks"].value, ref_s["btoks"].value)
    _close(got_s["backbone"]["model"]["embed_tokens"].value, ref_s["backbone"]["model"]["embed_tokens"].value)
    assert float(jnp.abs(got_s["btoks"].value).max()) > 0


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_train_step_flag_gives_the_same_loss_and_gradients(chunk_size):
    """`StepConfig.ntp_logits_chunk` in the joint step, with and without GradCache: same loss, same gradients."""
    model = U.model()
    batch, layouts = U.batch()
    g, params, frozen = train_step.split_model(model, "lora")
    cfg = train_step.StepConfig(objective="joint", chunk_size=chunk_size)
    out = {}
    for chunk in (0, 3):
        c = dataclasses.replace(cfg, ntp_logits_chunk=chunk)
        out[chunk] = jax.jit(lambda p, fr, b, c=c:
                             train_step.loss_and_grads(g, p, fr, b, layouts, jax.random.key(0), c)[1:])(params,
                                                                                                       frozen, batch)
    (m0, g0), (m3, g3) = out[0], out[3]
    assert float(m3["ntp"]) > 0
    for k in ("loss", "ntp", "info_nce"):
        _close(m3[k], m0[k])
    for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g0)):
        _close(a, b, 1e-4 if chunk_size else RTOL)


def test_the_gather_stays_on_each_batch_shard():
    """Under a mesh the groups are the batch shards: the compiled loss and gradient exchange only the two scalars
    (the loss sum and whether a chunk holds a scored position), never the hidden states; one group for the whole
    batch would move them (the check can fail)."""
    import re

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from btoks_jax import sharding

    assert jax.device_count() == 8, "tests/conftest.py must force 8 CPU devices"
    mesh = sharding.make_mesh(2, 2, 2)
    rng = np.random.default_rng(5)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    hidden = jax.device_put(jnp.asarray(rng.standard_normal((8, 16, 32)), jnp.float32), rows)
    table = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    labels = jax.device_put(jnp.asarray(rng.integers(0, 64, (8, 16)), jnp.int32), rows)
    weights = jax.device_put(jnp.asarray((rng.random((8, 16)) < 0.5) / 64, jnp.float32), rows)

    def collectives(groups):
        f = jax.jit(jax.value_and_grad(lambda h: losses.fused_token_nll_sum(
            lambda x: jnp.einsum("btd,vd->btv", x, table), h, labels, weights, chunk=2, groups=groups)))
        with jax.set_mesh(mesh), sharding.activation_sharding(mesh):
            text = f.lower(hidden).compile().as_text()
        return re.findall(r"= (\w+\[[\d,]*\])\S* (all-reduce|all-gather|all-to-all|collective-permute)\(", text)

    assert {shape for shape, _ in collectives(None)} == {"f32[]", "pred[]"}
    assert {shape for shape, _ in collectives(1)} - {"f32[]", "pred[]"}  # the hidden states move
