"""Bottleneck tokens: the K learnable vectors, and the embeddings pooled from their final states.

The model reads batches packed as `[Q | B | T]` (`btoks_jax.inputs.pack`): the K BToks sit in the
same K columns of every row, right after the last real input token, and an optional target region
follows for the generative objective.

Legend: B batch, L = query_len + K + target_len, D width, K bottleneck tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btoks_jax.head import AttentionPoolingConfig, AttentionPoolingHead
from btoks_jax.inputs import ModelInputs, encode_target, pack
from btoks_jax.mask import Layout, static_mask
from btoks_jax.model import Qwen2VL
from btoks_jax.model_config import BTOK_FIRST_ID, IM_END_ID, Qwen2VLConfig


def resolve_btok_ids(num_btoks: int, vocab_size: int, btok_ids: Sequence[int] | None) -> tuple[int, ...] | None:
    """The BToks' vocabulary rows: `btok_ids` checked against the vocabulary, or the default 151657.. when
    those rows exist; None when there are no rows to tie to."""
    if btok_ids is None:
        if not num_btoks or BTOK_FIRST_ID + num_btoks > vocab_size:
            return None
        return tuple(range(BTOK_FIRST_ID, BTOK_FIRST_ID + num_btoks))
    ids = tuple(int(i) for i in btok_ids)
    if len(ids) != num_btoks or len(set(ids)) != num_btoks or not all(0 <= i < vocab_size for i in ids):
        raise ValueError(f"btok_ids {list(ids)} must be {num_btoks} distinct rows of the {vocab_size}-row vocabulary")
    return ids


class BTokParam(nnx.Param):
    """The K bottleneck-token vectors: trained in every mode, LoRA included."""


class BToksModel(nnx.Module):
    """A Qwen2-VL backbone that carries K bottleneck-token vectors and embeds by pooling them."""

    def __init__(self, config: Qwen2VLConfig, num_btoks: int = 4, *, rngs: nnx.Rngs,
                 backbone: Qwen2VL | None = None, btok_ids: Sequence[int] | None = None,
                 head: AttentionPoolingConfig | None = None):
        """`btok_ids`: the vocabulary rows of `<|btok_0|>`..`<|btok_{K-1}|>` in the tokenizer the model comes
        with (a Hugging Face directory's added tokens); None: 151657.. where the vocabulary has those rows,
        else no rows at all (the BToks are then parameters only, as in the tiny presets). `head`: the v2
        variant's learned attention pooling over the BToks (`btoks_jax.head`); None: their mean."""
        self.config = config
        self.num_btoks = num_btoks
        self.btok_ids = resolve_btok_ids(num_btoks, config.text_config.vocab_size, btok_ids)
        if head is not None and not num_btoks:
            raise ValueError("a pooling head needs BToks (num_btoks > 0)")
        self.head = nnx.data(AttentionPoolingHead(config.text_config.hidden_size, head, rngs=rngs)
                             if head is not None else None)
        self.backbone = backbone if backbone is not None else Qwen2VL(config, rngs=rngs)
        table = self.backbone.model.embed_tokens.value
        # The authors' stated intent: every BTok starts as the <|im_end|> (EOS) embedding.
        init = jnp.broadcast_to(table[min(IM_END_ID, table.shape[0] - 1)], (num_btoks, table.shape[1]))
        # K = 0 (last-token pooling) carries no BTok parameter at all: checkpoints cannot hold empty arrays.
        self.btoks = nnx.data(BTokParam(jnp.asarray(init, table.dtype), sharding_names=(None, "embed"),
                                        eager_sharding=False) if num_btoks else None)

    def forward(self, inputs: ModelInputs, layout: Layout, *, mask_mode: str = "condensation",
                vision_features: jax.Array | None = None, start: int = 0):
        """Final hidden states float[B, L - start, D] of columns `start..` of a packed `[Q | B | T]` batch;
        `vision_features` the batch's `backbone.vision_features` when they were computed before (default: the
        vision tower runs). `start = read_start(layout, pooling)` returns what pooling and the target region
        read, and spares the last layer the work of the other columns."""
        backbone = self.backbone
        embeds = backbone.embed_inputs(inputs, vision_features)  # [B, L, D]
        if self.num_btoks:
            btoks = jnp.broadcast_to(self.btoks.value.astype(embeds.dtype)[None], (embeds.shape[0],) + self.btoks.shape)
            embeds = embeds.at[:, layout.btok_slice].set(btoks)
        return backbone.decode(embeds, inputs, static_mask(layout, mask_mode), start)

    def __call__(self, inputs: ModelInputs, layout: Layout, *, pooling: str = "btoks",
                 mask_mode: str = "condensation", target_logits: bool = False,
                 vision_features: jax.Array | None = None):
        """Returns (embeddings float32[B, D], L2-normalised; target-region logits float[B, Lt, V] or None)."""
        emb, target = self.embed_and_target(inputs, layout, pooling=pooling, mask_mode=mask_mode,
                                            vision_features=vision_features)
        return emb, (self.target_logits(target) if target_logits and layout.target_len else None)

    def embed_and_target(self, inputs: ModelInputs, layout: Layout, *, pooling: str = "btoks",
                         mask_mode: str = "condensation", vision_features: jax.Array | None = None):
        """(embeddings float32[B, D], L2-normalised; the target region's final hidden states float[B, Lt, D]),
        from one forward pass over the columns from `read_start(layout, pooling)` on."""
        start = read_start(layout, pooling)
        hidden = self.forward(inputs, layout, mask_mode=mask_mode, vision_features=vision_features, start=start)
        return self.pool(hidden, layout, pooling, start), hidden[:, _shift(layout.target_slice, start)]

    def pool(self, hidden: jax.Array, layout: Layout, pooling: str = "btoks", start: int = 0) -> jax.Array:
        """float32[B, D] L2-normalised: `pool`, or with a head, the head over the BToks' final states. `hidden`
        holds columns `start..` (`forward(..., start=start)`)."""
        if self.head is None or pooling != "btoks":
            return pool(hidden, layout, pooling, start)
        return _normalise(self.head(hidden[:, _shift(layout.btok_slice, start)]))

    def target_logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, Lt, V]. With a tied head the BTok vectors are also the `<|btok_i|>` output rows,
        exactly as in the authors' model, where the BToks are vocabulary rows of the tied table.

        The K BTok columns are their own [Lt, D] x [D, K] product, written over the table's columns, rather
        than the BTok vectors written into a copy of the [V, D] table: the values are the same, but the
        gradient to the BToks is then that small product's, not the [V, D] gradient of the whole table from
        which K rows would be taken (a third of the projection's work when the table is frozen, as under
        LoRA). With a trainable table its BTok rows get no gradient from the logits either way."""
        backbone = self.backbone
        if backbone.lm_head is not None or not self.num_btoks or self.btok_ids is None:
            return backbone.logits(hidden)
        table = backbone.model.embed_tokens.value
        logits = jnp.einsum("btd,vd->btv", hidden, table.astype(hidden.dtype))
        btoks = self.btoks.value.astype(table.dtype).astype(hidden.dtype)
        return logits.at[..., np.asarray(self.btok_ids)].set(jnp.einsum("btd,kd->btk", hidden, btoks))


def read_start(layout: Layout, pooling: str = "btoks") -> int:
    """The first column whose final state `pool` or the target region reads: the first BTok's (the BToks and
    the target region follow it), or the last input token's for `last` pooling."""
    _check_pooling(layout, pooling)
    return layout.query_len + layout.num_btoks - 1 if pooling == "last" else layout.query_len


