"""Reading MMEB-format files: records, their fields and media paths (shared by the training and evaluation readers)."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator, Sequence
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
    # os.path.isfile, not Path.is_file: a name too long for the OS or holding a NUL byte is not a file, not an error.
    return fs.isfile(path) if is_url(path) else os.path.isfile(path)


# ===================================== media paths stay inside their folder =====================================

# The fewest frames a video field may hold: Qwen2-VL's temporal patch spans two frames.
MIN_VIDEO_FRAMES = 2
OUTSIDE_HINT = "pass --allow-outside-media (allow_outside_root=True) to read media outside the data folder"


def outside_root(root: Root, value: str, path: str) -> str | None:
    """Why the media path `path` (a record's `value` resolved under `root` by `resolve`) leaves `root`, or None
    when it stays inside.

    Local paths are compared once every symbolic link is resolved (`os.path.realpath` of both), so an absolute
    path, a `..` that climbs out and a link inside the folder pointing out are all refused, while an absolute
    path or a link that lands inside the folder is not. URLs are only checked for `..` segments: object storage
    has no links, and a bucket path is what its string says."""
    if "\0" in value:
        return "the path holds a NUL character"
    if is_url(path):
        if ".." not in value.split("/"):
            return None
        if is_url(root):  # a '..' that stays inside a bucket folder is fine
            scheme, rest = os.fspath(path).split("://", 1)
            normal, base = f"{scheme}://{posixpath.normpath(rest)}", os.fspath(root).rstrip("/")
            if normal == base or normal.startswith(base + "/"):
                return None
        return "a '..' segment"
    if is_url(root):
        return "an absolute local path under a URL folder"
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
        return None
    if os.path.isabs(value):
        return "an absolute path"
    lexical = os.path.normpath(os.path.abspath(path))
    top = os.path.abspath(root).rstrip(os.sep)
    if lexical != top and not lexical.startswith(top + os.sep):
        return "'..' leads out of it"
    return f"a symbolic link that points to {real}"


class OutsidePathError(ValueError):
    """A media path that leaves its folder and every further media folder (`check_inside`); `reason` is why it
    leaves the first folder (`outside_root`)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def check_inside(root: Root, value: str, path: str, also: Sequence[Root] = ()) -> None:
    """Raises OutsidePathError naming `value`, `root` and the reason when `path` leaves `root` (`outside_root`)
    and each of the further media folders `also`.

    `value` is `path` as spelled under `root`; the folders `also` are judged with the same `value` (a local path
    is in or out by where it resolves to, whatever its spelling; a URL by its `..` segments)."""
    reason = outside_root(root, value, path)
    if reason is None or any(outside_root(folder, value, path) is None for folder in also):
        return
    more = f" and the media folders {[os.fspath(folder) for folder in also]}" if also else ""
    raise OutsidePathError(f"media path {value!r} is outside the data folder {os.fspath(root)}{more} ({reason}); "
                           f"{OUTSIDE_HINT}", reason)


def _list_frames(folder: str, root: Root, check_links: bool, also: Sequence[Root] = ()) -> tuple[str, ...]:
    """The frame images of a local folder, naturally sorted; with `check_links` a frame that is a symbolic link
    pointing out of `root` raises OutsidePathError."""
    with os.scandir(folder) as entries:
        found = [(entry.name, entry.is_symlink()) for entry in entries
                 if os.path.splitext(entry.name)[1].lower() in FRAME_SUFFIXES]
    frames = []
    for name, link in sorted(found, key=lambda entry: _natural_key(entry[0])):
        path = str(Path(folder) / name)
        if link and check_links:
            check_inside(root, os.path.relpath(path, os.fspath(root)), path, also)
        frames.append(path)
    return tuple(frames)


def frame_paths(value, root: Root, check_files: bool = True, files: fs.FileIndex | None = None, *,
                allow_outside_root: bool = False, also_inside: Sequence[Root] = ()) -> tuple[str, ...] | None:
    """A video field -> its frame paths in order: a folder of frame images, or a list of frame paths
    relative to `root` (a local folder or a URL). None when the field is empty. Raises ValueError saying what is
    wrong (OutsidePathError for a path outside the folders). `files`: an index that answers the existence checks
    of a list (one listing per folder for URLs).

    The folder and every frame must stay inside `root` or one of the folders `also_inside` (`outside_root`: no
    absolute path or `..` leading out, no symbolic link pointing out) unless `allow_outside_root`."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        folder = resolve(root, value)
        if not allow_outside_root:
            check_inside(root, value, folder, also_inside)
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
            if not os.path.isdir(folder):
                raise ValueError(f"expected a folder of frame images, not found: {folder}")
            # Natural order (digit runs compared as numbers), as the authors' and VLM2Vec's readers sort frames.
            try:
                frames = _list_frames(folder, root, check_links=not allow_outside_root, also=also_inside)
            except OSError as err:
                raise ValueError(f"cannot list the frame folder {folder}: {err.strerror or err}") from None
        if not frames:
            raise ValueError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in {folder}")
        return frames
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a folder or a list of frame paths, got {type(value).__name__}")
    frames = tuple(resolve(root, v) for v in value)
    if not allow_outside_root:
        for v, frame in zip(value, frames):
            check_inside(root, v, frame, also_inside)
    missing = [f for f in frames if check_files and not _isfile(f, files)]
    if missing:
        raise ValueError(f"frame file not found: {missing[0]}")
    return frames


def suffix(path: Root) -> str:
    """The file suffix (`.jsonl`), of a local path or a URL."""
    return os.path.splitext(os.fspath(path))[1]


def iter_records(path: Root) -> Iterator[tuple[int, Any]]:
    """(1-based row number, record) of a `.jsonl` (line numbers, blank lines skipped) or `.parquet` file, a local
    path or a URL (read through `btoks_jax.fs`: JSON lines streamed, a parquet file by ranged reads).

    Raises ValueError naming the file (and, for JSON lines, the row) when it cannot be read: a line that is not
    UTF-8 or not JSON, a file that is not parquet."""
    kind = suffix(path)
    if kind == ".jsonl":
        with fs.open(path, "rb") as f:  # bytes, decoded line by line, so a bad byte names its row
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{path}: row {number}: not valid UTF-8 (byte {err.start + 1} of the line)") \
                        from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: row {number}: not valid JSON ({err.msg})") from None
                except RecursionError:
                    raise ValueError(f"{path}: row {number}: not valid JSON (nested too deeply)") from None
                yield number, record
    elif kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if is_url(path):
                with fs.open(path, "rb") as f:
                    table = pq.read_table(f)
            else:
                table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:  # ArrowInvalid: not a parquet file, or a damaged one
            raise ValueError(f"{path}: not a readable parquet file ({err})") from None
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


class OutsideRootError(RowError):
    """A field whose media path leaves the data folder and the further media folders (`check_inside`), as
    `image_path` and `video_frames` raise it; a reader may add to its `message` how to name more folders."""


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
               files: fs.FileIndex | None = None, *, allow_outside_root: bool = False,
               also_inside: Sequence[Root] = ()) -> str | None:
    """An image field's value (as `string_field` reads it) -> the path under `root` (`resolve`); None when null or
    blank. `files`: an index that answers the existence check (one listing per folder for URLs). The path must
    stay inside `root` or one of the folders `also_inside` (`outside_root`) unless `allow_outside_root`. Raises
    RowError (OutsideRootError for a path outside them)."""
    if value is None or not value.strip():
        return None
    path = resolve(root, value)
    if not allow_outside_root:
        try:
            check_inside(root, value, path, also_inside)
        except OutsidePathError as err:
            raise OutsideRootError(field, str(err)) from None
    if check_files and not _isfile(path, files):
        raise RowError(field, f"image file not found: {path}")
    return path


def video_frames(value, root: Root, field: str, check_files: bool = True,
                 files: fs.FileIndex | None = None, *, allow_outside_root: bool = False,
                 min_frames: int = MIN_VIDEO_FRAMES, also_inside: Sequence[Root] = ()) -> tuple[str, ...] | None:
    """A video field's value -> `frame_paths` (media inside `root` or a folder of `also_inside`), its errors
    raised as RowError of the field (OutsideRootError for a path outside the folders); a video of fewer than
    `min_frames` frames is one too."""
    try:
        frames = frame_paths(value, root, check_files, files, allow_outside_root=allow_outside_root,
                             also_inside=also_inside)
    except OutsidePathError as err:
        raise OutsideRootError(field, str(err)) from None
    except ValueError as err:
        raise RowError(field, str(err)) from None
    if frames is not None and len(frames) < min_frames:
        where = f" in {resolve(root, value)}" if isinstance(value, str) else ""
        raise RowError(field, f"{len(frames)} frame(s){where}: a video needs at least {min_frames}")
    return frames
