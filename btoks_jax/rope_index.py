"""Qwen2-VL multimodal RoPE (M-RoPE) position ids, computed on the host with NumPy."""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

from btoks_jax.model_config import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_START_ID

Convention = Literal["mm_token_type_ids", "legacy"]

# Values of `mm_token_type_ids`, as the transformers 5.x processor writes them.
TEXT, IMAGE, VIDEO = 0, 1, 2
_KIND_NAMES = {IMAGE: "image", VIDEO: "video"}


def get_rope_index(
    input_ids,
    *,
    mm_token_type_ids=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    spatial_merge_size: int = 2,
    convention: Convention = "mm_token_type_ids",
    image_token_id: int = IMAGE_PAD_ID,
    video_token_id: int = VIDEO_PAD_ID,
    vision_start_token_id: int = VISION_START_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D (temporal, height, width) position ids for a batch of Qwen2-VL token sequences.

    Args:
      input_ids: int[B, T].
      mm_token_type_ids: int[B, T], 0 text, 1 image, 2 video; needed by `"mm_token_type_ids"` when grids are given.
      image_grid_thw: int[Ni, 3] patch grid (t, h, w) of every image in the batch, in order, or None.
      video_grid_thw: int[Nv, 3] likewise for videos, or None.
      attention_mask: int[B, T], 1 for real tokens, 0 for padding (either side), or None.
      spatial_merge_size: patches merged per side into one LLM token (2 for Qwen2-VL).
      convention: which Hugging Face behaviour to reproduce exactly:
        - `"mm_token_type_ids"`: transformers 5.x, `Qwen2VLModel.compute_3d_position_ids` ->
          `get_rope_index`. Vision blocks are the runs of equal non-zero `mm_token_type_ids` over the
          real tokens. After a block the next position is start + max(h, w) / merge (the temporal extent is
          ignored). Pads get 0; rope_deltas = max + 1 - (real tokens). Without any grid the model uses
          `arange(T)` for every row, pads included, and rope_deltas are 0.
        - `"legacy"`: `Qwen2VLModel.get_rope_index` of transformers 4.57.3, the version the BToks reference
          code pins (the function is unchanged from 4.49.0, the 4.4x line VLM2Vec ran on).
          A block is counted only when `<|vision_start|>` is directly followed by an image/video pad; each
          counted block is placed at the next pad of its kind from the cursor. Rows with no such pair
          (VLM2Vec prompts) get 1-D positions over their real tokens and take no grid, so in a batch that
          mixes them with wrapped rows later rows read the wrong grids, as in Hugging Face (an error here
          when the sizes disagree). After a block the next position is max(block) + 1, i.e.
          start + max(t, h / merge, w / merge). Pads get 1; rope_deltas = max + 1 - T (padded length).
          Without any grid: `cumsum(attention_mask) - 1` with pads set to 1 and rope_deltas =
          row max + 1 - T, or `arange(T)` and 0 when there is no mask.
        Neither convention scales the temporal index by `second_per_grid_ts`: that is Qwen2.5-VL only.
      image_token_id, video_token_id, vision_start_token_id: special ids (legacy only).

    Returns:
      position_ids int32[3, B, T] and rope_deltas int32[B, 1] (added to `arange` positions while decoding).

    Raises:
      ValueError naming the sample when vision blocks and grids disagree: more blocks than grids, a block
      whose token count is not t * h * w / merge**2, vision blocks without any grid, a row with no real
      token or (legacy) ending in `<|vision_start|>` while grids are given; Hugging Face crashes or silently
      misplaces positions on these. Spare grids are not an error (Hugging Face ignores them too, and legacy
      rows without `<|vision_start|>` leave their images' grids unused).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, T], got shape {input_ids.shape}")
    if attention_mask is not None:
        attention_mask = _same_shape(attention_mask, input_ids, "attention_mask")
    if mm_token_type_ids is not None:
        mm_token_type_ids = _same_shape(mm_token_type_ids, input_ids, "mm_token_type_ids")
    grids = _GridQueue(_as_grids(image_grid_thw, "image_grid_thw"), _as_grids(video_grid_thw, "video_grid_thw"))

    if convention == "mm_token_type_ids":
        return _rope_index_type_ids(input_ids, mm_token_type_ids, attention_mask, grids, spatial_merge_size)
    if convention == "legacy":
        special = (image_token_id, video_token_id, vision_start_token_id)
        return _rope_index_legacy(input_ids, attention_mask, grids, spatial_merge_size, special)
    raise ValueError(f"convention must be 'mm_token_type_ids' or 'legacy', got {convention!r}")


# ---------------------------------------------------------------------------------------------------------------------
# transformers 5.x
# ---------------------------------------------------------------------------------------------------------------------


def _rope_index_type_ids(input_ids, mm_token_type_ids, attention_mask, grids, merge):
    batch, length = input_ids.shape
    if grids.empty:
        # `compute_3d_position_ids` returns None and the text model falls back to arange over the padded length.
        if mm_token_type_ids is not None:
            real = np.ones_like(input_ids, bool) if attention_mask is None else attention_mask != 0
            rows = np.flatnonzero((real & (mm_token_type_ids != TEXT)).any(axis=1))
            if rows.size:
                raise ValueError(f"sample {rows[0]}: vision tokens in mm_token_type_ids but no image/video grids given")
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (3, batch, length)).copy()
        return positions, np.zeros((batch, 1), np.int32)
    if mm_token_type_ids is None:
        raise ValueError(
            "image/video grids were given but mm_token_type_ids is missing (convention 'mm_token_type_ids')"
        )

    positions = np.zeros((3, batch, length), np.int32)
    deltas = np.zeros((batch, 1), np.int32)
    for row in range(batch):
        real = np.ones(length, bool) if attention_mask is None else attention_mask[row] != 0
        types = mm_token_type_ids[row][real]
        pieces, next_pos = [], 0
        for kind, run in itertools.groupby(types.tolist()):
            size = sum(1 for _ in run)
            if kind == TEXT:
                pieces.append(_text_positions(next_pos, size))
                next_pos += size
            elif kind in _KIND_NAMES:
                grid = grids.take(kind, row)
                _check_block_size(row, kind, size, grid, merge)
                pieces.append(_vision_positions(next_pos, grid, merge))
                next_pos += max(int(grid[1]), int(grid[2])) // merge
            else:
                raise ValueError(f"sample {row}: unknown mm_token_type_id {kind} (expected 0, 1 or 2)")
        row_positions = _concat(pieces, row)
        positions[:, row, real] = row_positions
        deltas[row, 0] = row_positions.max() + 1 - row_positions.shape[1]
    return positions, deltas


# ---------------------------------------------------------------------------------------------------------------------
# transformers 4.49-4.57 ("legacy")
# ---------------------------------------------------------------------------------------------------------------------


def _rope_index_legacy(input_ids, attention_mask, grids, merge, special):
    batch, length = input_ids.shape
    if grids.empty:
        _reject_wrapped_vision(input_ids, attention_mask, special)
        if attention_mask is None:
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), (3, batch, length)).copy()
            return positions, np.zeros((batch, 1), np.int32)
        row_positions = np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1
        row_positions[attention_mask == 0] = 1
        deltas = row_positions.max(axis=-1, keepdims=True) + 1 - length
        return np.broadcast_to(row_positions, (3, batch, length)).astype(np.int32), deltas.astype(np.int32)

    positions = np.ones((3, batch, length), np.int32)
    deltas = np.zeros((batch, 1), np.int32)
    for row in range(batch):
        real = np.ones(length, bool) if attention_mask is None else attention_mask[row] == 1
        row_positions = _legacy_row(input_ids[row][real], row, grids, merge, special)
        positions[:, row, real] = row_positions
        # The legacy delta subtracts the padded length, not the number of real tokens.
        deltas[row, 0] = row_positions.max() + 1 - length
    return positions, deltas


