"""Float32 parity of the Flax port with transformers' Qwen2VLForConditionalGeneration (tiny random configs)."""

from __future__ import annotations

import json
import os

import hf_utils as H
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from btoks_jax.convert.hf_import import CheckpointMismatchError, abstract_model, load_hf_weights
from btoks_jax.inputs import pack_hf_inputs
from btoks_jax.model_config import QWEN2_VL_2B, from_hf_config, tiny_config

TOL = 1e-4
CFG = tiny_config()
PATCH_DIM = CFG.vision_config.patch_dim


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    hf = H.hf_model(CFG, seed=0)
    d = str(tmp_path_factory.mktemp("tied"))
    hf.save_pretrained(d)
    model, _ = load_hf_weights(d, progress=False)
    return hf, model


@jax.jit
def _forward(model, inputs):
    return model(inputs)


def _check(hf, model, batch, convention="mm_token_type_ids", hf_positions=None):
    ref_h, ref_l = H.hf_forward(hf, batch, hf_positions)
    inputs = pack_hf_inputs(batch, CFG, rope_convention=convention)
    h, logits = _forward(model, inputs)
    real = batch["attention_mask"].astype(bool)
    dh = np.abs(np.asarray(h)[real] - ref_h[real]).max()
    dl = np.abs(np.asarray(logits)[real] - ref_l[real]).max()
    assert dh <= TOL and dl <= TOL, (dh, dl)
    return inputs


def _with_vision(batch, images=(), videos=(), seed=0):
    if images:
        batch["image_grid_thw"] = np.array(images)
        batch["pixel_values"] = H.random_pixels(images, PATCH_DIM, seed)
    if videos:
        batch["video_grid_thw"] = np.array(videos)
        batch["pixel_values_videos"] = H.random_pixels(videos, PATCH_DIM, seed + 1)
    return batch


def test_text_only(tied):
    _check(*tied, H.make_batch([[9707, 1879, 11, 220, 108386, 13, 151645]]))


def test_one_image(tied):
    row = [9707, *H.image_tokens((1, 4, 6)), 3555, 374, 419, 30]
    _check(*tied, _with_vision(H.make_batch([row]), images=[(1, 4, 6)]))


def test_two_images_of_different_sizes_in_one_sample(tied):
    row = [1, *H.image_tokens((1, 4, 6)), 2, 3, *H.image_tokens((1, 6, 2)), 4]
    _check(*tied, _with_vision(H.make_batch([row]), images=[(1, 4, 6), (1, 6, 2)]))


def test_video_with_three_temporal_patches(tied):
    # grid_t = 3 exceeds h/2 and w/2 = 1 and 2: the two M-RoPE conventions then differ after the video.
    row = [5, *H.image_tokens((3, 2, 4), video=True), 6, 7]
    inputs = _check(*tied, _with_vision(H.make_batch([row]), videos=[(3, 2, 4)]))
    assert len(np.unique(inputs.patch_segment_ids[0][inputs.patch_segment_ids[0] > 0])) == 3  # one group a frame


