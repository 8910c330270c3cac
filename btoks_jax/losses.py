"""The two objectives: contrastive InfoNCE and the condensation-masked next-token loss (GIC).

Legend: B batch, D embedding width, Lt target length, V vocab, C candidates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from btoks_jax import sharding


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """float32[B, Lt] negative log-likelihood of `labels` under `logits` float[B, Lt, V]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def fused_token_nll_sum(project: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                        weights: jax.Array, *, chunk: int, groups: int | None = None) -> jax.Array:
    """sum(weights * token_nll(project(hidden), labels)) without ever holding the whole [B, Lt, V] logits, and
    projecting only about as many positions as are scored.

    `project` is a linear head, float[..., c, D] -> logits float[..., c, V] (e.g. `BToksModel.target_logits`);
    hidden float[B, Lt, D], labels int[B, Lt], weights float32[B, Lt]. The rows are split into `groups` groups of
    consecutive rows (default: the current mesh's batch shards, `sharding.current_shards("batch")`, so a group is
    one shard's rows and nothing moves between devices), and within each group the scored positions (weight != 0)
    are moved to the front, in order. The positions are then taken `chunk` per row of a group at a time: the
    chunk's logits, its token losses and, since the result is a weighted sum whose cotangent is one scalar, its
    gradients with respect to `hidden` and to every array the head reads, all in one pass (three matmuls a chunk, as
    the full logits' forward and backward take, no recomputation). Chunks whose weights are all zero (the padding of
    a target region, gathered at the back) are skipped, so the head projects ceil(scored / chunk) chunks of the
    group holding the most scored positions, not the whole region; `weights` are constants here: no gradient flows
    to them. Each token's loss and gradient are the operations `token_nll` and its derivative apply to the full
    logits, so the result equals the full-logits loss up to the order of the float sums. Peak memory holds one
    chunk's logits, [B, chunk, V], instead of all of them; gradients nobody asks for (a frozen table's) are dropped
    by the compiler.
    """
    b, lt = hidden.shape[:2]
    groups = groups or sharding.current_shards("batch")
    if b % groups:
        raise ValueError(f"{b} rows do not split into {groups} groups")
    rows = b // groups
    # Groups that the batch shards split evenly stay on their shards; other groups are left to the compiler.
    pinned = groups % sharding.current_shards("batch") == 0

    def by_group(x):
        x = x.reshape(groups, rows * lt, *x.shape[2:])
        return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if pinned else x

    hidden, labels, weights = by_group(hidden), by_group(labels), by_group(weights)
    # Scored first, each group's positions otherwise in order (a stable sort of a boolean key).
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    hidden, labels, weights = take(hidden), take(labels), take(weights)
    chunk = chunk * rows
    n = -(-(rows * lt) // chunk)
    pad = n * chunk - rows * lt
    if pad:  # whole chunks: the padding weighs 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    fn, consts = jax.closure_convert(project, hidden[:, :chunk])
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    return _fused_nll(fn, chunk, hidden, labels.astype(jnp.int32), weights, *consts)


def _fused_nll_pass(fn, chunk, hidden, labels, weights, consts):
    """(loss, d loss / d hidden, d loss / d consts): the chunked forward pass with its gradients."""
    b, lt = hidden.shape[:2]
    n = lt // chunk
    grads_of = [jnp.issubdtype(c.dtype, jnp.inexact) for c in consts]
    by_chunk = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  [N, B, c, ...]

    def compute(h, lab, w):
        def head(h, *float_consts):
            it = iter(float_consts)
            return fn(h, *[next(it) if g else c for c, g in zip(consts, grads_of)])

        logits, vjp = jax.vjp(head, h, *[c for c, g in zip(consts, grads_of) if g])
        logits32 = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits32, axis=-1)
        picked = jnp.take_along_axis(logits32, lab[..., None], axis=-1)[..., 0]
        nll = lse - picked
        # d nll / d logits = softmax - onehot(label), each token weighted.
        onehot = jnp.arange(logits32.shape[-1], dtype=jnp.int32) == lab[..., None]
        dlogits = w[..., None] * (jnp.exp(logits32 - lse[..., None]) - onehot.astype(jnp.float32))
        dh, *dconsts = vjp(dlogits.astype(logits.dtype))
        return jnp.sum(w * nll), dh, dconsts

    def zeros(h, lab, w):
        return jnp.float32(0.0), jnp.zeros_like(h), [jnp.zeros_like(c) for c, g in zip(consts, grads_of) if g]

    def body(carry, x):
        loss, dconsts = carry
        h, lab, w = x
        s, dh, dc = jax.lax.cond(jnp.any(w != 0), compute, zeros, h, lab, w)
        return (loss + s, [a + c.astype(a.dtype) for a, c in zip(dconsts, dc)]), dh

    init = (jnp.float32(0.0), [jnp.zeros(c.shape, c.dtype) for c, g in zip(consts, grads_of) if g])
    (loss, dconsts), dh = jax.lax.scan(body, init, (by_chunk(hidden), by_chunk(labels), by_chunk(weights)))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, lt, *x.shape[3:])  # noqa: E731
    it = iter(dconsts)
    full = [next(it) if g else None for g in grads_of]
    return loss, unchunk(dh).astype(hidden.dtype), full


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_nll(fn, chunk, hidden, labels, weights, *consts):
    return _fused_nll_pass(fn, chunk, hidden, labels, weights, consts)[0]


