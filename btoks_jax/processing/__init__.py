"""Host-side input processing for Qwen2-VL: tokenizer, image and video preprocessing, prompt expansion."""

from btoks_jax.processing.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor, load_image, smart_resize
from btoks_jax.processing.prompt import (
    IMAGE_TOKEN,
    MODEL_PROMPT_STYLES,
    PROMPT_STYLES,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    Processor,
    convert_mmeb_placeholders,
    expand_vision_pads,
)
from btoks_jax.processing.tokenizer import (
    QWEN2VL_SPECIAL_TOKENS,
    add_btok_tokens,
    btok_token,
    load_tokenizer,
    save_tokenizer,
)
from btoks_jax.processing.video import VideoProcessor, bicubic_resize_like_torch, sample_frame_indices

__all__ = [
    "IMAGE_TOKEN",
    "MODEL_PROMPT_STYLES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PROMPT_STYLES",
    "QWEN2VL_SPECIAL_TOKENS",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "ImageProcessor",
    "Processor",
    "VideoProcessor",
    "add_btok_tokens",
    "bicubic_resize_like_torch",
    "btok_token",
    "convert_mmeb_placeholders",
    "expand_vision_pads",
    "load_image",
    "load_tokenizer",
    "sample_frame_indices",
    "save_tokenizer",
    "smart_resize",
]
