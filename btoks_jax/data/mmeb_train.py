"""MMEB-train rows: JSONL / parquet files read into validated query / positive / negative sides."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from btoks_jax import fs
from btoks_jax.data.media import (
    OutsideRootError,
    RowError,
    image_path,
    is_url,
    iter_records,
    string_field,
    video_frames,
)
from btoks_jax.processing import (
    IMAGE_TOKEN,
    PROMPT_STYLES,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    convert_mmeb_placeholders,
)
from btoks_jax.processing.image import MediaError, read_image

Media = str | bytes  # a file path, or the encoded file itself (rows read back from ArrayRecord)

NTP_SIDES = ("positive", "query", "both", "none")
FORMATS = ("mmeb", "tfds")

# Per side: (text field, image field, video field). The video field is this project's extension for
# frame-based rows (a folder of frames or a list of frame paths), named as in the MMEB-V2 evaluation files.
FIELDS = {
    "query": ("qry", "qry_image_path", "qry_video_path"),
    "positive": ("pos_text", "pos_image_path", "pos_video_path"),
    "negative": ("neg_text", "neg_image_path", "neg_video_path"),
}
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
_VIDEO_PLACEHOLDER = re.compile(r"<\|video_\d+\|>")
_VISION_STRINGS = re.compile("|".join(re.escape(t) for t in (VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN)))

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One training data set of the mixture.

    path: for format "mmeb" a `.jsonl` / `.parquet` file or a glob of shards (read in sorted order); for
      "tfds" the `data_dir` written by `btoks_jax.data.tfds_mmeb.build_tfds` (its config name is `name`). A local
      path or a `gs://` URL (read through `btoks_jax.fs`; ArrayRecord files by the reader's own Cloud Storage
      client).
    image_root: folder the rows' relative image / frame paths start from (default: the file's folder); local or
      a URL, independently of `path`.
    media_roots: further folders the media may lie in, besides `image_root` (or the file's folder); a media path
      leaving all of them (an absolute path, a `..` leading out, a symbolic link pointing out) is refused. Rows
      that `btoks data prepare` wrote outside its download root reach the downloaded media with `..`: give
      the download root here (configs/qwen2vl_2b.py: `media_root=`).
    weight: sampling weight of the data set's sub-batches.
    ntp_side: which side the generative loss decodes (PAPER.md section 4): "positive" (the query's BToks
      generate the positive text), "query", "both" or "none".
    """

    name: str
    path: str
    image_root: str | None = None
    media_roots: tuple[str, ...] = ()
    weight: float = 1.0
    ntp_side: str = "positive"
    format: str = "mmeb"

    def __post_init__(self):
        roots = self.media_roots
        object.__setattr__(self, "media_roots", (roots,) if isinstance(roots, str) else tuple(roots or ()))
        if self.ntp_side not in NTP_SIDES:
            raise ValueError(f"dataset {self.name!r}: ntp_side must be one of {NTP_SIDES}, got {self.ntp_side!r}")
        if not self.weight > 0:
            raise ValueError(f"dataset {self.name!r}: weight must be > 0, got {self.weight}")
        if self.format not in FORMATS:
            raise ValueError(f"dataset {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")


@dataclasses.dataclass(frozen=True)
class Side:
    """One input: its text (placeholders converted per the prompt style) and its media."""

    text: str
    image: Media | None = None
    video: tuple[Media, ...] | None = None  # frames, in order


@dataclasses.dataclass(frozen=True)
class TrainRow:
    query: Side
    positive: Side
    negative: Side | None  # None when the row has no negative (the main recipe uses none)
    source: str  # "<file>: row <n>", so errors raised after reading still name the row


# ===================================== reading =====================================


def source_files(path: str | os.PathLike) -> list[Path | str]:
    """The files a spec's path names: one file, or the sorted matches of a glob. Local files as `Path`s, files
    of a URL (`gs://BUCKET/train/*.jsonl`) as URL strings."""
    text = os.fspath(path)
    remote = is_url(text)
    if glob.has_magic(text):
        files = fs.glob(text) if remote else sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise FileNotFoundError(f"no files match {text}")
        return files
    if not (fs.isfile(text) if remote else Path(text).is_file()):
        raise FileNotFoundError(f"MMEB-train file not found: {text}")
    return [text if remote else Path(text)]


