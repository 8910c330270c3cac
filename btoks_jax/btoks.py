"""Bottleneck tokens: the K learnable vectors, the `[Q | B | T]` packing, and pooled embeddings.

The K BToks are appended right after the last real token of every input. Inputs are packed
left-padded into a static query region so the BToks always sit in the same K columns; their
M-RoPE positions continue from the last real token (padding is invisible to attention and to
positions), and an optional target region follows for the generative objective.

Legend: B batch, L = query_len + K + target_len, D width, K bottleneck tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from btoks_jax.config import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    Qwen2VLConfig,
)
from btoks_jax.head import AttentionPoolingConfig, AttentionPoolingHead
from btoks_jax.inputs import ModelInputs, mm_token_type_ids_from_ids, pack_hf_inputs
from btoks_jax.mask import Layout, static_mask
from btoks_jax.model import Qwen2VL

BTOK_FIRST_ID = 151657  # `<|btok_0|>` in the authors' tokenizer: the first id after Qwen2-VL's specials.
UNSCORED_IDS = (ENDOFTEXT_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_START_ID, VISION_END_ID)


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


def btok_token_ids(num_btoks: int, vocab_size: int) -> list[int]:
    """Ids carried in the BTok columns. Their embeddings are replaced by the BTok parameters, so the
    ids only matter for an exported checkpoint, where they are the `<|btok_i|>` vocabulary rows."""
    return [BTOK_FIRST_ID + i if BTOK_FIRST_ID + i < vocab_size else IM_END_ID for i in range(num_btoks)]


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

    def forward(self, inputs: ModelInputs, layout: Layout, *, mask_mode: str = "condensation"):
        """Final hidden states float[B, L, D] of a packed `[Q | B | T]` batch."""
        backbone = self.backbone
        embeds = backbone.embed_inputs(inputs)  # [B, L, D]
        if self.num_btoks:
            btoks = jnp.broadcast_to(self.btoks.value.astype(embeds.dtype)[None], (embeds.shape[0],) + self.btoks.shape)
            embeds = embeds.at[:, layout.btok_slice].set(btoks)
        return backbone.decode(embeds, inputs, static_mask(layout, mask_mode))

    def __call__(self, inputs: ModelInputs, layout: Layout, *, pooling: str = "btoks",
                 mask_mode: str = "condensation", target_logits: bool = False):
        """Returns (embeddings float32[B, D], L2-normalised; target-region logits float[B, Lt, V] or None)."""
        hidden = self.forward(inputs, layout, mask_mode=mask_mode)
        emb = self.pool(hidden, layout, pooling)
        logits = None
        if target_logits and layout.target_len:
            logits = self.target_logits(hidden[:, layout.target_slice])
        return emb, logits

    def pool(self, hidden: jax.Array, layout: Layout, pooling: str = "btoks") -> jax.Array:
        """float32[B, D] L2-normalised: `pool`, or with a head, the head over the BToks' final states."""
        if self.head is None or pooling != "btoks":
            return pool(hidden, layout, pooling)
        return _normalise(self.head(hidden[:, layout.btok_slice]))

    def target_logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, Lt, V]. With a tied head the BTok vectors are also the `<|btok_i|>` output rows,
        exactly as in the authors' model, where the BToks are vocabulary rows of the tied table."""
        backbone = self.backbone
        if backbone.lm_head is not None or not self.num_btoks or self.btok_ids is None:
            return backbone.logits(hidden)
        table = backbone.model.embed_tokens.value
        table = table.at[np.asarray(self.btok_ids)].set(self.btoks.value.astype(table.dtype))
        return jnp.einsum("btd,vd->btv", hidden, table.astype(hidden.dtype))


def pool(hidden: jax.Array, layout: Layout, pooling: str = "btoks") -> jax.Array:
    """float32[B, D] L2-normalised: the mean of the BToks' final states, or the last input token's.

    With the left-padded query region the last input token (the BToks' predecessor) is always the
    column just before the BToks, so `last` pooling over a K = 0 layout is VLM2Vec's EOS pooling.
    """
    if pooling == "btoks":
        if layout.num_btoks == 0:
            raise ValueError("btoks pooling needs num_btoks > 0; use pooling='last' for K = 0")
        vec = hidden[:, layout.btok_slice].astype(jnp.float32).mean(axis=1)
    elif pooling == "last":
        vec = hidden[:, layout.query_len + layout.num_btoks - 1].astype(jnp.float32)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose 'btoks' or 'last'")
    return _normalise(vec)