def _fused_nll_fwd(fn, chunk, hidden, labels, weights, *consts):
    loss, dh, dconsts = _fused_nll_pass(fn, chunk, hidden, labels, weights, consts)
    return loss, (dh, dconsts, labels, weights, consts)


def _fused_nll_bwd(fn, chunk, residuals, g):
    dh, dconsts, labels, weights, consts = residuals
    cotangents = [(g * d).astype(c.dtype) if d is not None else _zero_cotangent(c) for d, c in zip(dconsts, consts)]
    return ((g * dh).astype(dh.dtype), _zero_cotangent(labels), jnp.zeros_like(weights), *cotangents)


def _zero_cotangent(x):
    """The cotangent of an integer input: float0 zeros."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def ntp_token_weights(label_masks: list[jax.Array], *, reduction: str = "sample_mean",
                      chunk_size: int = 8) -> list[jax.Array]:
    """Per-token weights float32[B, Lt] (one array per generating side) such that the NTP loss is
    sum(weights * nll). Linear in the token losses, so any split into GradCache chunks sums to the
    full-batch loss exactly.

    reduction:
      "sample_mean"       each generating sample's token mean, averaged over the generating samples of
                          all sides; independent of chunking and device count (the default).
      "chunk_token_mean"  the authors' GradCache form: a token mean inside each group of `chunk_size`
                          consecutive samples, weighted by (generating samples in the group) / B.
    """
    masks = [m.astype(jnp.float32) for m in label_masks]
    if reduction == "sample_mean":
        counts = [m.sum(-1, keepdims=True) for m in masks]
        total = sum(jnp.sum(c > 0) for c in counts)
        return [m / jnp.maximum(c, 1.0) / jnp.maximum(total, 1) for m, c in zip(masks, counts)]
    if reduction == "chunk_token_mean":
        out = []
        for m in masks:
            b, lt = m.shape
            if not lt:  # a side packed without a target region
                out.append(m)
                continue
            if b % chunk_size:
                raise ValueError(f"batch {b} is not a multiple of the chunk size {chunk_size}")
            g = m.reshape(-1, chunk_size, lt)
            ntok = g.sum((1, 2), keepdims=True)
            gen = (g.sum(2, keepdims=True) > 0).sum(1, keepdims=True)
            out.append((g * gen / jnp.maximum(ntok, 1.0) / b).reshape(b, lt))
        return out
    raise ValueError(f"unknown reduction {reduction!r}")


def ntp_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array, *, reduction: str = "sample_mean",
             chunk_size: int = 8) -> tuple[jax.Array, jax.Array]:
    """Next-token loss over the scored target tokens of one side (see `ntp_token_weights`).

    Returns (loss scalar, per-sample token means float32[B], 0 for samples that do not generate).
    """
    nll = token_nll(logits, labels)
    (weights,) = ntp_token_weights([label_mask], reduction=reduction, chunk_size=chunk_size)
    counts = label_mask.sum(-1)
    per_sample = (nll * label_mask).sum(-1) / jnp.maximum(counts, 1)
    return jnp.sum(weights * nll), per_sample


def info_nce(query: jax.Array, positive: jax.Array, *, temperature: float = 0.02, symmetric: bool = False,
             hard_negatives: jax.Array | None = None, hard_negative_mask: jax.Array | None = None) -> jax.Array:
    """InfoNCE of query -> positive over the whole (global) batch.

    query, positive float[B, D] (normalised here); hard_negatives float[B, H, D] are extra candidates
    shared by every query (as in VLM2Vec), masked by hard_negative_mask bool[B, H] when some are absent.
    Inside `jit` over sharded inputs XLA gathers the candidates: the negatives are global by construction.
    """
    q = _normalise(query)
    p = _normalise(positive)
    b = q.shape[0]
    logits = q @ p.T / temperature  # [B, B]
    if hard_negatives is not None:
        hn = _normalise(hard_negatives).reshape(-1, q.shape[-1])  # [B*H, D]
        extra = q @ hn.T / temperature  # [B, B*H]
        if hard_negative_mask is not None:
            extra = jnp.where(hard_negative_mask.reshape(1, -1), extra, -jnp.inf)
        logits = jnp.concatenate([logits, extra], axis=1)
    targets = jnp.arange(b)
    loss = _cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + _cross_entropy((p @ q.T) / temperature, targets))
    return loss


def ntp_weight(step: int, *, weight: float = 5.0, until_step: int | None = None) -> float:
    """lambda(step): `weight` while step < until_step (None: the whole run), then 0. A host-side schedule:
    `train_step.config_at` turns it into the step program to run, so a compiled step holds a constant lambda."""
    return float(weight) if until_step is None or step < until_step else 0.0


def _normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0])
