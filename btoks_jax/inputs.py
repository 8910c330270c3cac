"""Model inputs with static shapes: built from Hugging Face processor outputs, and packed as `[Q | B | T]`.

Hugging Face concatenates the patches of every image in a batch into one array and scatters the
merged features over all pad tokens of the batch in row-major order. Here each sample carries its
own patches, padded to a patch budget, so the batch dimension can be sharded; `pack_hf_inputs`
does that re-packing on the host and is exactly equivalent.

`pack` lays out a batch for the BToks model, on the host, for training and inference alike: the
inputs left-padded into a static query region Q, the K bottleneck tokens B right after the last
real token (so they always sit in the same K columns; their M-RoPE positions continue from the last
real token, padding being invisible to attention and to positions), and an optional target region
T with the labels of the generative objective.

Legend: B batch, L = query_len + K + target_len, K bottleneck tokens, Lt target_len.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

from btoks_jax.mask import Layout
from btoks_jax.model_config import (
    BTOK_FIRST_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    Qwen2VLConfig,
)
from btoks_jax.rope_index import get_rope_index


@flax.struct.dataclass
class ModelInputs:
    """One batch for the model.

    input_ids          int32[B, T]
    positions          int32[3, B, T]   M-RoPE positions (temporal, height, width)
    segment_ids        int32[B, T]      1 for real tokens, 0 for padding
    vision_index       int32[B, T]      row of the sample's merged vision features, -1 for other tokens
    pixel_values       float32[B, P, C] flattened patches, P a multiple of merge**2 (may be 0)
    patch_positions    int32[B, P, 2]   (row, column) of each patch for the 2-D rotary
    patch_segment_ids  int32[B, P]      one id per (image, frame) group, 0 for padding
    """

    input_ids: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    vision_index: jax.Array
    pixel_values: jax.Array
    patch_positions: jax.Array
    patch_segment_ids: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def batch_axis(path) -> int:
    """The batch axis of the array at tree `path` in a batch: 1 for `positions` int[3, B, T] (the M-RoPE streams
    first), 0 for every other array (model inputs, labels, label masks)."""
    return 1 if any(getattr(key, "name", None) == "positions" for key in path) else 0


def vision_patch_positions(grid_thw, merge: int) -> np.ndarray:
    """int[t*h*w, 2] (row, column) per patch in the 2x2 merge-window order HF's processor emits."""
    t, h, w = (int(x) for x in grid_thw)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], -1), (t, 1))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def mm_token_type_ids_from_ids(input_ids: np.ndarray, config: Qwen2VLConfig) -> np.ndarray:
    """text 0, image 1, video 2, as transformers 5.x processors return them."""
    out = np.zeros_like(input_ids)
    out[input_ids == config.image_token_id] = 1
    out[input_ids == config.video_token_id] = 2
    return out