def test_image_and_video(tied):
    row = [5, *H.image_tokens((1, 4, 4)), 8, *H.image_tokens((2, 4, 2), video=True), 9]
    _check(*tied, _with_vision(H.make_batch([row]), images=[(1, 4, 4)], videos=[(2, 4, 2)]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_of_three(tied, side):
    rows = [
        [1, 2, 3],
        [4, *H.image_tokens((1, 4, 6)), 5, 6, 7, 8, 9],
        [10, *H.image_tokens((1, 2, 2)), 11, *H.image_tokens((1, 4, 2)), 12],
    ]
    batch = _with_vision(H.make_batch(rows, side), images=[(1, 4, 6), (1, 2, 2), (1, 4, 2)])
    _check(*tied, batch)


@pytest.mark.parametrize("side", ["left", "right"])
def test_text_only_padded_batch(tied, side):
    # Without vision inputs transformers uses arange positions over the padded length; the port mirrors it.
    _check(*tied, H.make_batch([[1, 2, 3], [4, 5, 6, 7, 8, 9]], side))


def test_legacy_1d_fallback_for_vlm2vec_prompts(tied):
    """VLM2Vec prompts carry no <|vision_start|>: the legacy releases give every token 1-D positions.

    transformers 5.x reproduces that function when `mm_token_type_ids` marks nothing as vision, so
    the reference here is HF's own forward with all-zero token types.
    """
    hf, model = tied
    rows = [[7, *H.image_tokens((1, 4, 6), wrap=False), 8, 9], [1, 2, 3, 4]]
    batch = _with_vision(H.make_batch(rows, "left"), images=[(1, 4, 6)])
    legacy_batch = dict(batch, mm_token_type_ids=np.zeros_like(batch["input_ids"]))
    ref_h, ref_l = H.hf_forward(hf, legacy_batch)
    inputs = pack_hf_inputs(batch, CFG, rope_convention="legacy")
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(inputs.positions[0][real], np.concatenate([np.arange(9), np.arange(4)]))
    h, logits = _forward(model, inputs)
    assert np.abs(np.asarray(h)[real] - ref_h[real]).max() <= TOL
    assert np.abs(np.asarray(logits)[real] - ref_l[real]).max() <= TOL
    # ... and the 5.x convention on the same prompt is a different function (3-D positions for the pads).
    _check(hf, model, batch)
    assert not np.array_equal(pack_hf_inputs(batch, CFG).positions, inputs.positions)


def test_legacy_convention_with_wrapped_video(tied):
    """The legacy releases continue after a vision block at max+1 (= start + max(t, h/2, w/2))."""
    hf, model = tied
    row = [5, *H.image_tokens((3, 2, 4), video=True), 6, 7]
    batch = _with_vision(H.make_batch([row]), videos=[(3, 2, 4)])
    inputs = pack_hf_inputs(batch, CFG, rope_convention="legacy")
    assert inputs.positions[0, 0, -1] == inputs.positions[0, 0, -2] + 1 == 2 + 3 + 1 + 1
    _check(hf, model, batch, convention="legacy", hf_positions=inputs.positions)


def test_untied_import_and_head(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    hf = H.hf_model(cfg, seed=1)
    hf.save_pretrained(tmp_path)
    model, _ = load_hf_weights(str(tmp_path), progress=False)
    assert model.lm_head is not None
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.value), hf.lm_head.weight.detach().numpy().T)
    batch = H.make_batch([[1, 2, 3, 4, 5]])
    ref_h, ref_l = H.hf_forward(hf, batch)
    h, logits = _forward(model, pack_hf_inputs(batch, cfg))
    assert np.abs(np.asarray(logits) - ref_l).max() <= TOL


def test_full_model_forward_logits_match(tied):
    hf, model = tied
    row = [9707, *H.image_tokens((1, 4, 6)), 3555]
    batch = _with_vision(H.make_batch([row]), images=[(1, 4, 6)])
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    _, logits = _forward(model, pack_hf_inputs(batch, CFG))
    assert np.abs(np.asarray(logits) - ref).max() <= TOL


def test_import_reports_every_missing_and_misshaped_tensor(tmp_path):
    hf = H.hf_model(CFG, seed=2)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    dropped = [k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight")][0]
    bent = [k for k in tensors if k.endswith("merger.mlp.0.bias")][0]
    del tensors[dropped]
    tensors[bent] = tensors[bent][:-1]
    tensors["model.layers.0.self_attn.rotary.extra"] = np.zeros(3, np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf_weights(str(tmp_path), progress=False)
    msg = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "mis-shaped: " in msg and "merger.mlp.0.bias" in msg
    assert "unexpected: model.layers.0.self_attn.rotary.extra" in msg


def test_import_of_sharded_checkpoint_with_index(tmp_path):
    hf = H.hf_model(CFG, seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="2MB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    model, _ = load_hf_weights(str(tmp_path), progress=False)
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight.value),
                                  hf.model.language_model.norm.weight.detach().numpy())


def test_from_hf_config_reads_flat_published_layout():
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 1536,
        "intermediate_size": 8960, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vision_start_token_id": 151652,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    assert from_hf_config(flat) == QWEN2_VL_2B


def test_2b_preset_parameter_count_matches_transformers():
    model = abstract_model(QWEN2_VL_2B)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model))
    hf_config = transformers.Qwen2VLConfig(**QWEN2_VL_2B.to_hf_dict())
    with torch.device("meta"):
        hf = transformers.Qwen2VLForConditionalGeneration(hf_config)
    assert ours == hf.num_parameters() == 2_208_985_600
    assert json.loads(json.dumps(QWEN2_VL_2B.to_hf_dict()))["text_config"]["hidden_size"] == 1536
