"""Resolution of the media fields of MMEB-format rows (shared by the training and evaluation readers)."""

from __future__ import annotations

from pathlib import Path

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def frame_paths(value, root: Path, check_files: bool = True) -> tuple[str, ...] | None:
    """A video field -> its frame paths in order: a folder of frame images, or a list of frame paths
    relative to `root`. None when the field is empty. Raises ValueError saying what is wrong."""
    if value is None or value == "" or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        folder = root / value
        if not folder.is_dir():
            raise ValueError(f"expected a folder of frame images, not found: {folder}")
        frames = tuple(str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in FRAME_SUFFIXES)
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
