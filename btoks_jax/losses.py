"""The two objectives: contrastive InfoNCE and the condensation-masked next-token loss (GIC).

Legend: B batch, D embedding width, Lt target length, V vocab, C candidates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """float32[B, Lt] negative log-likelihood of `labels` under `logits` float[B, Lt, V]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - picked


def ntp_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array, *, reduction: str = "sample_mean",
             chunk_size: int = 8) -> tuple[jax.Array, jax.Array]:
    """Next-token loss over the scored target tokens.

    reduction:
      "sample_mean"       each generating sample's token mean, averaged over generating samples; does
                          not depend on chunking or device count (the default).
      "chunk_token_mean"  the authors' GradCache form: a token mean inside each chunk of `chunk_size`
                          consecutive samples, weighted by (generating samples in the chunk) / B.
    Returns (loss scalar, per-sample token means float32[B], 0 for samples that do not generate).
    """
    nll = token_nll(logits, labels) * label_mask
    counts = label_mask.sum(-1)
    per_sample = nll.sum(-1) / jnp.maximum(counts, 1)
    generating = counts > 0
    if reduction == "sample_mean":
        loss = jnp.sum(per_sample * generating) / jnp.maximum(generating.sum(), 1)
    elif reduction == "chunk_token_mean":
        b = nll.shape[0]
        if b % chunk_size:
            raise ValueError(f"batch {b} is not a multiple of the chunk size {chunk_size}")
        tok = nll.sum(-1).reshape(-1, chunk_size).sum(-1)
        ntok = counts.reshape(-1, chunk_size).sum(-1)
        gen = generating.reshape(-1, chunk_size).sum(-1)
        loss = jnp.sum(tok / jnp.maximum(ntok, 1) * gen) / b
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss, per_sample


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


def ntp_weight(step: jax.Array | int, *, weight: float = 5.0, until_step: int | None = None) -> jax.Array:
    """lambda(step): `weight` while step < until_step (None: the whole run), then 0."""
    if until_step is None:
        return jnp.asarray(weight, jnp.float32)
    return jnp.where(jnp.asarray(step) < until_step, weight, 0.0).astype(jnp.float32)


def _normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(lse - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0])
