"""M-RoPE position ids: parity with transformers 5.x and hand-checked legacy (4.49-4.57) behaviour."""

import re

import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from btoks_jax.model_config import ENDOFTEXT_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID
from btoks_jax.rope_index import get_rope_index

VS, VE, IMG, VID, PAD = VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID, ENDOFTEXT_ID
MERGE = 2


# ---------------------------------------------------------------------------------------------------------------------
# Prompt building: a row is a list of text token ids and vision blocks.
# ---------------------------------------------------------------------------------------------------------------------


def image(t, h, w, wrapped=True):
    return ("image", (t, h, w), wrapped)


def video(t, h, w, wrapped=True):
    return ("video", (t, h, w), wrapped)


def build(rows, side="right", extra_pad=0):
    """Tokenise rows like the processor: pads per block, type ids, grids in batch order, then pad the batch."""
    token_rows, type_rows, grids = [], [], {"image": [], "video": []}
    for row in rows:
        ids, types = [], []
        for item in row:
            if isinstance(item, int):
                ids.append(item)
                types.append(0)
                continue
            kind, thw, wrapped = item
            grids[kind].append(thw)
            count = thw[0] * thw[1] * thw[2] // MERGE**2
            pad, type_id = (IMG, 1) if kind == "image" else (VID, 2)
            ids += ([VS] if wrapped else []) + [pad] * count + ([VE] if wrapped else [])
            types += ([0] if wrapped else []) + [type_id] * count + ([0] if wrapped else [])
        token_rows.append(ids)
        type_rows.append(types)
    length = max(map(len, token_rows)) + extra_pad
    input_ids = np.full((len(rows), length), PAD, np.int64)
    type_ids = np.zeros_like(input_ids)
    mask = np.zeros_like(input_ids)
    for b, (ids, types) in enumerate(zip(token_rows, type_rows)):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[b, span], type_ids[b, span], mask[b, span] = ids, types, 1
    return input_ids, type_ids, mask, _as_grid(grids["image"]), _as_grid(grids["video"])


def _as_grid(grids):
    return np.array(grids, np.int64).reshape(-1, 3) if grids else None


# ---------------------------------------------------------------------------------------------------------------------
# transformers 5.x parity, on the positions the tiny model's rotary embedding actually receives
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    text = {
        "vocab_size": VID + 8,  # the real special-token ids must be embeddable
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    }
    vision = {"depth": 1, "embed_dim": 8, "hidden_size": 16, "num_heads": 2, "spatial_merge_size": MERGE}
    config = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
    )
    torch.manual_seed(0)
    model = Qwen2VLModel(config).eval()
    captured = {}
    model.language_model.rotary_emb.register_forward_pre_hook(lambda module, args: captured.update(pos=args[1]))
    return model, captured


def _torch(x):
    return None if x is None else torch.from_numpy(np.asarray(x))


def hf_positions(hf_model, input_ids, type_ids, mask, image_grid, video_grid):
    """Position ids [3, B, T] the 5.x model uses when none are passed, and its cached rope deltas (or None)."""
    model, captured = hf_model
    model.rope_deltas = None
    with torch.no_grad():
        model(
            input_ids=_torch(input_ids),
            attention_mask=_torch(mask),
            mm_token_type_ids=_torch(type_ids),
            image_grid_thw=_torch(image_grid),
            video_grid_thw=_torch(video_grid),
        )
    deltas = None if model.rope_deltas is None else model.rope_deltas.numpy()
    return captured["pos"].numpy(), deltas


