"""Reading MMEB-format files: records, their fields and media paths (shared by the training and evaluation readers)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def frame_paths(value, root: Path, check_files: bool = True) -> tuple[str, ...] | None:
    """A video field -> its frame paths in order: a folder of frame images, or a list of frame paths
    relative to `root`. None when the field is empty. Raises ValueError saying what is wrong."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        folder = root / value
        if not folder.is_dir():
            raise ValueError(f"expected a folder of frame images, not found: {folder}")
        # Natural order (digit runs compared as numbers), as the authors' and VLM2Vec's readers sort frames.
        frames = tuple(str(p) for p in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name))
                       if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise ValueError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in {folder}")
        return frames
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a folder or a list of frame paths, got {type(value).__name__}")
    frames = tuple(str(root / v) for v in value)
    missing = [f for f in frames if check_files and not Path(f).is_file()]
    if missing:
        raise ValueError(f"frame file not found: {missing[0]}")
    return frames


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, record) of a `.jsonl` (line numbers, blank lines skipped) or `.parquet` file."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: row {number}: not valid JSON ({err.msg})") from None
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), start=1)
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


# ===================================== fields of one record =====================================


class RowError(ValueError):
    """A bad field of one record; the file readers report it as `{file}: row {n}: field '{field}': {message}`."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field, self.message = field, message

    def at(self, source: str) -> ValueError:
        """The error as a reader raises it, `source` being `"{file}: row {n}"`."""
        return ValueError(f"{source}: field '{self.field}': {self.message}")


def string_field(record: dict, field: str, required: bool = True) -> str:
    """A text field; null (parquet tables hold nulls where JSON holds "") reads as "", and so does an absent
    field that is not required. Raises RowError."""
    if field not in record:
        if required:
            raise RowError(field, "missing")
        return ""
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__}")
    return value


def string_list_field(record: dict, field: str, required: bool = True) -> list[str | None] | None:
    """A list of strings, null entries kept; None when the field is absent or null and not required."""
    value = record.get(field)
    if value is None:
        if required:
            raise RowError(field, "missing")
        return None
    if not isinstance(value, (list, tuple)) or not all(v is None or isinstance(v, str) for v in value):
        raise RowError(field, "expected a list of strings")
    return list(value)


def first_present(record: dict, *fields: str) -> tuple[str, Any]:
    """(name, value) of the first of a field's spellings that is set, else (the first name, None)."""
    for field in fields:
        if record.get(field) is not None:
            return field, record[field]
    return fields[0], None


def image_path(value: str | None, root: Path, field: str, check_files: bool = True) -> str | None:
    """An image field's value (as `string_field` reads it) -> the path under `root`; None when null or blank."""
    if value is None or not value.strip():
        return None
    path = root / value
    if check_files and not path.is_file():
        raise RowError(field, f"image file not found: {path}")
    return str(path)


def video_frames(value, root: Path, field: str, check_files: bool = True) -> tuple[str, ...] | None:
    """A video field's value -> `frame_paths`, its errors raised as RowError of the field."""
    try:
        return frame_paths(value, root, check_files)
    except ValueError as err:
        raise RowError(field, str(err)) from None
