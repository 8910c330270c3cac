"""Reading MMEB-format files: records, their fields and media paths (shared by the training and evaluation readers)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from btoks_jax import fs

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# A folder of media: a local path (str or Path) or a URL string (`gs://BUCKET/PATH`). Resolved paths come back as
# strings either way: local ones as `str(Path(root) / value)`, as they always did, URLs joined with `/`.
Root = str | os.PathLike


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def is_url(path: Root) -> bool:
    """Whether a root or a media path of a record is a URL of a remote file system (`gs://...`)."""
    text = os.fspath(path)
    return bool(_URL.match(text)) and fs.is_remote(text)


def resolve(root: Root, value: str) -> str:
    """A record's media path under `root`: a URL value as it is; under a URL root joined with `/` (`fs.join`);
    under a local root as `pathlib` joins it (an absolute value stays itself)."""
    if is_url(value):
        return value
    if is_url(root):
        return fs.join(root, value)
    return str(Path(root) / value)


def _isfile(path: str, files: fs.FileIndex | None) -> bool:
    if files is not None:
        return files.isfile(path)
    return fs.isfile(path) if is_url(path) else Path(path).is_file()


def frame_paths(value, root: Root, check_files: bool = True,
                files: fs.FileIndex | None = None) -> tuple[str, ...] | None:
    """A video field -> its frame paths in order: a folder of frame images, or a list of frame paths
    relative to `root` (a local folder or a URL). None when the field is empty. Raises ValueError saying what is
    wrong. `files`: an index that answers the existence checks of a list (one listing per folder for URLs)."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        folder = resolve(root, value)
        if is_url(folder):
            try:
                names = fs.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                names = None
            if not names:  # object storage has no empty folders: nothing under the prefix means no folder
                raise ValueError(f"expected a folder of frame images, not found: {folder}")
            frames = tuple(fs.join(folder, name) for name in sorted(names, key=_natural_key)
                           if os.path.splitext(name)[1].lower() in FRAME_SUFFIXES)
        else:
            folder = Path(folder)
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
    frames = tuple(resolve(root, v) for v in value)
    missing = [f for f in frames if check_files and not _isfile(f, files)]
    if missing:
        raise ValueError(f"frame file not found: {missing[0]}")
    return frames


def suffix(path: Root) -> str:
    """The file suffix (`.jsonl`), of a local path or a URL."""
    return os.path.splitext(os.fspath(path))[1]


def iter_records(path: Root) -> Iterator[tuple[int, Any]]:
    """(1-based row number, record) of a `.jsonl` (line numbers, blank lines skipped) or `.parquet` file, a local
    path or a URL (read through `btoks_jax.fs`: JSON lines streamed, a parquet file by ranged reads)."""
    kind = suffix(path)
    if kind == ".jsonl":
        with fs.open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: row {number}: not valid JSON ({err.msg})") from None
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        if is_url(path):
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(path)
        yield from enumerate(table.to_pylist(), start=1)
    else:
        raise ValueError(f"{path}: unsupported file type {kind!r} (use .jsonl or .parquet)")


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


def image_path(value: str | None, root: Root, field: str, check_files: bool = True,
               files: fs.FileIndex | None = None) -> str | None:
    """An image field's value (as `string_field` reads it) -> the path under `root` (`resolve`); None when null or
    blank. `files`: an index that answers the existence check (one listing per folder for URLs)."""
    if value is None or not value.strip():
        return None
    path = resolve(root, value)
    if check_files and not _isfile(path, files):
        raise RowError(field, f"image file not found: {path}")
    return path


def video_frames(value, root: Root, field: str, check_files: bool = True,
                 files: fs.FileIndex | None = None) -> tuple[str, ...] | None:
    """A video field's value -> `frame_paths`, its errors raised as RowError of the field."""
    try:
        return frame_paths(value, root, check_files, files)
    except ValueError as err:
        raise RowError(field, str(err)) from None