TEXT = [11, 12, 13]
PARITY_CASES = {
    "text_only": ([TEXT + [14, 15]], "right", 0),
    "text_only_left_padded": ([TEXT, TEXT + [14, 15, 16]], "left", 0),
    "text_only_right_padded": ([TEXT, TEXT + [14, 15, 16]], "right", 1),
    "one_image": ([TEXT + [image(1, 4, 6)] + TEXT], "right", 0),
    "two_images_different_grids": ([TEXT + [image(1, 4, 6), 20, image(1, 6, 2)] + TEXT], "right", 0),
    "video_long_in_time": ([TEXT + [video(4, 2, 2)] + TEXT], "right", 0),
    "image_and_video": ([TEXT + [image(1, 2, 4), 21, video(3, 4, 2)] + TEXT], "right", 0),
    "bare_and_wrapped_images": ([TEXT + [image(1, 4, 4, wrapped=False), 22, image(1, 2, 6)] + TEXT], "right", 0),
    "bare_image_only": ([TEXT + [image(1, 4, 4, wrapped=False)] + TEXT], "right", 0),
}
BATCH_ROWS = [
    TEXT + [image(1, 4, 6)] + [30],
    [31, video(3, 2, 4), 32, image(1, 2, 2, wrapped=False), 33, image(1, 6, 4)] + TEXT,
    TEXT + [34],
]
PARITY_CASES["batch_of_3_left_padded"] = (BATCH_ROWS, "left", 0)
PARITY_CASES["batch_of_3_right_padded"] = (BATCH_ROWS, "right", 2)


@pytest.mark.parametrize("rows, side, extra_pad", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_matches_transformers_5(hf_model, rows, side, extra_pad):
    input_ids, type_ids, mask, image_grid, video_grid = build(rows, side, extra_pad)
    positions, deltas = get_rope_index(
        input_ids,
        mm_token_type_ids=type_ids,
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        attention_mask=mask,
        spatial_merge_size=MERGE,
    )
    want_positions, want_deltas = hf_positions(hf_model, input_ids, type_ids, mask, image_grid, video_grid)

    assert positions.dtype == np.int32 and positions.shape == (3, *input_ids.shape)
    # Every position is compared, pads included: HF fills them with 0 (3-D path) or arange (text only).
    np.testing.assert_array_equal(positions, want_positions)
    if image_grid is None and video_grid is None:
        assert want_deltas is None  # the model never calls get_rope_index for text
        np.testing.assert_array_equal(deltas, np.zeros((len(rows), 1)))
    else:
        np.testing.assert_array_equal(deltas, want_deltas)
        direct = hf_model[0].get_rope_index(
            _torch(input_ids), _torch(type_ids), _torch(image_grid), _torch(video_grid), _torch(mask)
        )
        np.testing.assert_array_equal(positions, direct[0].numpy())
        np.testing.assert_array_equal(deltas, direct[1].numpy())


def test_transformers_5_without_mask(hf_model):
    input_ids, type_ids, _, image_grid, video_grid = build([TEXT + [video(3, 2, 4)] + TEXT])
    positions, deltas = get_rope_index(
        input_ids, mm_token_type_ids=type_ids, image_grid_thw=image_grid, video_grid_thw=video_grid
    )
    want_positions, want_deltas = hf_positions(hf_model, input_ids, type_ids, None, image_grid, video_grid)
    np.testing.assert_array_equal(positions, want_positions)
    np.testing.assert_array_equal(deltas, want_deltas)


def test_type_ids_under_padding_are_ignored(hf_model):
    input_ids, type_ids, mask, image_grid, _ = build([TEXT + [image(1, 2, 2)], TEXT * 3], side="left")
    type_ids[mask == 0] = 1
    positions, _ = get_rope_index(input_ids, mm_token_type_ids=type_ids, image_grid_thw=image_grid, attention_mask=mask)
    want_positions, _ = hf_positions(hf_model, input_ids, type_ids, mask, image_grid, None)
    np.testing.assert_array_equal(positions, want_positions)


# ---------------------------------------------------------------------------------------------------------------------
# Legacy (transformers 4.49-4.57): hand-computed expectations
# ---------------------------------------------------------------------------------------------------------------------


def _legacy(input_ids, mask=None, image_grid=None, video_grid=None):
    return get_rope_index(
        input_ids, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask, convention="legacy"
    )


def _same_on_all_axes(rows):
    return np.broadcast_to(np.array(rows), (3, len(rows), len(rows[0])))


def test_legacy_text_only_with_padding():
    input_ids = np.array([[PAD, PAD, 11, 12, 13], [11, 12, 13, 14, PAD]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    positions, deltas = _legacy(input_ids, mask)
    np.testing.assert_array_equal(positions, _same_on_all_axes([[1, 1, 0, 1, 2], [0, 1, 2, 3, 1]]))
    np.testing.assert_array_equal(deltas, [[2 + 1 - 5], [3 + 1 - 5]])  # row max + 1 - padded length

    positions, deltas = _legacy(input_ids)
    np.testing.assert_array_equal(positions, _same_on_all_axes([[0, 1, 2, 3, 4]] * 2))
    np.testing.assert_array_equal(deltas, [[0], [0]])


def test_legacy_vlm2vec_prompt_is_1d():
    # No <|vision_start|>: the grid is given (the image is still embedded) but not used for positions.
    input_ids = np.array([[11, 12, IMG, IMG, IMG, IMG, 13, PAD, PAD]])
    mask = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0]])
    positions, deltas = _legacy(input_ids, mask, image_grid=[[1, 4, 4]])
    np.testing.assert_array_equal(positions, _same_on_all_axes([[0, 1, 2, 3, 4, 5, 6, 1, 1]]))
    np.testing.assert_array_equal(deltas, [[7 - 9]])


