"""Qwen2-VL video preprocessing on the host (NumPy), following `transformers`' `Qwen2VLVideoProcessor`.

Mirrored from `video_processing_qwen2_vl.py` (transformers 5.24):
- defaults: min_pixels 128*28*28, max_pixels 28*28*768 per frame, no frame sampling (`do_sample_frames=False`);
  `num_frames` gives HF's uniform sampling (`sample_frame_indices`); the `fps` variant needs decoder metadata
  and is not offered;
- `cap_pixels_per_frame` (off by default, as in HF) bounds each frame by an even share of `max_video_tokens`;
- one `smart_resize` per video (all frames of a video share a size);
- the resize: HF calls torchvision's bicubic antialiased resize on uint8 tensors, which on CPU is
  `torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True)`. `bicubic_resize_like_torch` restates
  that kernel (Keys cubic a=-0.5 with antialiasing support, int16 fixed-point weights, width pass then height
  pass, each rounded to uint8) and matches it bit for bit (tests/test_processing.py; also checked on 344 random
  sizes with torch's AVX512 and default CPU kernels). Pillow's bicubic, used for images, differs from it by up to
  7 uint8 levels when both sides change by a few percent, since Pillow picks the pass order by size;
- rescale and normalise fused as HF does, (x - 255*mean) / (255*std) in float32;
- frames padded to a multiple of temporal_patch_size by repeating the last one; the patch order of image.py.

Not mirrored: HF resizes on an accelerator when asked (float kernel, a different result); frames are made RGB
like images (image.py `load_image`), while HF's tensor path composites alpha with its own arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from btoks_jax.processing.image import (
    IMAGE_PROCESSOR_CONFIG,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageLike,
    config_fields,
    load_image,
    patchify,
    pixel_bounds,
    read_processor_config,
    smart_resize,
    write_config,
)

VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"
BICUBIC = 3  # PIL's / transformers' resample code for bicubic, the only filter the video path implements


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    # Keys' cubic; a = -0.5 is what torch's antialiased (and Pillow's) bicubic use, not the -0.75 of plain bicubic.
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _fixed_point_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices int64[out, K], int16-range weights int64[out, K] and their precision in bits."""
    scale = in_size / out_size
    # When shrinking, the filter stretches by `scale` so every source pixel contributes (antialiasing).
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    center = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = np.arange(int((hi - lo).max()))
    w = _cubic((taps + lo[:, None] - center[:, None] + 0.5) * stretch)
    w = np.where(taps < (hi - lo)[:, None], w, 0.0)
    total = w.sum(1, keepdims=True)
    w = w / np.where(total == 0, 1.0, total)
    # The most bits that keep the largest weight below 2**15, as torch picks them (at most 22).
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    fixed = np.where(w < 0, w * (1 << bits) - 0.5, w * (1 << bits) + 0.5).astype(np.int64)  # C cast: toward 0
    return np.minimum(lo[:, None] + taps, in_size - 1), fixed, bits


def _resize_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    index, weight, bits = _fixed_point_weights(x.shape[axis], out_size)
    weight_shape = [out_size if d == axis else 1 for d in range(x.ndim)]
    # int32 accumulation, as torch's kernel does (the sum stays below 2**31 for 22-bit weights).
    acc = np.full((*x.shape[:axis], out_size, *x.shape[axis + 1 :]), 1 << (bits - 1), np.int32)
    term = np.empty_like(acc)
    for k in range(index.shape[1]):
        np.multiply(np.take(x, index[:, k], axis=axis), weight[:, k].astype(np.int32).reshape(weight_shape), out=term)
        acc += term
    return np.clip(acc >> bits, 0, 255).astype(np.uint8)


def bicubic_resize_like_torch(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8[T, H, W, C] -> uint8[T, height, width, C], equal to torch's CPU uint8 bicubic antialiased
    interpolate (what torchvision's resize runs for HF's video processor)."""
    if width != frames.shape[2]:
        frames = _resize_axis(frames, 2, width)
    if height != frames.shape[1]:
        frames = _resize_axis(frames, 1, height)
    return frames


def sample_frame_indices(total_frames: int, num_frames: int, temporal_patch_size: int = 2) -> np.ndarray:
    """Uniform frame indices as HF's `sample_frames(num_frames=...)`: `num_frames` rounded to a multiple of
    temporal_patch_size, then `torch.arange(0, total, total / n).int()` (float32 values, truncated)."""
    n = round(num_frames / temporal_patch_size) * temporal_patch_size
    if n > total_frames:
        raise ValueError(f"Video can't be sampled: num_frames={n} exceeds total_frames={total_frames}.")
    step = total_frames / n
    # torch.arange sizes the range with a float64 ceil and computes values in float64 before the float32 cast.
    count = math.ceil(total_frames / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def linspace_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """The authors' (and VLM2Vec's) frame choice: `linspace(0, n - 1, num_frames)` truncated to ints when the
    video has at least `num_frames` frames, every frame otherwise (no padding)."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    if total_frames < num_frames:
        return np.arange(total_frames)
    return np.linspace(0, total_frames - 1, num_frames).astype(np.int64)


