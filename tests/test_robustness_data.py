"""Bad data and untrusted files: every reader names the file, the row and the field of a bad input, with one
clear message (exit status 2 from `btoks`), media paths stay inside their data folder unless allowed, texts have
a token budget, and weights load from safetensors only (docs/robustness.md)."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from btoks_jax import cli
from btoks_jax.data import mmeb_train
from btoks_jax.data.media import RowError
from btoks_jax.evaluate import mmeb
from btoks_jax.processing.image import MediaError, check_image, read_image

PACKAGE = Path(__file__).resolve().parents[1] / "btoks_jax"
FUZZ = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ===================================== tiny files =====================================


def _noise(size=(48, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """data/: good and bad images, frame folders and links; outside/: a file the rows must not reach."""
    root = tmp_path_factory.mktemp("robust")
    data, outside = root / "data", root / "outside"
    (data / "frames").mkdir(parents=True)
    (data / "one").mkdir()
    (data / "mixed").mkdir()
    (data / "linked").mkdir()
    outside.mkdir()
    png, jpg = _encoded(_noise(), "PNG"), _encoded(_noise(seed=1), "JPEG")
    (data / "good.png").write_bytes(png)
    (data / "good.jpg").write_bytes(jpg)
    (data / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (data / "empty.png").write_bytes(b"")
    (data / "text.png").write_text("not an image\n")
    (data / "bomb.png").write_bytes(_png_header(20000, 20000))  # 4e8 pixels: over 2 * PIL.Image.MAX_IMAGE_PIXELS
    for i in range(2):
        (data / "frames" / f"{i:03d}.png").write_bytes(_encoded(_noise(seed=10 + i), "PNG"))
    (data / "one" / "000.png").write_bytes(png)
    (data / "mixed" / "000.png").write_bytes(png)
    (data / "mixed" / "001.png").write_bytes(_encoded(_noise((24, 24)), "PNG"))
    (outside / "secret.png").write_bytes(png)
    (data / "link.png").symlink_to(outside / "secret.png")
    (data / "inside_link.png").symlink_to(data / "good.png")
    (data / "linked" / "000.png").write_bytes(png)
    (data / "linked" / "001.png").symlink_to(outside / "secret.png")
    return data, outside


def _rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _embed_cli(path: Path, *extra: str) -> list[str]:
    """`btoks embed` arguments; the model directory does not exist: rows are read before any model is loaded."""
    return ["embed", "--model", str(path.parent / "no_model"), "--input", str(path), "--output",
            str(path.with_suffix(".npy")), *extra]


# ===================================== btoks embed rows =====================================

BAD_MEDIA = [  # (file, what the message says)
    ("truncated.png", "image file is truncated"),
    ("empty.png", "empty file (0 bytes)"),
    ("text.png", "not an image file"),
    ("bomb.png", "exceeds limit of"),
    ("missing.png", "image file not found"),
]


def test_embed_wrong_type_names_row_and_field(media, capsys):
    data, _ = media
    path = _rows(data / "typed.jsonl", [{"text": "ok"}, {"text": 5}])
    assert cli.main(_embed_cli(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 2: field 'text': expected a string, got int" in err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("name,reason", BAD_MEDIA)
def test_embed_bad_image_names_file_row_and_field(media, capsys, name, reason):
    data, _ = media
    path = _rows(data / f"bad_{name}.jsonl", [{"text": "ok"}, "", {"text": "x", "image": name}])
    assert cli.main(_embed_cli(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 3: field 'image': " in err and str(data / name) in err and reason in err.lower(), err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("value,reason", [
    ("../../../etc/hostname", "'..' leads out of it"),
    ("../outside/secret.png", "'..' leads out of it"),
    ("ABSOLUTE", "an absolute path"),
    ("link.png", "a symbolic link that points to"),
])
def test_embed_media_path_must_stay_in_the_folder(media, capsys, value, reason):
    data, outside = media
    value = str(outside / "secret.png") if value == "ABSOLUTE" else value
    path = _rows(data / "escape.jsonl", [{"image": value}])
    assert cli.main(_embed_cli(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 1: field 'image': media path {value!r} is outside the data folder {data}" in err, err
    assert reason in err and "--allow-outside-media" in err
    if value != "../../../etc/hostname":
        items = cli._read_embed_rows(str(path), allow_outside_root=True)  # the opt-in reads it
        assert Path(items[0].image).resolve() == (outside / "secret.png").resolve()


def test_embed_paths_that_stay_inside_are_read(media):
    data, _ = media
    path = _rows(data / "inside.jsonl", [{"image": "inside_link.png"}, {"image": str(data / "good.png")},
                                         {"image": "frames/../good.jpg"}, {"video": "frames"}])
    items = cli._read_embed_rows(str(path))
    assert [Path(i.image).name for i in items[:3]] == ["inside_link.png", "good.png", "good.jpg"]
    assert len(items[3].video) == 2


@pytest.mark.parametrize("video,field_message", [
    (["frames/000.png"], "1 frame(s): a video needs at least 2"),
    ("one", "1 frame(s) in"),
    (["frames/000.png", "frames/404.png"], "frame file not found"),
    (["frames/000.png", "truncated.png"], "cannot read frame"),
    ("linked", "a symbolic link that points to"),
    (["frames/000.png", "../outside/secret.png"], "is outside the data folder"),
    (5, "expected a folder or a list of frame paths, got int"),
])
def test_embed_bad_video_names_row_and_field(media, capsys, video, field_message):
    data, _ = media
    path = _rows(data / "video.jsonl", [{"text": "a", "video": "frames"}, {"text": "b", "video": video}])
    assert cli.main(_embed_cli(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 2: field 'video': " in err and field_message in err, err


@pytest.mark.parametrize("line,message", [
    ('{"text": "a"', "row 1: not valid JSON"),
    ("[1, 2]", "row 1: expected a JSON object, got list"),
    ('{"text": "a", "colour": 1}', "row 1: unknown field(s) ['colour']"),
    ("{}", "row 1: empty input"),
    ('{"text": "", "image": null}', "row 1: empty input"),
])
def test_embed_malformed_rows(media, capsys, line, message):
    data, _ = media
    path = _rows(data / "malformed.jsonl", [line])
    assert cli.main(_embed_cli(path)) == 2
    assert f"{path}: {message}" in capsys.readouterr().err


def test_embed_invalid_utf8_names_the_row(media, capsys):
    data, _ = media
    path = data / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert cli.main(_embed_cli(path)) == 2
    assert f"{path}: row 2: not valid UTF-8" in capsys.readouterr().err


# ===================================== the embedder: media decoded at embedding time, text budget ============


@pytest.fixture(scope="module")
def preprocessing():
    """An Embedder without a model: what runs before the model (prompts, text budget, image and video loading)."""
    from btoks_jax.api import Embedder
    from btoks_jax.model_config import tiny_config
    from btoks_jax.processing import Processor, load_tokenizer

    return Embedder(model=None, processor=Processor(load_tokenizer()), config=tiny_config(), num_btoks=4,
                    prompt_style="btoks")


def test_undecodable_image_is_an_item_error_with_its_row(media, preprocessing):
    """A truncated JPEG opens (its header is intact), so the reader passes it; decoding fails in the batch, and the
    error names the item, which `btoks embed` turns into its row (cli._embed)."""
    data, _ = media
    path = _rows(data / "late.jsonl", [{"image": "good.png"}, {"text": "t"}, {"image": "truncated.jpg"}])
    items, numbers = cli._read_embed_rows(str(path), with_rows=True)
    with pytest.raises(mmeb.ItemError) as caught:
        preprocessing.embed_items(items, batch_size=4, progress=False)
    err = caught.value
    assert err.index == 2 and err.field == "image" and isinstance(err, ValueError)
    message = str(err.at(f"{path}: row {numbers[err.index]}"))
    assert message.startswith(f"{path}: row 3: field 'image': cannot read image {data / 'truncated.jpg'}: image file "
                              "is truncated")


def test_frames_of_different_sizes_name_the_frames(media, preprocessing):
    data, _ = media
    items = cli._read_embed_rows(str(_rows(data / "mixed.jsonl", [{"video": "mixed"}])))
    err = preprocessing.find_unreadable(items)
    assert err.index == 0 and err.field == "video"
    assert "frame 2 (" in err.message and str(data / "mixed" / "001.png") in err.message and "one size" in err.message


def _text_tokens(tokenizer, text: str) -> int:
    from btoks_jax.api import _count_text_tokens, _split_added_tokens

    return _count_text_tokens(tokenizer, _split_added_tokens(tokenizer, text))


def test_text_budget_cuts_text_never_vision_or_special_tokens(media, preprocessing):
    from btoks_jax.api import item_prompt

    data, _ = media
    words = " ".join(f"word{i % 977}" for i in range(50_000))
    items = [mmeb.Item(text=words), mmeb.Item(text="a short caption"),
             mmeb.Item(text=words, image=str(data / "good.png"), instruction="<|image_1|>\nRepresent the image:")]
    preprocessing.max_text_tokens = 64
    try:
        start = time.perf_counter()
        out, cut = preprocessing.apply_text_budget(items)
        elapsed = time.perf_counter() - start
    finally:
        preprocessing.max_text_tokens = 8192
    assert cut == 2 and out[1] is items[1] and elapsed < 5
    tok = preprocessing.processor.tokenizer
    for before, after in zip(items, out):
        prompt = item_prompt(after, "btoks")
        assert _text_tokens(tok, prompt) <= 64
        assert prompt.count("<|image_pad|>") == before.kind.count("image")
    assert item_prompt(out[2], "btoks").startswith("<|vision_start|><|image_pad|><|vision_end|>\nRepresent the image:")
    assert _text_tokens(tok, item_prompt(out[0], "btoks")) >= 60
    hf = preprocessing.processor([item_prompt(out[2], "btoks")], images=[out[2].image])
    assert (hf["input_ids"] == 151655).sum() == hf["image_grid_thw"].prod() // 4  # every vision token kept
    assert out[0].image is None and out[2].image == items[2].image


def test_text_budget_is_exact_on_multibyte_text_and_bounded_on_huge_text(preprocessing):
    from btoks_jax.api import truncate_text_tokens

    tok = preprocessing.processor.tokenizer
    text = "混合テキスト🙂 and ASCII, ünïcödé " * 400
    for budget in (1, 7, 100):
        cut, was_cut = truncate_text_tokens(tok, text, budget)
        assert was_cut and _text_tokens(tok, cut) <= budget and text.startswith(cut)
    start = time.perf_counter()
    huge, was_cut = truncate_text_tokens(tok, "x" * 20_000_000 + "<|vision_start|><|image_pad|><|vision_end|>", 32)
    assert was_cut and huge.endswith("<|vision_start|><|image_pad|><|vision_end|>") and len(huge) < 100_000
    assert time.perf_counter() - start < 5
    assert truncate_text_tokens(tok, "short", 8) == ("short", False)


# ===================================== btoks eval rows =====================================

EVAL_GOOD = {"qry_inst": "Find:", "qry_text": "a cat", "qry_img_path": "", "tgt_inst": "",
             "tgt_text": ["", ""], "tgt_img_path": ["good.png", "good.jpg"]}


@pytest.mark.parametrize("change,field,message", [
    ({"qry_inst": "", "qry_text": ""}, "qry_text", "the query has no text, image or video"),
    ({"qry_text": None, "qry_inst": None}, "qry_text", "the query has no text, image or video"),
    ({"qry_inst": None, "qry_text": "", "qry_img_path": None}, "qry_text", "no text, image or video"),
    ({"tgt_text": "a"}, "tgt_text", "expected a list of strings"),
    ({"qry_text": 5}, "qry_text", "expected a string, got int"),
    ({"qry_img_path": "missing.png"}, "qry_img_path", "image file not found"),
    ({"tgt_img_path": ["good.png", "../outside/secret.png"]}, "tgt_img_path", "outside the data folder"),
    ({"qry_img_path": "link.png"}, "qry_img_path", "a symbolic link that points to"),
    ({"qry_video_path": ["frames/000.png"]}, "qry_video_path", "a video needs at least 2"),
    ({"qry_frame_paths": "one"}, "qry_frame_paths", "a video needs at least 2"),
])
def test_eval_rows_name_file_row_and_field(media, change, field, message):
    data, _ = media
    bad = {**EVAL_GOOD, **change}
    path = _rows(data / "eval_test.jsonl", [EVAL_GOOD, bad])
    with pytest.raises(ValueError) as caught:
        mmeb.read_eval_rows(path)
    assert str(caught.value).startswith(f"{path}: row 2: field '{field}': "), str(caught.value)
    assert message in str(caught.value)


def test_eval_missing_field(media):
    data, _ = media
    path = _rows(data / "eval_missing.jsonl", [{k: v for k, v in EVAL_GOOD.items() if k != "qry_inst"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}: row 1: field 'qry_inst': missing")):
        mmeb.read_eval_rows(path)


def test_eval_outside_media_is_read_with_the_opt_in(media):
    data, outside = media
    path = _rows(data / "eval_out.jsonl", [{**EVAL_GOOD, "qry_img_path": str(outside / "secret.png")}])
    with pytest.raises(ValueError, match="an absolute path"):
        mmeb.read_eval_rows(path)
    assert mmeb.read_eval_rows(path, allow_outside_root=True)[0].query.image == str(outside / "secret.png")


def test_eval_names_the_row_of_an_item_that_cannot_be_embedded(media, preprocessing):
    """The images open, so the rows read; decoding fails at embedding time, and the row and field are named. A
    query is never dropped: every row is scored or the run stops."""
    data, _ = media
    rows_path = _rows(data / "late_test.jsonl", [EVAL_GOOD, {**EVAL_GOOD, "tgt_img_path": ["good.png",
                                                                                           "truncated.jpg"]}])
    rows = mmeb.read_eval_rows(rows_path)

    def embed_fn(items):  # the embedder's own preprocessing, then constant vectors
        bad = preprocessing.find_unreadable(items)
        if bad is not None:
            raise bad
        return np.ones((len(items), 4), np.float32)

    with pytest.raises(ValueError) as caught:
        mmeb.evaluate_dataset(rows, embed_fn, progress=False)
    assert str(caught.value).startswith(f"{rows_path}: row 2: field 'tgt_img_path': entry 2: cannot read image "
                                        f"{data / 'truncated.jpg'}: image file is truncated"), str(caught.value)

    def plain_fn(items):  # any embedding function that reads the files: its MediaError is placed the same way
        for item in items:
            if item.image:
                read_image(item.image)
        return np.ones((len(items), 4), np.float32)

    with pytest.raises(ValueError, match=r"late_test\.jsonl: row 2: field 'tgt_img_path': entry 2: cannot read"):
        mmeb.evaluate_dataset(rows, plain_fn, progress=False)
    assert mmeb.evaluate_dataset(rows[:1], plain_fn, progress=False)["num_data"] == 1


# ===================================== training rows and the ArrayRecord builder =====================================

TRAIN_GOOD = {"qry": "<|image_1|>\nWhat is it?", "qry_image_path": "good.png", "pos_text": "noise",
              "pos_image_path": ""}


@pytest.mark.parametrize("change,field,message", [
    ({"qry_image_path": "../outside/secret.png"}, "qry_image_path", "outside the data folder"),
    ({"qry_image_path": "link.png"}, "qry_image_path", "a symbolic link"),
    ({"pos_image_path": "ABSOLUTE", "pos_text": "<|image_1|>"}, "pos_image_path", "an absolute path"),
    ({"qry": "<|video_1|>\nclip", "qry_image_path": "", "qry_video_path": ["frames/000.png"]}, "qry_video_path",
     "a video needs at least 2"),
    ({"qry": "<|video_1|>\nclip", "qry_image_path": "", "qry_video_path": "linked"}, "qry_video_path",
     "a symbolic link"),
    ({"qry_image_path": "missing.png"}, "qry_image_path", "image file not found"),
    ({"pos_text": 3}, "pos_text", "expected a string, got int"),
])
def test_training_rows_name_file_row_and_field(media, change, field, message):
    data, outside = media
    bad = {k: (str(outside / "secret.png") if v == "ABSOLUTE" else v) for k, v in {**TRAIN_GOOD, **change}.items()}
    path = _rows(data / "train.jsonl", [TRAIN_GOOD, bad])
    with pytest.raises(ValueError) as caught:
        mmeb_train.read_mmeb_train(path)
    assert str(caught.value).startswith(f"{path}: row 2: field '{field}': "), str(caught.value)
    assert message in str(caught.value)
    if "outside" in message or "symbolic" in message or "absolute" in message:
        assert len(mmeb_train.read_mmeb_train(path, allow_outside_root=True)) == 2


@pytest.mark.parametrize("name,reason", BAD_MEDIA[:4] + [("truncated.jpg", "image file is truncated")])
def test_training_media_decode_names_file_row_and_field(media, name, reason):
    data, _ = media
    path = _rows(data / "train_media.jsonl", [TRAIN_GOOD, {**TRAIN_GOOD, "qry_image_path": name},
                                              {**TRAIN_GOOD, "qry": "<|video_1|>\nclip", "qry_image_path": "",
                                               "qry_video_path": ["frames/000.png", name]}])
    rows = mmeb_train.read_mmeb_train(path)
    for number, field, kind in ((2, "qry_image_path", "image"), (3, "qry_video_path", "frame")):
        with pytest.raises(ValueError) as caught:
            mmeb_train.load_media(rows[number - 1], "query")
        message = str(caught.value)
        assert message.startswith(f"{path}: row {number}: field '{field}': cannot read {kind} {data / name}: "), message
        assert reason in message.lower() and message.count("cannot read") == 1
    # Bytes read back from the ArrayRecord copy name the row the same way.
    row = rows[1]
    encoded = mmeb_train.TrainRow(mmeb_train.Side(row.query.text, (data / name).read_bytes()), row.positive, None,
                                  row.source)
    with pytest.raises(ValueError, match=r"row 2: field 'qry_image_path': cannot read image <\d+ encoded bytes>"):
        mmeb_train.load_media(encoded, "query")


def test_tfds_builder_names_row_and_field_of_a_missing_or_corrupt_file(media):
    from btoks_jax.data.tfds_mmeb import _encode_side

    data, _ = media
    source = f"{data / 'train.jsonl'}: row 7"
    good = mmeb_train.Side("<|image_1|>", str(data / "good.png"))
    assert _encode_side(good, source, "query")["image"] == [(data / "good.png").read_bytes()]
    for side, field, reason in (
            (mmeb_train.Side("<|image_1|>", str(data / "gone.png")), "qry_image_path", "file not found"),
            (mmeb_train.Side("<|image_1|>", str(data / "text.png")), "qry_image_path", "not an image file"),
            (mmeb_train.Side("<|image_1|>", str(data / "empty.png")), "qry_image_path", "empty file"),
            (mmeb_train.Side("<|image_1|>", str(data / "truncated.png")), "qry_image_path", "image file is truncated"),
            (mmeb_train.Side("<|video_1|>", None, (str(data / "good.png"), str(data / "bomb.png"))),
             "qry_video_path", "exceeds limit")):
        with pytest.raises(ValueError) as caught:
            _encode_side(side, source, "query")
        assert str(caught.value).startswith(f"{source}: field '{field}': cannot read "), str(caught.value)
        assert reason in str(caught.value)


# ===================================== untrusted files: weights, code, configs =====================================


def test_package_never_unpickles_or_runs_remote_code():
    """Weights load from safetensors (Hugging Face directories) or Orbax (checkpoints); no pickle, no torch.load,
    no `trust_remote_code=True`, no eval / exec of anything read from a file."""
    patterns = {
        "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
        "torch.load": re.compile(r"torch\.load\("),
        "pickle": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|marshal)\b"),
        "eval / exec": re.compile(r"(?<![\w.])(eval|exec)\("),
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
        "yaml.load": re.compile(r"yaml\.(unsafe_)?load\("),
    }
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            found += [f"{path.relative_to(PACKAGE)}:{number}: {name}" for name, p in patterns.items() if p.search(code)]
    assert not found, found


def test_loaders_refuse_a_directory_of_pickled_weights(exported, tmp_path, capsys):
    """A `pytorch_model.bin` (a pickle: unpickling runs code) is never read: the directory is refused with a
    clear error, and the payload's side effect never happens."""
    import btoks_jax
    from btoks_jax.convert.safetensors_io import checkpoint_files

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        btoks_jax.from_pretrained(only_bin)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        checkpoint_files(str(only_bin))
    with_config = tmp_path / "with_config"
    with_config.mkdir()
    (with_config / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (with_config / "config.json").write_bytes((Path(exported) / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        btoks_jax.from_pretrained(with_config, shard=False)
    path = _rows(tmp_path / "in.jsonl", [{"text": "a"}])
    assert cli.main(["embed", "--model", str(only_bin), "--input", str(path), "--output", str(tmp_path / "o.npy")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not marker.exists()


# ===================================== property-based: only the documented errors =====================================

NAMES = ["good.png", "good.jpg", "truncated.png", "truncated.jpg", "empty.png", "text.png", "bomb.png", "link.png",
         "missing.png", "frames", "one", "mixed", "linked", "../outside/secret.png", "/etc/hostname", "", " ",
         "a\x00b", "x" * 300, "frames/../good.png", "gs://bucket/../x.png"]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
                    | st.sampled_from(NAMES),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                        max_size=3),
                    max_leaves=8)
VALUES = JSON | st.sampled_from(NAMES) | st.lists(st.sampled_from(NAMES), max_size=3)


def _fields(*names: str):
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=len(names))


def _check(err: Exception, path: Path) -> None:
    """A reader's error: a ValueError whose message starts with the file."""
    assert isinstance(err, ValueError) and not isinstance(err, (OSError, KeyError, TypeError)), repr(err)
    assert str(err).startswith(f"{path}: "), str(err)


@FUZZ
@given(lines=st.lists(st.one_of(_fields("text", "image", "video", "instruction", "id", "extra"), JSON,
                                st.binary(max_size=24).map(lambda b: b.decode("latin-1"))), min_size=0, max_size=4))
def test_fuzz_embed_rows(media, lines):
    data, _ = media
    path = data / "fuzz_embed.jsonl"
    path.write_bytes(b"\n".join(line.encode("utf-8") if isinstance(line, str) else json.dumps(line).encode()
                                for line in lines))
    try:
        cli._read_embed_rows(str(path))
    except Exception as err:  # what escapes is the point
        _check(err, path)
        assert ": row " in str(err) or str(err) == f"{path}: no rows", str(err)


@FUZZ
@given(raw=st.binary(max_size=64))
def test_fuzz_random_bytes_files(media, raw):
    data, _ = media
    for reader, name in ((cli._read_embed_rows, "fuzz_bytes.jsonl"), (mmeb.read_eval_rows, "fuzz_bytes_test.jsonl"),
                         (mmeb_train.read_mmeb_train, "fuzz_bytes_train.jsonl"),
                         (mmeb.read_eval_rows, "fuzz_bytes.parquet")):
        path = data / name
        path.write_bytes(raw)
        try:
            reader(str(path) if reader is cli._read_embed_rows else path)
        except Exception as err:
            _check(err, path)


@FUZZ
@given(records=st.lists(st.one_of(_fields("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text",
                                          "tgt_img_path", "qrels", "qry_video_path", "tgt_frame_paths"), JSON),
                        min_size=1, max_size=3))
def test_fuzz_eval_rows(media, records):
    data, _ = media
    path = data / "fuzz_eval_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        rows = mmeb.read_eval_rows(path)
    except Exception as err:
        _check(err, path)
        assert re.match(rf"{re.escape(str(path))}: row \d+: ", str(err)), str(err)
    else:
        assert len(rows) == len(records)  # no query dropped


@FUZZ
@given(record=st.one_of(_fields("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path",
                                "qry_video_path", "pos_video_path"), JSON))
def test_fuzz_training_records(media, record):
    data, _ = media
    try:
        mmeb_train.parse_record(record, data, "x.jsonl: row 1")
    except RowError as err:
        assert err.field and err.message
    path = _rows(data / "fuzz_train.jsonl", [record])
    try:
        mmeb_train.read_mmeb_train(path)
    except Exception as err:
        _check(err, path)
        assert f"{path}: row 1: " in str(err)


def _mutations():
    seeds = [_encoded(_noise((16, 12), seed=3), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]

    def mutate(args):
        seed, cut, flips = args
        data = bytearray(seeds[seed % len(seeds)])
        for position, value in flips:
            data[position % len(data)] = value
        return bytes(data[: max(0, len(data) - cut)])

    return st.tuples(st.integers(0, 5), st.integers(0, 400),
                     st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)).map(mutate)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=64), _mutations()))
