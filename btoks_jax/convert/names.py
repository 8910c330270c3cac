"""The declarative name table between Hugging Face Qwen2-VL checkpoint keys and NNX parameter paths.

Each rule: (regex on the checkpoint key, NNX path template, layout). Layouts:
  "linear"  torch Linear.weight [out, in]  <-> kernel [in, out]
  "conv3d"  Conv3d.weight [E, C, t, p, p]  <-> kernel [C*t*p*p, E]
  "copy"    same array
Checkpoints written by transformers keep the original key names on disk (`visual.*`, `model.*`,
`lm_head.*`); the in-memory names of transformers 5.x (`model.visual.*`,
`model.language_model.*`) are accepted too.
"""

from __future__ import annotations

import re

import numpy as np

RULES: list[tuple[str, str, str]] = [
    (r"visual\.patch_embed\.proj\.weight", "visual.patch_embed.proj.kernel", "conv3d"),
    (r"visual\.blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"visual.blocks.\1.\2.\3", "copy"),
    (r"visual\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", r"visual.blocks.\1.\2.kernel",
     "linear"),
    (r"visual\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias", r"visual.blocks.\1.\2.bias", "copy"),
    (r"visual\.merger\.ln_q\.(weight|bias)", r"visual.merger.ln_q.\1", "copy"),
    (r"visual\.merger\.mlp\.(0|2)\.weight", r"visual.merger.mlp_\1.kernel", "linear"),
    (r"visual\.merger\.mlp\.(0|2)\.bias", r"visual.merger.mlp_\1.bias", "copy"),
    (r"model\.embed_tokens\.weight", "model.embed_tokens", "copy"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
     r"model.layers.\1.self_attn.\2.kernel", "linear"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.bias", r"model.layers.\1.self_attn.\2.bias", "copy"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.kernel", "linear"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"model.layers.\1.\2.weight", "copy"),
    (r"model\.norm\.weight", "model.norm.weight", "copy"),
    (r"lm_head\.weight", "lm_head.kernel", "linear"),
]
_COMPILED = [(re.compile(p + r"\Z"), t, layout) for p, t, layout in RULES]


def canonical_key(key: str) -> str:
    """Maps transformers 5.x in-memory names onto the on-disk names."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def hf_to_path(key: str) -> tuple[str, str] | None:
    """(NNX path, layout) for a checkpoint key, or None if the key is not a model weight."""
    key = canonical_key(key)
    for pattern, template, layout in _COMPILED:
        m = pattern.match(key)
        if m:
            return m.expand(template), layout
    return None


def path_to_hf(path: str) -> tuple[str, str]:
    """(on-disk checkpoint key, layout) for an NNX parameter path."""
    for pattern, template, layout in RULES:
        # Invert the template by turning it into a regex with the same groups.
        inv = re.escape(template)
        for g in range(1, 4):
            inv = inv.replace(re.escape(f"\\{g}"), r"(.+?)")
        m = re.match(inv + r"\Z", path)
        if m:
            key = pattern
            for value in m.groups():
                key = re.sub(r"\((?:[^()]|\\\(|\\\))*\)", lambda _, v=value: v, key, count=1)
            key = key.replace("\\.", ".")
            if re.match(pattern + r"\Z", key):
                return key, layout
    raise KeyError(f"no checkpoint name for parameter {path}")


def to_jax_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv3d":
        return array.reshape(array.shape[0], -1).T
    return array


def to_hf_layout(array: np.ndarray, layout: str, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv3d":
        return array.T.reshape(hf_shape)
    return array


def expected_hf_shape(shape: tuple[int, ...], layout: str, conv_shape: tuple[int, ...] | None = None):
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "conv3d":
        return conv_shape
    return tuple(shape)