def _legacy_row(ids, row, grids, merge, special):
    image_token_id, video_token_id, vision_start_token_id = special
    pad_token = {IMAGE: image_token_id, VIDEO: video_token_id}
    if len(ids) and ids[-1] == vision_start_token_id:
        # Hugging Face indexes past the end here; a truncated prompt is the usual cause.
        raise ValueError(f"sample {row}: <|vision_start|> is the last real token (truncated prompt?)")
    remaining = _wrapped_block_counts(ids, special)
    pieces, cursor, next_pos = [], 0, 0
    for _ in range(sum(remaining.values())):
        # Each counted block is looked up as the next pad of its kind from the cursor, wherever the
        # `<|vision_start|>` that counted it sits; the earlier of the image and video candidates wins.
        found = {kind: _find(ids, pad_token[kind], cursor) if remaining[kind] else None for kind in (IMAGE, VIDEO)}
        candidates = [(at, kind) for kind, at in found.items() if at is not None]
        if not candidates:
            raise ValueError(f"sample {row}: a <|vision_start|> block has no pad tokens after position {cursor}")
        at, kind = min(candidates)
        grid = grids.take(kind, row)
        size = _block_size(grid, merge)
        _check_block_size(row, kind, _run_length(ids, at), grid, merge)
        pieces.append(_text_positions(next_pos, at - cursor))
        next_pos += at - cursor
        block = _vision_positions(next_pos, grid, merge)
        pieces.append(block)
        next_pos = int(block.max()) + 1
        cursor = at + size
        remaining[kind] -= 1
    if cursor < len(ids):
        pieces.append(_text_positions(next_pos, len(ids) - cursor))
    return _concat(pieces, row)