def _check_pooling(layout: Layout, pooling: str) -> None:
    if pooling == "btoks" and layout.num_btoks == 0:
        raise ValueError("btoks pooling needs num_btoks > 0; use pooling='last' for K = 0")
    if pooling not in ("btoks", "last"):
        raise ValueError(f"unknown pooling {pooling!r}; choose 'btoks' or 'last'")


def _shift(cols: slice, start: int) -> slice:
    return slice(cols.start - start, cols.stop - start)


def pool(hidden: jax.Array, layout: Layout, pooling: str = "btoks", start: int = 0) -> jax.Array:
    """float32[B, D] L2-normalised: the mean of the BToks' final states, or the last input token's. `hidden`
    holds columns `start..` of the layout (0: all of them).

    With the left-padded query region the last input token (the BToks' predecessor) is always the
    column just before the BToks, so `last` pooling over a K = 0 layout is VLM2Vec's EOS pooling.
    """
    _check_pooling(layout, pooling)
    if pooling == "btoks":
        vec = hidden[:, _shift(layout.btok_slice, start)].astype(jnp.float32).mean(axis=1)
    else:
        vec = hidden[:, layout.query_len + layout.num_btoks - 1 - start].astype(jnp.float32)
    return _normalise(vec)


def _normalise(vec: jax.Array) -> jax.Array:
    return vec / jnp.maximum(jnp.linalg.norm(vec, axis=-1, keepdims=True), 1e-12)


def generative_loss(model: BToksModel, hf_query: Mapping[str, Any], target_texts: Sequence[str], tokenizer, *,
                    mask_mode: str = "condensation", target_len: int | None = None, reduction: str = "sample_mean",
                    rope_convention: str = "mm_token_type_ids"):
    """The GIC objective from outside the training loop, for checking the method: the trainer's own target
    encoding and packing (`btoks_jax.inputs`), then the model and `losses.ntp_loss`.

    `hf_query` is what a Hugging Face Qwen2-VL processor returns for the query side (NumPy arrays,
    either padding side); `target_texts[i]` is the text sample i's BToks must generate. Returns
    (per-sample loss float32[B], scored target logits: a list of float32[n_i, V] arrays, the logits
    that predict each sample's scored tokens, and the mean loss under `reduction`).
    """
    from btoks_jax.losses import ntp_loss

    targets = [encode_target(tokenizer, t, target_len) for t in target_texts]
    length = target_len or max(len(ids) for ids, _ in targets)
    packed = pack(hf_query, model.config, num_btoks=model.num_btoks, targets=targets, target_len=length,
                  rope_convention=rope_convention)
    _, logits = model(packed.inputs, packed.layout, pooling="btoks" if model.num_btoks else "last",
                      mask_mode=mask_mode, target_logits=True)
    loss, per_sample = ntp_loss(logits, packed.labels, packed.label_mask, reduction=reduction)
    logits = np.asarray(logits)
    scored = [logits[i][packed.label_mask[i]] for i in range(logits.shape[0])]
    return np.asarray(per_sample), scored, float(loss)


__all__ = ["BToksModel", "BTokParam", "pool", "generative_loss"]