def _named(frame: ImageLike) -> str:
    return f" ({os.fspath(frame)})" if isinstance(frame, (str, os.PathLike)) else ""


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"


FRAME_SAMPLING = ("hf", "linspace")


@dataclasses.dataclass(frozen=True)
class VideoProcessor:
    """Host-side `Qwen2VLVideoProcessor`; defaults are HF's class defaults (module doc for what differs)."""

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 28 * 28 * 768
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    num_frames: int | None = None
    # How `num_frames` frames are picked: "hf" (`sample_frame_indices`, what HF's processor does) or
    # "linspace" (`linspace_frame_indices`, the authors' training and evaluation readers).
    frame_sampling: str = "hf"
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VideoProcessor:
        """From a HF video (or, as HF falls back to, image) processor config dict."""
        if config.get("resample", BICUBIC) != BICUBIC:
            raise ValueError(f"Only bicubic resampling (3) is implemented, config asks for {config['resample']}.")
        min_pixels, max_pixels = pixel_bounds(config, cls.min_pixels, cls.max_pixels)
        fields = config_fields(cls, config)
        if not config.get("do_sample_frames", False):
            fields.pop("num_frames", None)
        elif fields.get("num_frames") is None:
            raise ValueError("do_sample_frames without num_frames (fps sampling) is not supported.")
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **fields)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> VideoProcessor:
        """HF's precedence: processor_config.json["video_processor"], video_preprocessor_config.json, then
        preprocessor_config.json; so a Qwen2-VL checkpoint without a video config gets its image pixel bounds."""
        return cls.from_dict(
            read_processor_config(directory, "video_processor", [VIDEO_PROCESSOR_CONFIG, IMAGE_PROCESSOR_CONFIG])
        )

    def __post_init__(self):
        if self.frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLING}, got {self.frame_sampling!r}")

    def to_dict(self) -> dict[str, Any]:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        config.pop("frame_sampling")  # not a Hugging Face setting
        config["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        config["do_sample_frames"] = self.num_frames is not None
        config["resample"] = BICUBIC
        return {**config, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes `video_preprocessor_config.json` into a local folder (created) or a URL."""
        write_config(directory, VIDEO_PROCESSOR_CONFIG, self.to_dict())

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Per-frame pixel size of a video of `num_frames` frames (before temporal padding)."""
        if not self.do_resize:
            return height, width
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            total_pixels = int(self.max_video_tokens * factor * factor * 0.9)
            share = total_pixels * self.temporal_patch_size // num_frames
            max_pixels = max(min(max_pixels, share), int(self.min_pixels * 1.05))
        return smart_resize(height, width, factor, self.min_pixels, max_pixels)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 -> float32 with HF's fused rescale+normalise: mean and std scaled by 1/rescale_factor in float32."""
        x = pixels.astype(np.float32)
        mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
        if self.do_normalize:
            if self.do_rescale:
                inverse = np.float32(1.0 / self.rescale_factor)
                mean, std = mean * inverse, std * inverse
            return (x - mean) / std
        return x * np.float32(self.rescale_factor) if self.do_rescale else x

    def preprocess_one(self, frames: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """One video (a list of frames) -> (float32[gt*gh*gw, C*tp*ps*ps], int64[3] grid (gt, gh, gw))."""
        if self.num_frames is not None and self.frame_sampling == "linspace":
            frames = [frames[i] for i in linspace_frame_indices(len(frames), self.num_frames)]
        elif self.num_frames is not None:
            frames = [frames[i] for i in sample_frame_indices(len(frames), self.num_frames, self.temporal_patch_size)]
        if not frames:
            raise ValueError("a video needs at least one frame")
        pixels = [load_image(frame, self.do_convert_rgb) for frame in frames]  # MediaError names a bad file
        if len({p.shape for p in pixels}) != 1:
            odd = next(i for i, p in enumerate(pixels) if p.shape != pixels[0].shape)
            raise ValueError(f"All frames of a video must have one size: frame {odd + 1}{_named(frames[odd])} is "
                             f"{_size(pixels[odd])}, frame 1{_named(frames[0])} {_size(pixels[0])}.")
        height, width = self.resized_size(len(pixels), *pixels[0].shape[:2])
        pixels = np.stack(pixels)  # [T, H, W, C]
        if self.do_resize:
            pixels = bicubic_resize_like_torch(pixels, height, width)
        video = self.normalize(pixels).transpose(0, 3, 1, 2)  # [T, C, H, W]
        if pad := -len(video) % self.temporal_patch_size:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        patches = patchify(video, self.patch_size, self.temporal_patch_size, self.merge_size)
        grid = (len(video) // self.temporal_patch_size, height // self.patch_size, width // self.patch_size)
        return patches, np.array(grid, np.int64)

    def __call__(self, videos: Sequence[Sequence[ImageLike]]) -> dict[str, np.ndarray]:
        """A list of videos, each a list of frames (PIL images, HxWx3 uint8 arrays or paths) or a uint8[T, H, W, 3]
        array -> pixel_values_videos float32[N_patches, 1176], video_grid_thw int64[num_videos, 3]."""
        patches, grids = zip(*(self.preprocess_one(list(video)) for video in videos))
        return {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.stack(grids)}