def _wrapped_block_counts(ids, special):
    image_token_id, video_token_id, vision_start_token_id = special
    following = ids[1:][ids[:-1] == vision_start_token_id]
    return {IMAGE: int((following == image_token_id).sum()), VIDEO: int((following == video_token_id).sum())}


def _reject_wrapped_vision(input_ids, attention_mask, special):
    for row in range(input_ids.shape[0]):
        ids = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row] == 1]
        counts = _wrapped_block_counts(ids, special)
        for kind, count in counts.items():
            if count:
                name = _KIND_NAMES[kind]
                raise ValueError(f"sample {row}: {count} <|vision_start|>-wrapped {name} block(s) but no grids given")


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------------


class _GridQueue:
    """Hands out grids in batch order: both Hugging Face versions share one cursor per modality across rows."""

    def __init__(self, image_grids, video_grids):
        self._grids = {IMAGE: image_grids, VIDEO: video_grids}
        self._taken = {IMAGE: 0, VIDEO: 0}
        self.empty = image_grids is None and video_grids is None

    def take(self, kind: int, row: int) -> np.ndarray:
        grids, index = self._grids[kind], self._taken[kind]
        available = 0 if grids is None else len(grids)
        if index >= available:
            name = _KIND_NAMES[kind]
            raise ValueError(
                f"sample {row}: needs {name} block #{index + 1} of the batch but {name}_grid_thw has {available} rows"
            )
        self._taken[kind] += 1
        return grids[index]


def _vision_positions(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    """int[3, t*h*w/merge**2]: (t, h, w) of each merged token in row-major (t, h, w) order, offset by start."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    return np.indices((t, h, w)).reshape(3, -1) + start


def _text_positions(start: int, size: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + size), (3, size))


def _block_size(grid: np.ndarray, merge: int) -> int:
    return int(grid[0]) * (int(grid[1]) // merge) * (int(grid[2]) // merge)


def _check_block_size(row: int, kind: int, size: int, grid: np.ndarray, merge: int) -> None:
    expected = _block_size(grid, merge)
    if size != expected:
        name = _KIND_NAMES[kind]
        raise ValueError(
            f"sample {row}: {name} block has {size} tokens but its grid (t, h, w) = {tuple(int(g) for g in grid)} "
            f"needs t*h*w/{merge}**2 = {expected}"
        )


def _find(ids: np.ndarray, token: int, start: int) -> int | None:
    hits = np.flatnonzero(ids[start:] == token)
    return int(hits[0]) + start if hits.size else None


def _run_length(ids: np.ndarray, start: int) -> int:
    different = np.flatnonzero(ids[start:] != ids[start])
    return int(different[0]) if different.size else len(ids) - start


def _concat(pieces: list[np.ndarray], row: int) -> np.ndarray:
    if not pieces:
        raise ValueError(f"sample {row}: no real tokens (attention_mask is all zeros)")
    return np.concatenate(pieces, axis=1)


def _as_grids(grid_thw, name: str) -> np.ndarray | None:
    if grid_thw is None:
        return None
    grid_thw = np.asarray(grid_thw, np.int64)
    if grid_thw.size == 0:
        grid_thw = grid_thw.reshape(0, 3)
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{name} must be int[N, 3], got shape {grid_thw.shape}")
    return grid_thw


def _same_shape(array, input_ids: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != input_ids.shape:
        raise ValueError(f"{name} must have the shape of input_ids {input_ids.shape}, got {array.shape}")
    return array
