"""Reading MMEB-format files: records and media fields (shared by the training and evaluation readers)."""

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