def _normalise(vec: jax.Array) -> jax.Array:
    return vec / jnp.maximum(jnp.linalg.norm(vec, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- host-side packing


def encode_target(tokenizer, text: str, max_len: int | None = None) -> tuple[list[int], int]:
    """`<|im_start|>assistant\\n` + text + `<|im_end|>`, each piece tokenised separately (as the
    authors do). Returns (ids, prefix length); the text is truncated to fit `max_len`."""
    prefix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_len is not None:
        room = max_len - len(prefix) - 1
        if room < 0:
            raise ValueError(f"target budget {max_len} cannot hold the {len(prefix) + 1} wrapper tokens")
        body = body[:room]
    return prefix + body + [IM_END_ID], len(prefix)


@dataclasses.dataclass
class PackedBatch:
    """A packed `[Q | B | T]` batch and its generative labels.

    labels      int32[B, Lt]  the token each target-region position predicts (next token)
    label_mask  bool[B, Lt]   which of those predictions are scored
    """

    inputs: ModelInputs
    layout: Layout
    labels: np.ndarray
    label_mask: np.ndarray


def _left_align(hf: Mapping[str, Any], width: int) -> dict[str, np.ndarray]:
    """Re-pads token arrays on the left to `width` columns, whatever side the processor padded."""
    ids = np.asarray(hf["input_ids"])
    mask = np.asarray(hf.get("attention_mask", np.ones_like(ids)))
    types = hf.get("mm_token_type_ids")
    out_ids = np.full((ids.shape[0], width), ENDOFTEXT_ID, ids.dtype)
    out_mask = np.zeros((ids.shape[0], width), mask.dtype)
    out_types = np.zeros((ids.shape[0], width), np.int64)
    for i in range(ids.shape[0]):
        real = mask[i].astype(bool)
        n = int(real.sum())
        if n > width:
            raise ValueError(f"sample {i}: {n} input tokens exceed the query budget of {width}")
        out_ids[i, width - n:] = ids[i][real]
        out_mask[i, width - n:] = 1
        if types is not None:
            out_types[i, width - n:] = np.asarray(types)[i][real]
    return {"input_ids": out_ids, "attention_mask": out_mask,
            "mm_token_type_ids": out_types if types is not None else None}


def pack(hf: Mapping[str, Any], config: Qwen2VLConfig, *, num_btoks: int, query_len: int | None = None,
         targets: Sequence[tuple[Sequence[int], int] | None] | None = None, target_len: int = 0,
         rope_convention: str = "mm_token_type_ids", patch_budget: int | None = None) -> PackedBatch:
    """Packs processor outputs (either padding side) into a static `[Q | B | T]` batch.

    `targets[i]` is (token ids, prefix length) from `encode_target`, or None for a sample that does
    not generate. Target positions are the target's own positions plus the number of real tokens
    in `[Q ; B]`, as if the target followed the whole input.
    """
    ids = np.asarray(hf["input_ids"])
    width = query_len or int(np.asarray(hf.get("attention_mask", np.ones_like(ids))).sum(-1).max())
    q = _left_align(hf, width)
    b = ids.shape[0]
    btok_ids = np.array(btok_token_ids(num_btoks, config.text_config.vocab_size), np.int64)
    qb = {
        "input_ids": np.concatenate([q["input_ids"], np.broadcast_to(btok_ids, (b, num_btoks))], 1),
        "attention_mask": np.concatenate([q["attention_mask"], np.ones((b, num_btoks), np.int64)], 1),
    }
    types = q["mm_token_type_ids"]
    if types is None:
        types = mm_token_type_ids_from_ids(q["input_ids"], config)
    qb["mm_token_type_ids"] = np.concatenate([types, np.zeros((b, num_btoks), np.int64)], 1)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        qb[key] = hf.get(key)
    positions = None
    if hf.get("image_grid_thw") is None and hf.get("video_grid_thw") is None:
        # Text only: transformers would count left padding into the positions; RoPE is relative, but
        # counting only real tokens makes the packed batch independent of its padding, bit for bit.
        real = qb["attention_mask"]
        positions = np.broadcast_to(np.maximum(np.cumsum(real, -1) - 1, 0) * real, (3, b, real.shape[1]))
    inputs = pack_hf_inputs(qb, config, rope_convention=rope_convention, patch_budget=patch_budget,
                            positions=positions)
    layout = Layout(width, num_btoks, target_len)
    labels = np.zeros((b, target_len), np.int32)
    label_mask = np.zeros((b, target_len), bool)
    if not target_len:
        return PackedBatch(inputs, layout, labels, label_mask)

    t_ids = np.full((b, target_len), ENDOFTEXT_ID, np.int32)
    t_seg = np.zeros((b, target_len), np.int32)
    offsets = qb["attention_mask"].sum(-1)  # real tokens in [Q ; B]
    for i, target in enumerate(targets or [None] * b):
        if target is None:
            continue
        tokens, prefix_len = target
        n = len(tokens)
        if n > target_len:
            raise ValueError(f"sample {i}: target of {n} tokens exceeds the target budget {target_len}")
        t_ids[i, :n] = tokens
        t_seg[i, :n] = 1
        nxt = np.asarray(tokens[1:], np.int32)
        labels[i, : n - 1] = nxt
        scored = np.arange(1, n) >= prefix_len  # the wrapper prefix is fed but never predicted
        scored &= ~np.isin(nxt, UNSCORED_IDS)
        label_mask[i, : n - 1] = scored
    # Text-only target: its own positions are 0..n-1 on every M-RoPE axis.
    t_pos = np.arange(target_len)[None, :] + offsets[:, None]
    positions = np.concatenate([inputs.positions, np.broadcast_to(t_pos, (3, b, target_len))], axis=2)
    inputs = ModelInputs(
        input_ids=np.concatenate([inputs.input_ids, t_ids], 1),
        positions=positions.astype(np.int32),
        segment_ids=np.concatenate([inputs.segment_ids, t_seg], 1),
        vision_index=np.concatenate([inputs.vision_index, np.full((b, target_len), -1, np.int32)], 1),
        pixel_values=inputs.pixel_values,
        patch_positions=inputs.patch_positions,
        patch_segment_ids=inputs.patch_segment_ids,
    )
    return PackedBatch(inputs, layout, labels, label_mask)




def generative_loss(model: BToksModel, hf_query: Mapping[str, Any], target_texts: Sequence[str], tokenizer, *,
                    mask_mode: str = "condensation", target_len: int | None = None, reduction: str = "sample_mean",
                    rope_convention: str = "mm_token_type_ids"):
    """The GIC objective from outside the training loop, for checking the method.

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


__all__ = ["BToksModel", "BTokParam", "PackedBatch", "pack", "pool", "encode_target", "btok_token_ids",
           "generative_loss", "IM_START_ID"]
