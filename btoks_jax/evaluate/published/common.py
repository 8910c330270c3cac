"""What the MMEB-V2 readers share: the download layout, parquet splits, inline images and frame picking.

Layout of an MMEB-V2 root (`btoks eval --mmeb-v2 ROOT`): every Hugging Face repository sits at
`ROOT/<owner>/<name>/`, as `hf download <owner>/<name> --repo-type dataset --local-dir ROOT/<owner>/<name>`
leaves it, with the archives of `TIGER-Lab/MMEB-V2` extracted in place (README, "MMEB-V2"):

    ROOT/TIGER-Lab/MMEB-V2/image-tasks/MMEB/<Task>/...        images of the 36 image sets
    ROOT/TIGER-Lab/MMEB-V2/video-tasks/frames/...              frame folders of the video sets
    ROOT/ziyjiang/MMEB_Test_Instruct/<Task>/test-*.parquet     image-set annotations
    ROOT/VLM2Vec/<Name>/..., ROOT/lmms-lab/YouCook2/...        video and OOD annotations
    ROOT/vidore/<name>/{queries,corpus,qrels}/test-*.parquet   ViDoRe (BEIR shape)
    ROOT/openbmb/VisRAG-Ret-Test-<Name>/...                    VisRAG (BEIR shape, split train)

A reader returns a `Task`: evaluation rows whose items carry the final prompt text (with the MMEB
placeholders `<|image_1|>` / `<|video_1|>`, which the embedder turns into Qwen2-VL pads), already in
the surface form of the chosen prompt style:

- "vlm2vec": VLM2Vec's readers (`src/data/eval_dataset/*.py`), character for character;
- "btoks": the authors' canonical runtime form (token, newline, body, one final newline).

A data set whose files are absent raises `MissingData`, so a run over the 78 can report what is missing;
a file that is present but malformed raises ValueError naming the file, row and field.

ROOT and the folder extracted pages go to may be local or `gs://` URLs: every read goes through `btoks_jax.fs`
(parquet by ranged reads, frame folders by listings), and the items hold path strings, local paths or URLs,
which the embedder opens the same way (`btoks_jax.processing.image.load_image`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from btoks_jax import fs
from btoks_jax.data.media import RowError
from btoks_jax.evaluate.mmeb import EvalRow, Item

STYLES = ("vlm2vec", "btoks")
IMAGE = "<|image_1|>"
VIDEO = "<|video_1|>"
NUM_FRAMES = 8
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")  # the suffixes VLM2Vec's frame loader keeps


class MissingData(FileNotFoundError):
    """The files of a data set are not under the root (the data set is reported missing, not failed)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One MMEB-V2 data set, read: its rows, the extra corpus of global sets, and how it is ranked."""

    name: str
    rows: list[EvalRow]
    ranking: str  # "local" | "global"
    corpus: tuple[Item, ...] = ()
    source: str = ""  # the folder or file it was read from, for messages

    def __post_init__(self):
        if self.ranking not in ("local", "global"):
            raise ValueError(f"{self.name}: ranking must be 'local' or 'global', got {self.ranking!r}")
        if not self.rows:
            raise ValueError(f"{self.name}: no evaluation rows in {self.source}")


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")
    return style


def repo_dir(root: str | os.PathLike, repo_id: str) -> Path | str:
    """`ROOT/<owner>/<name>` (a URL string under a URL root); MissingData when absent."""
    path = fs.joinpath(root, *repo_id.split("/"))
    if not fs.isdir(path):
        raise MissingData(f"{repo_id}: not downloaded (expected the folder {path})")
    return path


def split_files(repo: Path | str, split: str, config: str | None = None) -> list[Path | str]:
    """The parquet shards of one split (and config) of a downloaded Hugging Face data set repository.

    Looks, in order, for the layouts the hub uses: `<config>/<split>-*.parquet`, `<config>/<split>/*.parquet`,
    `data/<config>/<split>-*.parquet`, and without a config `data/<split>-*.parquet`, `<split>-*.parquet`,
    `data/<split>/*.parquet`, `<split>/*.parquet`; then the same places with JSON lines (`.jsonl`), which some
    repositories hold instead of parquet. Raises MissingData listing what was tried.
    """
    if config:
        patterns = [f"{config}/{split}-*.parquet", f"{config}/{split}/*.parquet", f"data/{config}/{split}-*.parquet"]
    else:
        patterns = [f"data/{split}-*.parquet", f"{split}-*.parquet", f"data/{split}/*.parquet", f"{split}/*.parquet"]
    patterns += [p.replace(".parquet", ".jsonl") for p in patterns]
    for pattern in patterns:
        files = fs.glob(fs.join(repo, pattern)) if fs.is_remote(repo) else sorted(Path(repo).glob(pattern))
        if files:
            return files
    raise MissingData(f"{repo}: no parquet files for split {split!r}" + (f" of config {config!r}" if config else "")
                      + f" (looked for {', '.join(patterns)})")


def parquet_file(file: Path | str):
    """A `pyarrow.parquet.ParquetFile` of a local path or a URL (read by ranged reads: the footer, then the
    row groups and columns asked for)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(fs.open(file, "rb") if fs.is_remote(file) else file)


