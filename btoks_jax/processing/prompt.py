"""Prompts to model inputs: MMEB placeholders, vision-pad expansion and the combined `Processor`.

`Processor.__call__` returns what `transformers.Qwen2VLProcessor` returns (5.x, `return_tensors="np"`), checked
token for token in tests/test_processing.py: every `<|image_pad|>` / `<|video_pad|>` in the text becomes
grid_t * grid_h * grid_w // merge_size**2 copies, images and videos are consumed in order of appearance across
the batch, and `mm_token_type_ids` marks text 0, image 1, video 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from btoks_jax.processing.image import ImageLike, ImageProcessor
from btoks_jax.processing.tokenizer import load_tokenizer, save_tokenizer
from btoks_jax.processing.video import VideoProcessor

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
_MMEB_PLACEHOLDER = re.compile(r"<\|(image|video)_\d+\|>")

# How a side's MMEB placeholders (`<|image_1|>`, `<|video_1|>`) reach the model. "btoks": the prompt of the
# paper's authors (section 7 of PAPER.md), pads wrapped in `<|vision_start|>..<|vision_end|>` and training sides put
# in their canonical form; "vlm2vec": VLM2Vec's, bare pads; "mmeb": the placeholders kept, as the files and the
# ArrayRecord copy store them (a form rows are read in, not one a model is fed).
PROMPT_STYLES = ("btoks", "vlm2vec", "mmeb")
# The styles a model is trained on and embeds with (the training config, `Embedder.prompt_style`).
MODEL_PROMPT_STYLES = tuple(style for style in PROMPT_STYLES if style != "mmeb")


def convert_mmeb_placeholders(text: str, wrap_vision: bool = False) -> str:
    """MMEB placeholders (`<|image_1|>`, `<|video_1|>`) to Qwen2-VL pads.

    `wrap_vision=False` is the VLM2Vec prompt (a bare pad, so HF's `get_rope_index` gives 1-D positions);
    `wrap_vision=True` the BToks one, `<|vision_start|><|image_pad|><|vision_end|>` (3-D M-RoPE).
    """

    def replace(match: re.Match) -> str:
        pad = IMAGE_TOKEN if match.group(1) == "image" else VIDEO_TOKEN
        return f"{VISION_START}{pad}{VISION_END}" if wrap_vision else pad

    return _MMEB_PLACEHOLDER.sub(replace, text)


def expand_vision_pads(texts: Sequence[str], image_tokens: Sequence[int], video_tokens: Sequence[int]) -> list[str]:
    """Replaces the i-th pad of each kind, counted across the whole batch, by `image_tokens[i]` (or
    `video_tokens[i]`) copies of itself. Raises if the pad counts and the item counts differ."""
    for token, counts, kind in ((IMAGE_TOKEN, image_tokens, "images"), (VIDEO_TOKEN, video_tokens, "videos")):
        found = sum(text.count(token) for text in texts)
        if found != len(counts):
            raise ValueError(f"Found {found} {token} tokens in the text but {len(counts)} {kind} were passed.")
    remaining = {IMAGE_TOKEN: iter(image_tokens), VIDEO_TOKEN: iter(video_tokens)}
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
    return [pattern.sub(lambda m: m.group() * int(next(remaining[m.group()])), text) for text in texts]


class Processor:
    """Tokenizer + image processor + video processor, the host side of one model call."""

    def __init__(
        self,
        tokenizer,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> Processor:
        """Tokenizer files, preprocessor_config.json and the video config HF would pick (see video.py)."""
        return cls(
            load_tokenizer(directory),
            ImageProcessor.from_pretrained(directory),
            VideoProcessor.from_pretrained(directory),
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Tokenizer files, preprocessor_config.json and video_preprocessor_config.json (HF-readable)."""
        save_tokenizer(self.tokenizer, directory)
        self.image_processor.save_pretrained(directory)
        self.video_processor.save_pretrained(directory)

    def __call__(
        self,
        text: Sequence[str],
        images: Sequence[ImageLike] | None = None,
        videos: Sequence[Sequence[ImageLike]] | None = None,
        padding: bool | str = True,
        padding_side: str = "right",
        max_length: int | None = None,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """A batch of prompts with their images and videos (flat lists, in order of appearance) ->
        input_ids, attention_mask, mm_token_type_ids int64[B, T]; pixel_values float32[P, 1176] and
        image_grid_thw int64[num_images, 3] when images are given; pixel_values_videos float32[P', 1176] and
        video_grid_thw int64[num_videos, 3] when videos are given (absent otherwise, as in HF)."""
        texts = [text] if isinstance(text, str) else list(text)
        vision: dict[str, np.ndarray] = {}
        image_tokens: list[int] = []
        video_tokens: list[int] = []
        if images is not None:
            vision.update(self.image_processor(images))
            image_tokens = list(vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2)
        if videos is not None:
            vision.update(self.video_processor(videos))
            video_tokens = list(vision["video_grid_thw"].prod(-1) // self.video_processor.merge_size**2)
        expanded = expand_vision_pads(texts, image_tokens, video_tokens)
        encoded = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            max_length=max_length,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="np",
        )
        input_ids = encoded["input_ids"].astype(np.int64)
        for token, token_id in ((IMAGE_TOKEN, self.image_token_id), (VIDEO_TOKEN, self.video_token_id)):
            want = [text.count(token) for text in expanded]
            if (input_ids == token_id).sum(-1).tolist() != want:
                raise ValueError(f"{token} tokens were lost in tokenization (truncation?); expected {want} per row.")
        mm_token_type_ids = np.where(input_ids == self.image_token_id, 1, 0)
        mm_token_type_ids = np.where(input_ids == self.video_token_id, 2, mm_token_type_ids).astype(np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": encoded["attention_mask"].astype(np.int64),
            "mm_token_type_ids": mm_token_type_ids,
            **vision,
        }