def test_fuzz_image_loading(media, raw):
    data, _ = media
    path = data / "fuzz.png"
    path.write_bytes(raw)
    for load in (read_image, check_image):
        for source in (raw, path, str(path)):
            try:
                load(source)
            except MediaError as err:
                assert err.reason and (str(path) in str(err) or "encoded bytes" in str(err))


# ===================================== one tiny model, end to end =====================================


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny exported model directory, as tests/test_cli.py makes one."""
    from flax import nnx

    from btoks_jax.btoks import BToksModel
    from btoks_jax.convert.hf_export import export_hf
    from btoks_jax.model_config import tiny_config
    from btoks_jax.processing import load_tokenizer

    root = tmp_path_factory.mktemp("robust_model")
    model = BToksModel(tiny_config(), 4, rngs=nnx.Rngs(3))
    return export_hf(model, str(root / "hf"), tokenizer=load_tokenizer(), progress=False)


def test_cli_end_to_end_on_a_tiny_model(media, exported, capsys, caplog):
    """`btoks embed`: a 50,000-word text is cut to the budget with one counted warning, and an image that only
    fails when decoded names its row (exit 2). `btoks eval`: the same image as a candidate names its row and
    field."""
    data, _ = media
    words = " ".join(f"word{i % 977}" for i in range(50_000))
    path = _rows(data / "late_cli.jsonl", [{"text": words}, {"text": "short"}, {"image": "good.png", "text": words},
                                           {"image": "truncated.jpg"}])
    out = data / "late_cli.npy"
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="btoks_jax.api"):
        assert cli.main(["embed", "--model", exported, "--input", str(path), "--output", str(out),
                         "--max-text-tokens", "64"]) == 2
    assert time.perf_counter() - start < 30  # the texts are embedded (text batch first) before the image batch fails
    err = capsys.readouterr().err
    assert f"{path}: row 4: field 'image': cannot read image {data / 'truncated.jpg'}: image file is truncated" in err
    assert not out.exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "btoks_jax.api"]
    assert warnings == ["2 of 4 item(s) have more than 64 text tokens: their text was cut to the first 64 "
                        "(Embedder.max_text_tokens; btoks embed --max-text-tokens)"]

    folder = data.parent / "eval_folder"
    folder.mkdir(exist_ok=True)
    for name in ("good.png", "truncated.jpg"):
        (folder / name).write_bytes((data / name).read_bytes())
    rows = _rows(folder / "MySet_test.jsonl", [{**EVAL_GOOD, "tgt_img_path": ["good.png", "truncated.jpg"]}])
    capsys.readouterr()
    assert cli.main(["eval", "--model", exported, "--data", str(folder), "--out", str(data.parent / "scores")]) == 2
    err = capsys.readouterr().err
    assert f"{rows}: row 1: field 'tgt_img_path': entry 2: cannot read image {folder / 'truncated.jpg'}" in err, err
