"""Model inputs with static shapes, and their construction from Hugging Face processor outputs.

Hugging Face concatenates the patches of every image in a batch into one array and scatters the
merged features over all pad tokens of the batch in row-major order. Here each sample carries its
own patches, padded to a patch budget, so the batch dimension can be sharded; `pack_hf_inputs`
does that re-packing on the host and is exactly equivalent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import numpy as np

from btoks_jax.config import Qwen2VLConfig
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