def read_schema(file: Path | str):
    """The Arrow schema of a parquet file (local or a URL)."""
    return parquet_file(file).schema_arrow


def suffix(file: Path | str) -> str:
    return os.path.splitext(os.fspath(file))[1]


def iter_parquet(files: Sequence[Path | str], columns: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """("<file>: row <n>", record) over parquet shards (or JSON-lines files) in order, streaming one record
    batch at a time.

    `columns` are checked up front for parquet (a missing column is an error naming the file and the column)
    and per record for JSON lines.
    """
    for file in files:
        if suffix(file) == ".jsonl":
            from btoks_jax.data.media import iter_records

            for number, record in iter_records(file):
                source = f"{file}: row {number}"
                if not isinstance(record, dict):
                    raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
                missing = [c for c in columns or () if c not in record]
                if missing:
                    raise RowError(missing[0], "missing").at(source)
                yield source, record if columns is None else {c: record[c] for c in columns}
            continue
        reader = parquet_file(file)
        if columns is not None:
            have = set(reader.schema_arrow.names)
            missing = [c for c in columns if c not in have]
            if missing:
                raise ValueError(f"{file}: missing column(s) {missing} (has {sorted(have)})")
        number = 0
        for batch in reader.iter_batches(batch_size=1024, columns=list(columns) if columns is not None else None):
            for record in batch.to_pylist():
                number += 1
                yield f"{file}: row {number}", record


def read_parquet(files: Sequence[Path | str], columns: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    return list(iter_parquet(files, columns))


def field(record: dict, name: str, source: str, kinds: type | tuple[type, ...] = str, *, allow_none: bool = False):
    """`record[name]` checked to be of `kinds`; ValueError naming `source` and the field otherwise."""
    if name not in record:
        raise RowError(name, "missing").at(source)
    value = record[name]
    if value is None and allow_none:
        return None
    if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool) and bool not in _tuple(kinds)):
        want = " or ".join(k.__name__ for k in _tuple(kinds))
        raise RowError(name, f"expected {want}, got {type(value).__name__}").at(source)
    return value


def _tuple(kinds) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


# ===================================== media =====================================


def natural_key(name: str) -> list:
    """Digit runs compared as numbers (`frame_2` < `frame_10`), as both readers sort frames."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def list_frames(folder: str | os.PathLike) -> tuple[str, ...]:
    """The frame images of a folder (.jpg/.jpeg/.png; local or a URL), naturally sorted; () when the folder is
    absent or empty."""
    if fs.is_remote(folder):
        try:
            names = fs.listfiles(folder)
        except (FileNotFoundError, NotADirectoryError):
            return ()
        return tuple(fs.join(folder, name) for name in sorted(names, key=natural_key)
                     if os.path.splitext(name)[1].lower() in FRAME_SUFFIXES)
    folder = Path(folder)
    if not folder.is_dir():
        return ()
    return tuple(str(p) for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
                 if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


def pick_frames(frames: Sequence[str], num_frames: int = NUM_FRAMES) -> tuple[str, ...]:
    """VLM2Vec's and the authors' choice: with n >= num_frames frames, `linspace(0, n-1, num_frames)` truncated to
    ints; with fewer, all of them (no padding)."""
    frames = tuple(frames)
    if len(frames) <= num_frames:
        return frames
    return tuple(frames[i] for i in np.linspace(0, len(frames) - 1, num_frames).astype(int))


def video_item(folder: str | os.PathLike, text: str, source: str, field_name: str,
               num_frames: int = NUM_FRAMES) -> Item:
    """An Item of `num_frames` frames picked from a frame folder; ValueError naming the row when it has none."""
    frames = list_frames(folder)
    if not frames:
        raise RowError(field_name, f"no frame images (.jpg/.jpeg/.png) in {folder}").at(source)
    return Item(text=text, video=pick_frames(frames, num_frames))


def image_bytes(value: Any, source: str, field_name: str) -> tuple[bytes, str | None]:
    """An HF Image cell -> (encoded bytes, its original path or None). Parquet stores `{bytes, path}` structs."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
        path = value.get("path")
        return bytes(value["bytes"]), path if isinstance(path, str) and path else None
    raise RowError(field_name, "expected an image struct {bytes, path} with non-empty bytes").at(source)


def image_suffix(data: bytes, path: str | None) -> str:
    """The file suffix of encoded image bytes: the original path's, else the format Pillow detects."""
    if path and Path(path).suffix:
        return Path(path).suffix.lower()
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "png").lower()
    except OSError:
        return ".png"
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def write_media(directory: Path | str, name: str, data: bytes) -> str:
    """Writes `data` to `directory/name` once (atomically; an existing file of the same content is kept) and
    returns the path (a URL under a URL `directory`: one PUT, kept when an object of that size is there).
    Inline images become files so items stay small and hashable."""
    if fs.is_remote(directory):
        path = fs.join(directory, name)
        try:
            if fs.size(path) == len(data):
                return path
        except FileNotFoundError:
            pass
        fs.write_bytes_atomic(path, data)
        return path
    directory = Path(directory)
    path = directory / name
    if path.is_file() and path.stat().st_size == len(data):
        return str(path)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def short_hash(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()[:8]
