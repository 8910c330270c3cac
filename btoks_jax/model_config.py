"""The model's configuration: Qwen2-VL sizes as frozen dataclasses with Hugging Face field names, the presets
and the special-token ids. The trainer's configuration is `btoks_jax/train_config.py`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Qwen2-VL special-token ids (identical for the 2B and 7B checkpoints).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656
BTOK_FIRST_ID = 151657  # `<|btok_0|>` in the authors' tokenizer: the first id after Qwen2-VL's specials.


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Mirrors `transformers.Qwen2VLVisionConfig`."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 1536  # output width of the PatchMerger (= the language model's hidden size)
    hidden_act: str = "quick_gelu"
    mlp_ratio: int = 4
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Mirrors `transformers.Qwen2VLTextConfig`."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """Mirrors `transformers.Qwen2VLConfig`, plus the runtime choices of this port.

    The runtime fields (`dtype`, `param_dtype`, `attention_impl`, `remat`) are not part of the
    Hugging Face schema; they choose how the same function is computed.
    """

    text_config: TextConfig = TextConfig()
    vision_config: VisionConfig = VisionConfig()
    image_token_id: int = IMAGE_PAD_ID
    video_token_id: int = VIDEO_PAD_ID
    vision_start_token_id: int = VISION_START_ID
    vision_end_token_id: int = VISION_END_ID
    tie_word_embeddings: bool = True
    # Runtime choices.
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"  # master weight dtype
    attention_impl: str = "dense"  # "dense" (XLA) or "splash" (Pallas TPU kernel)
    remat: bool = False  # rematerialise every decoder / vision block in the backward pass

    def replace(self, **kwargs: Any) -> Qwen2VLConfig:
        return dataclasses.replace(self, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dictionary that `transformers.Qwen2VLConfig` reads."""
        t, v = self.text_config, self.vision_config
        text = {
            "model_type": "qwen2_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        vision = {
            "model_type": "qwen2_vl_vision",
            "depth": v.depth,
            "embed_dim": v.embed_dim,
            "hidden_size": v.hidden_size,
            "hidden_act": v.hidden_act,
            "mlp_ratio": v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
        }
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
        }


def _pick(d: dict[str, Any], cls: type, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: d[k] for k in names if k in d}
    for src, dst in (aliases or {}).items():
        if src in d and dst not in out:
            out[dst] = d[src]
    return out


def from_hf_config(source: str | os.PathLike | dict[str, Any], **runtime: Any) -> Qwen2VLConfig:
    """Builds a config from a Hugging Face `config.json` (a path, a directory or a dict; local or a URL).

    Reads both layouts in the wild: the flat one of the published Qwen2-VL checkpoints (text fields
    at the top level, `rope_scaling.mrope_section`) and the nested one that transformers 5.x writes
    (`text_config`, `rope_parameters`).
    """
    if isinstance(source, dict):
        d = source
    else:
        from btoks_jax import fs

        path = os.fspath(source)
        if fs.isdir(path):
            path = fs.join(path, "config.json")
        d = json.loads(fs.read_text(path))
    if d.get("model_type") not in (None, "qwen2_vl"):
        raise ValueError(f"expected a qwen2_vl config, got model_type={d.get('model_type')!r}")
    text_d = dict(d)
    if isinstance(d.get("text_config"), dict):
        text_d.update(d["text_config"])
    rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
    text_kwargs = _pick(text_d, TextConfig)
    if "rope_theta" in rope:
        text_kwargs["rope_theta"] = rope["rope_theta"]
    if "mrope_section" in rope:
        text_kwargs["mrope_section"] = tuple(rope["mrope_section"])
    vision_d = dict(d.get("vision_config") or {})
    vrope = vision_d.get("rope_parameters") or {}
    vision_kwargs = _pick(vision_d, VisionConfig, {"in_chans": "in_channels"})
    if "rope_theta" in vrope:
        vision_kwargs["rope_theta"] = vrope["rope_theta"]
    tie = d.get("tie_word_embeddings")
    if tie is None and isinstance(d.get("text_config"), dict):
        tie = d["text_config"].get("tie_word_embeddings")
    top = _pick(d, Qwen2VLConfig)
    top.pop("text_config", None)
    top.pop("vision_config", None)
    top["tie_word_embeddings"] = bool(tie) if tie is not None else False
    top.update(runtime)
    return Qwen2VLConfig(text_config=TextConfig(**text_kwargs), vision_config=VisionConfig(**vision_kwargs), **top)


QWEN2_VL_2B = Qwen2VLConfig(
    text_config=TextConfig(),
    vision_config=VisionConfig(hidden_size=1536),
    tie_word_embeddings=True,
)

QWEN2_VL_7B = Qwen2VLConfig(
    text_config=TextConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
    vision_config=VisionConfig(hidden_size=3584),
    tie_word_embeddings=False,
)


def tiny_config(vocab_size: int = 151936, tie_word_embeddings: bool = True, **runtime: Any) -> Qwen2VLConfig:
    """A tiny random-init preset with a distinct size per dimension, so shape bugs show in tests.

    The vocabulary keeps the real Qwen2-VL size by default so the real tokenizer's special ids fit.
    """
    return Qwen2VLConfig(
        text_config=TextConfig(
            vocab_size=vocab_size,
            hidden_size=48,
            intermediate_size=72,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            mrope_section=(1, 1, 2),
        ),
        vision_config=VisionConfig(
            depth=2,
            embed_dim=40,
            hidden_size=48,
            mlp_ratio=2,
            num_heads=2,
        ),
        tie_word_embeddings=tie_word_embeddings,
        **runtime,
    )


PRESETS = {
    "qwen2-vl-2b": QWEN2_VL_2B,
    "qwen2-vl-7b": QWEN2_VL_7B,
    "tiny": tiny_config(),
}
