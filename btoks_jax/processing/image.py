"""Qwen2-VL image preprocessing on the host: `transformers`' `Qwen2VLImageProcessorPil`, and what video.py shares.

Images go through transformers' PIL/NumPy backend (no torchvision), built from the frozen `ImageProcessor`
settings; it is imported on first use, since transformers imports torch with it when torch is installed. This
module keeps the project's side: the settings and their config files, reading files and checking arrays, and
the pieces the torch-free video path needs (`smart_resize`, `load_image`, `patchify`).

Patch layout, the one transformers gives image patches and `patchify` gives video patches. Legend: T frames,
C channels (3), tp temporal patch (2), ps patch pixels (14), m merge size (2); gt = T / tp, gh = H / ps, gw = W / ps
patches; bh = gh / m, bw = gw / m merge windows; mh, mw the position inside a window; ph, pw the pixel inside a patch.
A frame stack float32[T, C, H, W] becomes float32[gt * gh * gw, C * tp * ps * ps] with rows ordered
(gt, bh, bw, mh, mw), so each run of m*m rows is one merge window, and features ordered (C, tp, ph, pw), the order
of the Conv3d patch-embedding weights.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from btoks_jax import fs

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) divisible by `factor`, near the input aspect ratio, with area in [min_pixels, max_pixels].

    Port of `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`, same float expressions
    and errors, since a one-pixel difference changes the token count. The video path sizes frames with it:
    transformers' copies sit in modules that import torch.
    """
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    # round() is Python's half-to-even, as in the reference.
    new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def load_image(image: ImageLike, convert_rgb: bool = True) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels from a PIL image, an HxW / HxWxC uint8 array or an image file path (local, or a
    URL such as `gs://BUCKET/img.jpg`, read whole in one request through `btoks_jax.fs`).

    Files are opened as `transformers.image_utils.load_image` does (EXIF orientation applied, then
    `convert("RGB")`, which drops alpha); in-memory images with alpha are composited on white, as the HF
    image processor's `convert_to_rgb` does for PIL images and for arrays (float64 blend, rounded). A file that
    cannot be read raises `MediaError` naming it (`read_image`).
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        if not convert_rgb:
            return np.asarray(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise TypeError(f"Expected a uint8 HxW or HxWxC array, got {array.dtype} {array.shape}.")
    if not convert_rgb:
        return array
    array = array[..., None] if array.ndim == 2 else array
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    if array.shape[-1] != 3:
        raise ValueError(f"Expected 1, 3 or 4 channels, got shape {array.shape}.")
    return array


class MediaError(ValueError):
    """An image file that cannot be read: missing, empty, not an image Pillow can decode, truncated, or larger
    than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; twice that number of pixels is refused).
    `path` names the file (or `<N encoded bytes>`), `reason` says what is wrong. A ValueError, so the readers
    add the row and field and `btoks` reports it with exit status 2."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def _name(source: str | os.PathLike | bytes) -> str:
    return f"<{len(source)} encoded bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    """`Image.open` of a local file, a URL (read whole, one request) or encoded bytes."""
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if _is_url(source):
        return Image.open(io.BytesIO(fs.read_bytes(source)))
    return Image.open(source)


def _reason(source: str | os.PathLike | bytes, err: Exception) -> str:
    """What a failure to open or decode `source` means, in words."""
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(err, Image.DecompressionBombError):
        return f"{err} (Pillow's limit: 2 * PIL.Image.MAX_IMAGE_PIXELS = {2 * Image.MAX_IMAGE_PIXELS} pixels)"
    if isinstance(err, MemoryError):
        return "not enough memory to decode it"
    if isinstance(err, Image.UnidentifiedImageError):
        try:
            empty = len(source) == 0 if isinstance(source, (bytes, bytearray)) else fs.size(source) == 0
        except (OSError, ValueError):
            empty = False
        return "empty file (0 bytes)" if empty else "not an image file (Pillow cannot identify its format)"
    if isinstance(err, PermissionError):
        return "permission denied"
    text = str(err).strip() or "decoding failed"
    if text == "Truncated File Read":  # what `Image.verify` says of a truncated PNG
        return "image file is truncated"
    return text if isinstance(err, OSError) else f"{type(err).__name__}: {text}"


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an image file, a local path, a URL (`gs://BUCKET/img.jpg`, read whole in one
    request through `btoks_jax.fs`) or the file's encoded bytes, opened as `transformers.image_utils.load_image`
    does (EXIF orientation applied, then `convert("RGB")`).

    Raises MediaError naming the file, whatever goes wrong: a missing or empty file, one that is not an image,
    truncated or damaged data, an image over Pillow's decompression-bomb limit. Files are untrusted input, and
    Pillow's decoders raise many kinds of exception on damaged data (OSError, SyntaxError, EOFError, ...), so
    every Exception from opening and decoding becomes a MediaError."""
    try:
        with _open(source) as opened:
            return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    except Exception as err:  # every failure of untrusted data (see the docstring)
        raise MediaError(_name(source), _reason(source, err)) from None


def check_image(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """(width, height) of an image file, checked without decoding its pixels: it exists, Pillow identifies its
    format, its size is within the decompression-bomb limit, and its structure verifies (`Image.verify`: PNG
    chunks and checksums, so a truncated PNG fails here; a truncated JPEG shows only when decoded). Raises
    MediaError naming the file."""
    try:
        with _open(source) as opened:
            size = opened.size
            opened.verify()
            return size
    except Exception as err:  # as read_image
        raise MediaError(_name(source), _reason(source, err)) from None


def _is_url(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" in text and fs.is_remote(text)


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """float32[T, C, H, W] (T a multiple of temporal_patch_size) -> float32[gt*gh*gw, C*tp*ps*ps] (module doc)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    m = merge_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // m, m, patch_size, gw // m, m, patch_size)
    # [gt, tp, C, bh, mh, ph, bw, mw, pw] -> [gt, bh, bw, mh, mw, C, tp, ph, pw]
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def pixel_bounds(config: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """(min_pixels, max_pixels) from a HF config: top-level `min_pixels`/`max_pixels` win over `size`."""
    size = config.get("size") or {}
    min_pixels = _first_set(config.get("min_pixels"), size.get("shortest_edge"), size.get("min_pixels"), default_min)
    max_pixels = _first_set(config.get("max_pixels"), size.get("longest_edge"), size.get("max_pixels"), default_max)
    return int(min_pixels), int(max_pixels)


def read_processor_config(directory: str | os.PathLike, key: str, filenames: Sequence[str]) -> dict[str, Any]:
    """A sub-processor's config with HF's precedence: `processor_config.json[key]`, then each of `filenames`.
    `directory`: a local folder or a URL."""
    directory = fs.as_path(directory)
    nested = fs.joinpath(directory, PROCESSOR_CONFIG)
    if fs.isfile(nested):
        config = json.loads(fs.read_text(nested))
        if key in config:
            return config[key]
    for name in filenames:
        if fs.isfile(fs.joinpath(directory, name)):
            return json.loads(fs.read_text(fs.joinpath(directory, name)))
    raise FileNotFoundError(f"None of {PROCESSOR_CONFIG}[{key!r}], {', '.join(filenames)} in {directory}.")


def write_config(directory: str | os.PathLike, name: str, config: dict[str, Any]) -> None:
    """`directory/name` as indented JSON with sorted keys; a local folder is created first."""
    fs.makedirs(directory)
    fs.write_text(fs.join(directory, name), json.dumps(config, indent=2, sort_keys=True))


def config_fields(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The dataclass fields of `cls` present in a HF config, lists turned into tuples (frozen, hashable)."""
    names = {field.name for field in dataclasses.fields(cls)} - {"min_pixels", "max_pixels"}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Settings of transformers' `Qwen2VLImageProcessorPil`, which a call runs; defaults are HF's class defaults (a
    checkpoint's config overrides)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """From a HF `preprocessor_config.json` dict (`min_pixels`/`max_pixels` or `size` form)."""
        min_pixels, max_pixels = pixel_bounds(config, cls.min_pixels, cls.max_pixels)
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **config_fields(cls, config))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ImageProcessor:
        return cls.from_dict(read_processor_config(directory, "image_processor", [IMAGE_PROCESSOR_CONFIG]))

    def to_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` that transformers' Qwen2-VL image processor reads back (both size forms)."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        config["size"] = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return {**config, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes `preprocessor_config.json` into a local folder (created) or a URL."""
        write_config(directory, IMAGE_PROCESSOR_CONFIG, self.to_dict())

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """images (one, or a list) -> pixel_values float32[N_patches, 1176], image_grid_thw int64[num_images, 3]."""
        if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]
        out = _hf_image_processor(self)([_hf_input(image) for image in images], input_data_format="channels_last")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _hf_input(image: ImageLike) -> Image.Image | np.ndarray:
    """One image as transformers' processor takes it: files read by `load_image` (no URLs or base64), uint8
    arrays checked and given a channel axis when HxW; RGB conversion is left to transformers."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise TypeError(f"Expected a uint8 HxW or HxWxC array, got {array.dtype} {array.shape}.")
    return array[..., None] if array.ndim == 2 else array


@functools.lru_cache(maxsize=8)
def _hf_image_processor(settings: ImageProcessor):
    """transformers' `Qwen2VLImageProcessorPil` with these settings, built once per process."""
    from transformers import Qwen2VLImageProcessorPil

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    return Qwen2VLImageProcessorPil(**kwargs)