def pack_hf_inputs(hf: Mapping[str, Any], config: Qwen2VLConfig, *, rope_convention: str = "mm_token_type_ids",
                   patch_budget: int | None = None, positions: np.ndarray | None = None) -> ModelInputs:
    """Builds `ModelInputs` from what `Qwen2VLProcessor` returns (as NumPy arrays).

    Keys: input_ids, attention_mask, mm_token_type_ids (optional), pixel_values, image_grid_thw,
    pixel_values_videos, video_grid_thw. `rope_convention` picks how M-RoPE positions are derived
    (see `btoks_jax.rope_index`); `positions` int[3, B, T] overrides them. `patch_budget` pads
    every sample's patches to that count (default: the largest sample, rounded to merge**2).
    """
    vcfg = config.vision_config
    merge = vcfg.spatial_merge_size
    group = merge * merge
    input_ids = np.asarray(hf["input_ids"], np.int64)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    b, t = input_ids.shape
    attention_mask = np.asarray(hf.get("attention_mask", np.ones_like(input_ids)), np.int64)
    mm_types = hf.get("mm_token_type_ids")
    mm_types = mm_token_type_ids_from_ids(input_ids, config) if mm_types is None else np.asarray(mm_types)

    kinds = []  # (pad token id, pixel array, grids)
    for token_id, pix_key, grid_key in ((config.image_token_id, "pixel_values", "image_grid_thw"),
                                        (config.video_token_id, "pixel_values_videos", "video_grid_thw")):
        grids = hf.get(grid_key)
        grids = np.zeros((0, 3), np.int64) if grids is None else np.asarray(grids, np.int64).reshape(-1, 3)
        pixels = hf.get(pix_key)
        pixels = np.zeros((0, vcfg.patch_dim), np.float32) if pixels is None else np.asarray(pixels, np.float32)
        if pixels.shape[0] != int(grids.prod(-1).sum()):
            raise ValueError(f"{pix_key} has {pixels.shape[0]} patches but {grid_key} describes "
                             f"{int(grids.prod(-1).sum())}")
        kinds.append((token_id, pixels, grids, np.concatenate([[0], np.cumsum(grids.prod(-1))]), grid_key))

    if positions is None:
        positions, _ = get_rope_index(
            input_ids, mm_token_type_ids=mm_types, image_grid_thw=kinds[0][2] if len(kinds[0][2]) else None,
            video_grid_thw=kinds[1][2] if len(kinds[1][2]) else None, attention_mask=attention_mask,
            spatial_merge_size=merge, convention=rope_convention, image_token_id=config.image_token_id,
            video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id)

    # Assign whole images / videos to samples in row-major order of their pad tokens, as HF does.
    per_sample = [[] for _ in range(b)]  # list of (pixels, grid) per sample, images before videos
    vision_index = np.full((b, t), -1, np.int64)
    next_item = [0, 0]
    for i in range(b):
        offset = 0
        for kind, (token_id, pixels, grids, starts, grid_key) in enumerate(kinds):
            slots = np.nonzero(input_ids[i] == token_id)[0]
            need, taken = len(slots), 0
            while taken < need:
                j = next_item[kind]
                if j >= len(grids):
                    raise ValueError(f"sample {i}: {need} pad tokens of id {token_id} but {grid_key} runs out "
                                     f"after {taken} merged tokens")
                per_sample[i].append((pixels[starts[j]:starts[j + 1]], grids[j]))
                taken += int(grids[j].prod()) // group
                next_item[kind] += 1
            if taken != need:
                raise ValueError(f"sample {i}: {need} pad tokens of id {token_id} do not match whole items of "
                                 f"{grid_key} ({taken} merged tokens)")
            vision_index[i, slots] = offset + np.arange(need)
            offset += need
    for kind, (token_id, _, grids, _, grid_key) in enumerate(kinds):
        if next_item[kind] != len(grids):
            raise ValueError(f"{grid_key} has {len(grids)} items but the pad tokens of id {token_id} use only "
                             f"{next_item[kind]}")

    counts = [sum(len(px) for px, _ in items) for items in per_sample]
    budget = _round_up(max(counts, default=0), group) if patch_budget is None else patch_budget
    if max(counts, default=0) > budget or budget % group:
        raise ValueError(f"patch budget {budget} must be a multiple of {group} and hold {max(counts, default=0)}")
    pixel_values = np.zeros((b, budget, vcfg.patch_dim), np.float32)
    patch_positions = np.zeros((b, budget, 2), np.int32)
    patch_segment_ids = np.zeros((b, budget), np.int32)
    for i, items in enumerate(per_sample):
        cursor, segment = 0, 1
        for px, grid in items:
            n = len(px)
            pixel_values[i, cursor:cursor + n] = px
            patch_positions[i, cursor:cursor + n] = vision_patch_positions(grid, merge)
            frame = int(grid[1] * grid[2])
            patch_segment_ids[i, cursor:cursor + n] = segment + np.arange(n) // frame
            segment += int(grid[0])
            cursor += n
    return ModelInputs(
        input_ids=input_ids.astype(np.int32),
        positions=np.asarray(positions, np.int32),
        segment_ids=(attention_mask > 0).astype(np.int32),
        vision_index=vision_index.astype(np.int32),
        pixel_values=pixel_values,
        patch_positions=patch_positions,
        patch_segment_ids=patch_segment_ids,
    )


# ----------------------------------------------------------------------------- the [Q | B | T] packing (host side)


UNSCORED_IDS = (ENDOFTEXT_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_START_ID, VISION_END_ID)


def btok_token_ids(num_btoks: int, vocab_size: int) -> list[int]:
    """Ids carried in the BTok columns. Their embeddings are replaced by the BTok parameters, so the
    ids only matter for an exported checkpoint, where they are the `<|btok_i|>` vocabulary rows."""
    return [BTOK_FIRST_ID + i if BTOK_FIRST_ID + i < vocab_size else IM_END_ID for i in range(num_btoks)]


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