def test_legacy_wrapped_image():
    # grid (1, 4, 6) -> 2 x 3 merged tokens starting at position 2 (after text and <|vision_start|>).
    input_ids = np.array([[PAD, 11, VS] + [IMG] * 6 + [VE, 12]])
    mask = np.array([[0] + [1] * 10])
    positions, deltas = _legacy(input_ids, mask, image_grid=[[1, 4, 6]])
    want = [
        [1, 0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [1, 0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    np.testing.assert_array_equal(positions[:, 0], want)
    np.testing.assert_array_equal(deltas, [[6 + 1 - 11]])


def test_legacy_video_longer_in_time_than_space():
    # grid (3, 2, 2): one merged token per frame, temporal index 2, 3, 4. Legacy resumes text at max + 1 = 5;
    # transformers 5.x resumes at start + max(h, w) / merge = 3, reusing positions of the video.
    input_ids = np.array([[11, VS, VID, VID, VID, VE, 12]])
    type_ids = np.array([[0, 0, 2, 2, 2, 0, 0]])
    legacy, legacy_deltas = _legacy(input_ids, video_grid=[[3, 2, 2]])
    np.testing.assert_array_equal(legacy[:, 0], [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 2, 2, 5, 6], [0, 1, 2, 2, 2, 5, 6]])
    np.testing.assert_array_equal(legacy_deltas, [[7 - 7]])

    current, current_deltas = get_rope_index(input_ids, mm_token_type_ids=type_ids, video_grid_thw=[[3, 2, 2]])
    np.testing.assert_array_equal(current[:, 0], [[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 2, 2, 3, 4], [0, 1, 2, 2, 2, 3, 4]])
    np.testing.assert_array_equal(current_deltas, [[4 + 1 - 7]])


def test_legacy_grids_are_consumed_across_the_batch():
    input_ids = np.array([[VS, IMG, VE, 11, PAD, PAD], [11, VS, IMG, IMG, VE, 12]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6])
    positions, _ = _legacy(input_ids, mask, image_grid=[[1, 2, 2], [1, 2, 4]])
    np.testing.assert_array_equal(positions[2], [[0, 1, 2, 3, 1, 1], [0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(positions[1], [[0, 1, 2, 3, 1, 1], [0, 1, 2, 2, 4, 5]])


# ---------------------------------------------------------------------------------------------------------------------
# Where the two conventions agree, and exactly how they differ there
# ---------------------------------------------------------------------------------------------------------------------


def test_vlm2vec_prompts_legacy_equals_5x_with_text_type_ids():
    rows = [TEXT + [image(1, 4, 6, wrapped=False)] + TEXT, [40, image(1, 2, 2, wrapped=False), 41]]
    input_ids, _, mask, image_grid, _ = build(rows, side="left")
    text_types = np.zeros_like(input_ids)
    legacy, legacy_deltas = _legacy(input_ids, mask, image_grid)
    current, current_deltas = get_rope_index(
        input_ids, mm_token_type_ids=text_types, image_grid_thw=image_grid, attention_mask=mask
    )
    real = mask.astype(bool)
    np.testing.assert_array_equal(legacy[:, real], current[:, real])
    np.testing.assert_array_equal(legacy[:, ~real], 1)
    np.testing.assert_array_equal(current[:, ~real], 0)
    np.testing.assert_array_equal(current_deltas, 0)
    np.testing.assert_array_equal(legacy_deltas, current_deltas - (1 - mask).sum(-1, keepdims=True))


@pytest.mark.parametrize("side", ["left", "right"])
def test_wrapped_single_images_legacy_equals_5x(side):
    rows = [TEXT + [image(1, 4, 6)] + TEXT, [50, image(1, 6, 2), 51], [image(1, 2, 2)] + TEXT * 2]
    input_ids, type_ids, mask, image_grid, _ = build(rows, side=side, extra_pad=1)
    legacy, legacy_deltas = _legacy(input_ids, mask, image_grid)
    current, current_deltas = get_rope_index(
        input_ids, mm_token_type_ids=type_ids, image_grid_thw=image_grid, attention_mask=mask
    )
    real = mask.astype(bool)
    np.testing.assert_array_equal(legacy[:, real], current[:, real])
    # Legacy subtracts the padded length, 5.x the number of real tokens.
    np.testing.assert_array_equal(legacy_deltas, current_deltas - (1 - mask).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------------------------------
# Mismatched inputs fail loudly, naming the sample
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["mm_token_type_ids", "legacy"])
def test_too_few_grids(convention):
    input_ids, type_ids, mask, image_grid, _ = build([TEXT, TEXT + [image(1, 2, 2)], [image(1, 2, 4)]])
    with pytest.raises(ValueError, match=r"sample 2: needs image block #2 .* has 1 rows"):
        get_rope_index(
            input_ids,
            mm_token_type_ids=type_ids,
            image_grid_thw=image_grid[:1],
            attention_mask=mask,
            convention=convention,
        )


@pytest.mark.parametrize("convention", ["mm_token_type_ids", "legacy"])
def test_block_size_must_match_grid(convention):
    input_ids, type_ids, mask, _, _ = build([TEXT, TEXT + [video(3, 2, 2)]])
    with pytest.raises(ValueError, match=r"sample 1: video block has 3 tokens .* = 6"):
        get_rope_index(
            input_ids,
            mm_token_type_ids=type_ids,
            video_grid_thw=[[3, 2, 4]],
            attention_mask=mask,
            convention=convention,
        )


def test_missing_type_ids_and_missing_grids():
    input_ids, type_ids, _, image_grid, _ = build([TEXT + [image(1, 2, 2)]])
    with pytest.raises(ValueError, match="mm_token_type_ids is missing"):
        get_rope_index(input_ids, image_grid_thw=image_grid)
    with pytest.raises(ValueError, match="sample 0: vision tokens in mm_token_type_ids but no image/video grids"):
        get_rope_index(input_ids, mm_token_type_ids=type_ids)
    with pytest.raises(ValueError, match=re.escape("sample 0: 1 <|vision_start|>-wrapped image block")):
        get_rope_index(input_ids, convention="legacy")


def test_truncated_vision_start_and_empty_rows():
    with pytest.raises(ValueError, match=re.escape("sample 0: <|vision_start|> is the last real token")):
        _legacy(np.array([[11, 12, VS]]), image_grid=[[1, 2, 2]])
    with pytest.raises(ValueError, match="sample 1: no real tokens"):
        _legacy(np.array([[11, VS, IMG, VE], [PAD] * 4]), np.array([[1] * 4, [0] * 4]), image_grid=[[1, 2, 2]])
    with pytest.raises(ValueError, match="convention"):
        get_rope_index(np.array([[11]]), convention="qwen3")