def read_mmeb_train(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                    prompt_style: str = "btoks", check_files: bool = True,
                    allow_outside_root: bool = False,
                    media_roots: Sequence[str | os.PathLike] = ()) -> list[TrainRow]:
    """Reads MMEB-train rows from `.jsonl` / `.parquet` file(s).

    Required fields: `qry`, `qry_image_path`, `pos_text`, `pos_image_path` (strings; "" or null for no
    image); optional `neg_text`, `neg_image_path`, and `{qry,pos,neg}_video_path` (a folder of frame images
    or a list of frame paths) for frame-based rows. Image paths are relative to `image_root` (default: the
    file's folder); files and media may be local or in object storage (`gs://`). As in the reference code, a
    side whose text holds an image placeholder but which has no image loses the placeholder (WebQA queries;
    logged), and a side with an image but no text becomes the bare placeholder (VisDial negatives). A side with
    text and media but no placeholder, or with no content at all, is an error.

    Args:
      path: a file or a glob of shards (local, or a URL such as `gs://BUCKET/train/*.jsonl`).
      image_root: folder the relative media paths start from (local or a URL).
      prompt_style: "btoks" (`<|vision_start|><|image_pad|><|vision_end|>`), "vlm2vec" (a bare
        `<|image_pad|>`) or "mmeb" (the files' `<|image_1|>` kept).
      check_files: verify that every image / frame file exists (decoding is checked when a row is used).
      allow_outside_root: read media paths that leave the media folder (an absolute path, a `..` leading out, a
        symbolic link pointing out; `btoks_jax.data.media.outside_root`), refused by default: the rows are
        data, and data must not name any file of the machine.
      media_roots: further folders media may lie in, besides the media folder (`image_root` or the file's
        folder).
    Raises:
      ValueError naming the file, the 1-based row number and the field of the first bad row, or, for a file
      written by `btoks data prepare` in the other prompt style, naming both styles (`check_prepared_style`).
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    rows = []
    files = fs.FileIndex()  # media existence: one listing per folder of a URL instead of a request per file
    for file in source_files(path):
        check_prepared_style(file, prompt_style)
        if image_root is not None:
            root = fs.as_path(image_root)
        else:
            root = fs.parent(file)
        stripped = 0
        for number, record in iter_records(file):
            source = f"{file}: row {number}"
            try:
                row, n = parse_record(record, root, source, check_files=check_files, files=files,
                                      allow_outside_root=allow_outside_root,
                                      media_roots=tuple(fs.as_path(folder) for folder in media_roots))
            except RowError as err:
                if isinstance(err, OutsideRootError):  # training data sets can name their media folders
                    err.message += ", or name the folder the media lie in (DatasetSpec.media_roots; " \
                                   "configs/qwen2vl_2b.py:media_root=DIR)"
                raise err.at(source) from None
            stripped += n
            rows.append(apply_prompt_style(row, prompt_style))
        if stripped:
            log.warning("%s: removed the image placeholder of %d side(s) that have no image", file, stripped)
    return rows


def parse_record(record: Any, image_root: Path | str, source: str, *, check_files: bool = True,
                 files: fs.FileIndex | None = None, allow_outside_root: bool = False,
                 media_roots: Sequence[Path | str] = ()) -> tuple[TrainRow, int]:
    """One record -> (row with MMEB placeholders, number of placeholders dropped from sides without media).

    `image_root`: a local folder or a URL; `files`: an index answering the media existence checks; media paths
    must stay inside `image_root` or one of `media_roots` unless `allow_outside_root`; a video needs at least
    `btoks_jax.data.media.MIN_VIDEO_FRAMES` frames. Raises `RowError(field, message)`.
    """
    if not isinstance(record, dict):
        raise RowError("<row>", f"expected an object with the MMEB-train fields, got {type(record).__name__}")
    sides, stripped = {}, 0
    for name, (text_field, image_field, video_field) in FIELDS.items():
        required = name != "negative"
        text = string_field(record, text_field, required)
        image = image_path(string_field(record, image_field, required), image_root, image_field, check_files, files,
                           allow_outside_root=allow_outside_root, also_inside=media_roots)
        video = video_frames(record.get(video_field), image_root, video_field, check_files, files,
                             allow_outside_root=allow_outside_root, also_inside=media_roots)
        text, n = _check_placeholders(text, image, video, text_field)
        if not text.strip() and image is None and video is None:
            if required:
                raise RowError(text_field, "the side has no text, image or video")
            sides[name] = None
            continue
        stripped += n
        sides[name] = Side(text, image, video)
    return TrainRow(sides["query"], sides["positive"], sides["negative"], source), stripped


def btoks_canonical_text(side: Side) -> str:
    """The authors' training text of a side (MMEB_FORMATS.md 1.1, "B"): `<|image_1|>\n{body}\n` when the text
    starts with its placeholder, `{body}\n` without media, the bare placeholder for media with no text (followed
    by the newline the text ends with, if any: the authors' image-only VisDial negative is `<|image_1|>\n`);
    body = the text without its placeholders, stripped of surrounding whitespace. A placeholder inside the text
    stays where it is (the authors' text-to-video positive `Understand the content of the provided video:
    <|video_1|>\n`). The form is a fixed point: texts already in it (what `btoks data prepare` writes) come back
    unchanged."""
    token = "<|video_1|>" if side.video is not None else "<|image_1|>" if side.image is not None else ""
    if not token:
        return f"{_strip_placeholders(side.text).strip()}\n"
    text = side.text.strip()
    if not text.startswith(token):
        return f"{text}\n"
    body = _strip_placeholders(text[len(token):]).strip()
    if body:
        return f"{token}\n{body}\n"
    return f"{token}\n" if side.text.rstrip(" \t").endswith("\n") else token


def _strip_placeholders(text: str) -> str:
    return _IMAGE_PLACEHOLDER.sub("", _VIDEO_PLACEHOLDER.sub("", text))


# Written beside the data set files by `btoks data prepare` (btoks_jax/data/mmeb_prepare.py).
PREPARED_MANIFEST = "manifest.json"


def check_prepared_style(file: str | os.PathLike, prompt_style: str) -> None:
    """Refuses a data set file that `btoks data prepare` wrote in another prompt style than `prompt_style`.

    The texts of a prepared file are in the surface form of one style (`--prompt-style`), so reading them in
    the other would train on a mixture of both. The check reads the `manifest.json` beside the file (if any)
    and nothing else; files without one, and reading in style "mmeb" (the form the ArrayRecord copy stores),
    are not checked. `file` may be a URL. Raises ValueError naming the file and both styles.
    """
    file = fs.as_path(file)
    manifest = fs.joinpath(fs.parent(file), PREPARED_MANIFEST)
    if prompt_style == "mmeb" or not fs.isfile(manifest):
        return
    try:
        entries = json.loads(fs.read_text(manifest)).get("datasets") or {}
    except (OSError, ValueError, AttributeError):
        return  # not a manifest of ours
    for name, entry in entries.items() if isinstance(entries, dict) else ():
        if not isinstance(entry, dict) or entry.get("file") != fs.basename(file):
            continue
        style = entry.get("prompt_style")
        if style and style != prompt_style:
            raise ValueError(
                f"{file}: data set {name!r} was prepared in prompt style {style!r} (see {manifest}), but the "
                f"training config's data.prompt_style is {prompt_style!r}; set data.prompt_style={style!r}, or "
                f"prepare the data again with `btoks data prepare --prompt-style {prompt_style}` into another "
                f"--out folder")


def apply_prompt_style(row: TrainRow, prompt_style: str) -> TrainRow:
    """The row with its MMEB placeholders turned into Qwen2-VL vision pads (identity for "mmeb").

    "btoks" first puts every side in the authors' canonical form (`btoks_canonical_text`, which leaves texts
    already in that form as they are), then wraps the pads in `<|vision_start|>..<|vision_end|>`; "vlm2vec"
    keeps VLM2Vec's text as is, with bare pads.
    """
    if prompt_style == "mmeb":
        return row

    def convert(side: Side | None) -> Side | None:
        if side is None:
            return None
        text = btoks_canonical_text(side) if prompt_style == "btoks" else side.text
        return dataclasses.replace(side, text=convert_mmeb_placeholders(text, wrap_vision=prompt_style == "btoks"))

    return dataclasses.replace(row, query=convert(row.query), positive=convert(row.positive),
                               negative=convert(row.negative))


def generation_text(text: str) -> str:
    """What the generative loss decodes from a side's text: no vision placeholders or pads, leading
    whitespace dropped, the trailing newline of the canonical form kept (it precedes `<|im_end|>`)."""
    return _VISION_STRINGS.sub("", _VIDEO_PLACEHOLDER.sub("", _IMAGE_PLACEHOLDER.sub("", text))).lstrip()


def text_only(text: str) -> str:
    """The text of a side without its vision placeholders / pads: what the generative loss decodes."""
    return _VISION_STRINGS.sub("", _VIDEO_PLACEHOLDER.sub("", _IMAGE_PLACEHOLDER.sub("", text))).strip()


def _check_placeholders(text: str, image, video, field: str) -> tuple[str, int]:
    stripped = 0
    for pattern, media, kind in ((_IMAGE_PLACEHOLDER, image, "image"), (_VIDEO_PLACEHOLDER, video, "video")):
        count = len(pattern.findall(text))
        if media is None and count:
            text, stripped = pattern.sub("", text).strip(), stripped + count
        elif media is not None and count == 0 and not text_only(text):
            text += f"<|{kind}_1|>"  # media without any text: the reference restores the bare placeholder
        elif media is not None and count != 1:
            raise RowError(field, f"the side has one {kind} but its text holds {count} <|{kind}_1|> placeholders")
    return text, stripped


# ===================================== media =====================================


def decode_image(media: Media) -> np.ndarray:
    """uint8[H, W, 3]: a file (local or a URL) opened as `processing.load_image` opens files (EXIF orientation,
    then RGB), and encoded bytes the same way, so a row read back from ArrayRecord gives identical pixels.
    Raises `MediaError` (a ValueError) naming the file when it cannot be read (`processing.image.read_image`)."""
    return read_image(media)


def load_media(row: TrainRow, side: str) -> tuple[list[np.ndarray] | None, list[list[np.ndarray]] | None]:
    """Decoded (images, videos) of one side of a row, as `Processor` takes them (None where absent). Files in
    object storage are read here, so in the training pipeline they are read by its worker threads.

    Raises ValueError naming the row's file, row number and media field when a file cannot be decoded (missing,
    empty, not an image, truncated, over Pillow's decompression-bomb limit).
    """
    content: Side = getattr(row, side)
    _, image_field, video_field = FIELDS[side]
    images = videos = None
    try:
        if content.image is not None:
            images = [decode_image(content.image)]
    except (OSError, ValueError) as err:
        raise ValueError(f"{row.source}: field '{image_field}': cannot read image {_describe(content.image)}: "
                         f"{_why(err)}") from None
    if content.video is not None:
        frames = []
        for frame in content.video:
            try:
                frames.append(decode_image(frame))
            except (OSError, ValueError) as err:
                raise ValueError(f"{row.source}: field '{video_field}': cannot read frame {_describe(frame)}: "
                                 f"{_why(err)}") from None
        videos = [frames]
    return images, videos


def _why(err: Exception) -> str:
    return err.reason if isinstance(err, MediaError) else str(err)


def _describe(media: Media) -> str:
    return f"<{len(media)} encoded bytes>" if isinstance(media, bytes) else media
