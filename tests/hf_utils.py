"""Helpers shared by the parity tests: tiny Hugging Face Qwen2-VL models built locally, and inputs."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from btoks_jax.model_config import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID, Qwen2VLConfig


def hf_model(config: Qwen2VLConfig, seed: int = 0) -> transformers.Qwen2VLForConditionalGeneration:
    """A float32 eager-attention HF model with random weights from the same config."""
    torch.manual_seed(seed)
    hf_config = transformers.Qwen2VLConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf_config.text_config._attn_implementation = "eager"
    hf_config.vision_config._attn_implementation = "eager"
    model = transformers.Qwen2VLForConditionalGeneration(hf_config).eval()
    # Random init leaves norms at exactly 1 / 0: perturb them so a mix-up of norm weights shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def image_tokens(grid, merge: int = 2, wrap: bool = True, video: bool = False) -> list[int]:
    t, h, w = grid
    pads = [VIDEO_PAD_ID if video else IMAGE_PAD_ID] * (t * h * w // merge**2)
    return [VISION_START_ID, *pads, VISION_END_ID] if wrap else pads


def make_batch(rows: list[list[int]], padding_side: str = "right", pad_id: int = 151643) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / mm_token_type_ids for token rows, padded on one side."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if padding_side == "right" else slice(length - len(r), length)
        ids[i, sl] = r
        mask[i, sl] = 1
    types = np.zeros_like(ids)
    types[ids == IMAGE_PAD_ID] = 1
    types[ids == VIDEO_PAD_ID] = 2
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}


def random_pixels(grids, patch_dim: int, seed: int) -> np.ndarray:
    n = int(sum(np.prod(g) for g in grids))
    return np.random.default_rng(seed).standard_normal((n, patch_dim)).astype(np.float32)


def hf_forward(model, batch: dict[str, np.ndarray], position_ids: np.ndarray | None = None):
    """(last hidden state, logits) of the HF model as NumPy arrays."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if v is not None}
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
    with torch.no_grad():
        out = model.model(**kwargs)
        hidden = out.last_hidden_state
        logits = model.lm_head(hidden)
    return hidden.numpy(), logits.numpy()
