"""MMEB-train rows as a TFDS ArrayRecord data set, built without TensorFlow, read back via `tfds.data_source`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import ClassVar

import grain
import numpy as np
import tensorflow_datasets as tfds

from btoks_jax import fs
from btoks_jax.data.mmeb_train import FIELDS, Side, TrainRow, apply_prompt_style, read_mmeb_train
from btoks_jax.processing import PROMPT_STYLES
from btoks_jax.processing.image import MediaError, check_image

BUILDER_NAME = "mmeb_train"
SIDES = ("query", "positive", "negative")


@dataclasses.dataclass
class MmebTrainConfig(tfds.core.BuilderConfig):
    """One MMEB-train data set; the config name is the data set's name."""

    source: str = ""  # a .jsonl / .parquet file or a glob of shards
    image_root: str = ""  # folder the relative image paths start from ("": the file's folder)
    allow_outside_root: bool = False  # media paths leaving media_root (`read_mmeb_train`) are refused unless set
    media_roots: tuple[str, ...] = ()  # further folders the media may lie in, besides image_root


class MmebTrain(tfds.core.GeneratorBasedBuilder):
    """Rows in file order, each side's text with its MMEB placeholders and the bytes of its image / frames.

    Images are `tfds.features.Image` fed the encoded file bytes, which TFDS stores as they are (no
    TensorFlow, no re-encoding), so the original files come back bit for bit through `read_tfds`. The
    declared shape (None, None, 3) only matters to TFDS's own decoder, which this project does not use.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Query / positive / negative sides, image and frame bytes."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS looks for download checksums next to the builder's package; nothing is downloaded here, and
        # that look-up fails when the package resolves as a namespace package (some editable installs).
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {**{name: _side_features() for name in SIDES}, "has_negative": np.bool_, "source": tfds.features.Text()})
        # Record i is row i of the source, so indices and error messages keep meaning the same row.
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                     description="MMEB-train rows (TIGER-Lab format) with their image files.")

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        config: MmebTrainConfig = self.builder_config
        rows = read_mmeb_train(config.source, config.image_root or None, prompt_style="mmeb",
                               allow_outside_root=config.allow_outside_root, media_roots=config.media_roots)
        for index, row in enumerate(rows):
            example = {name: _encode_side(getattr(row, name), row.source, name) for name in SIDES}
            yield index, {**example, "has_negative": row.negative is not None, "source": row.source}


def _side_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "text": tfds.features.Text(),
        "image": tfds.features.Sequence(tfds.features.Image(encoding_format=None)),  # zero or one
        "video": tfds.features.Sequence(tfds.features.Image(encoding_format=None)),  # frames, in order
    })


def _encode_side(side: Side | None, source: str, name: str) -> dict:
    """One side's text and media bytes; `source` ("<file>: row <n>") and the side's field names name a bad file."""
    if side is None:
        return {"text": "", "image": [], "video": []}
    _, image_field, video_field = FIELDS[name]
    return {"text": side.text,
            "image": [] if side.image is None else [_media_bytes(side.image, source, image_field, "image")],
            "video": [_media_bytes(frame, source, video_field, "frame") for frame in side.video or ()]}


def _media_bytes(path: str, source: str, field: str, kind: str) -> bytes:
    """The file's bytes, checked to be an image (`check_image`: it opens, within Pillow's size limit, and its
    structure verifies) before they are stored; ValueError naming the row, the field and the file otherwise."""
    try:
        data = fs.read_bytes(path)
        check_image(data)
    except MediaError as err:
        raise ValueError(f"{source}: field '{field}': cannot read {kind} {path}: {err.reason}") from None
    except (OSError, ValueError) as err:  # the file went missing since the rows were read, or is unreadable
        reason = "file not found" if isinstance(err, FileNotFoundError) else str(err)
        raise ValueError(f"{source}: field '{field}': cannot read {kind} {path}: {reason}") from None
    return data


def build_tfds(source: str | os.PathLike, name: str, data_dir: str | os.PathLike,
               image_root: str | os.PathLike | None = None, *,
               allow_outside_root: bool = False,
               media_roots: Sequence[str | os.PathLike] = ()) -> tfds.core.DatasetBuilder:
    """Writes the MMEB-train file(s) at `source` as ArrayRecord data set `mmeb_train/{name}` under `data_dir`.

    Rows are validated by `read_mmeb_train` first (a bad row raises ValueError naming file, row, field; media
    paths leaving the media folder and `media_roots` are refused unless `allow_outside_root`), and every image
    or frame is checked to be one before its bytes are stored (a missing, empty, non-image, damaged or oversized
    file raises ValueError naming file, row, field). A version already built there is kept as is.
    """
    config = MmebTrainConfig(name=name, source=os.fspath(source),
                             image_root="" if image_root is None else os.fspath(image_root),
                             allow_outside_root=allow_outside_root,
                             media_roots=tuple(os.fspath(folder) for folder in media_roots))
    builder = MmebTrain(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


class _EncodedBytes(tfds.decode.Decoder):
    """Hands back an image feature's stored bytes (TFDS's SkipDecoding has no NumPy path for sequences)."""

    def decode_example(self, serialized_example):
        return serialized_example

    def decode_example_np(self, serialized_example):
        return serialized_example

    def decode_batch_example_np(self, serialized_examples):
        return serialized_examples


def data_source(data_dir: str | os.PathLike, name: str):
    """The raw random-access `tfds.data_source` of a built data set (media as encoded bytes)."""
    raw = {side: {"image": _EncodedBytes(), "video": _EncodedBytes()} for side in SIDES}
    return tfds.data_source(f"{BUILDER_NAME}/{name}", split="train", data_dir=os.fspath(data_dir), decoders=raw,
                            download=False)


def read_tfds(data_dir: str | os.PathLike, name: str, *, prompt_style: str = "btoks") -> grain.MapDataset:
    """A grain MapDataset of `TrainRow`s (media as encoded bytes) over a data set built by `build_tfds`.

    Reading row i touches only record i, so a process reads only the rows it uses.
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    return grain.MapDataset.source(data_source(data_dir, name)).map(functools.partial(_to_row, prompt_style))


def _to_row(prompt_style: str, record: dict) -> TrainRow:
    sides = {name: _decode_side(record[name]) for name in SIDES}
    if not record["has_negative"]:
        sides["negative"] = None
    return apply_prompt_style(TrainRow(**sides, source=_str(record["source"])), prompt_style)


def _decode_side(side: dict) -> Side:
    video = tuple(bytes(frame) for frame in side["video"])
    image = [bytes(image) for image in side["image"]]
    return Side(_str(side["text"]), image[0] if image else None, video or None)


def _str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
