"""One file-system layer for every path btoks-jax reads or writes: local paths and `gs://` URLs.

Local paths go to the standard library (`open`, `os`, `shutil`) and behave exactly as they always
have. URLs (`gs://BUCKET/PATH`, or any other protocol fsspec knows and has installed, e.g. `s3://`)
go to fsspec; for `gs://` that is gcsfs, the same library that `etils.epath`, and so Orbax, uses for
its own file operations (Orbax writes array data with tensorstore). Credentials are the usual
Google ones (Application Default Credentials; on a TPU VM its service account). To point every
client at a Cloud Storage emulator, see `tests/gcs_emulator.py`.

    from btoks_jax import fs
    fs.write_text_atomic(fs.join(workdir, "config.json"), text)
    with fs.open("gs://bucket/data/rows.jsonl") as f: ...
    with fs.open("gs://bucket/images/cat.jpg", "rb") as f: image = PIL.Image.open(f)

What object storage does differently, and what this module does about it:

* No folders: an object's name is the whole path. `makedirs` is a no-op for URLs, `isdir` is true
  when some object's name starts with `PATH/`, and an empty "folder" does not exist.
* No rename: a single-object PUT is atomic (readers see the old object or the new one, never a
  part), so `write_text_atomic` / `write_bytes_atomic` are one PUT; a directory is published with
  `publish_dir` (see there).
* No append: `LineLog` (metrics.jsonl) keeps the file's content in memory in the one process that
  writes it and rewrites the whole object on every append; see there.
* Reads are ranged: `open(url, "rb")` gives a seekable file object that fetches only the bytes it
  is asked for (pass `cache_type="none"` for exactly one request per `read`), so a reader of
  safetensors headers, Parquet footers or one image in a bucket never downloads whole files.
* Listings are never cached by this module's clients: other processes (tensorstore, the workers of
  a pod) write to the same bucket.

For readers of data files the same calls cover every kind of source: `.jsonl` through `open(p)`,
`.parquet` through `pyarrow.parquet.read_table(open(p, "rb"))`, images through
`PIL.Image.open(open(p, "rb"))`, frame folders through `listdir` / `glob`, and `join` / `basename`
for relative media paths. Pass URLs as strings (or `epath.Path`): `pathlib.Path("gs://b/x")`
collapses the `//` into a local path `gs:/b/x`. Code written for `pathlib` keeps its local behaviour with
`as_path` / `joinpath` / `parent`, which give a `Path` for a local path and the string for a URL. A reader that
checks that thousands of media files exist uses a `FileIndex` (one listing per folder, not one request per file).
"""

from __future__ import annotations

import builtins
import contextlib
import glob as _glob
import json
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

# Options of every remote file system this module creates (fsspec caches one instance per set of options).
_REMOTE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}


# ============================================================================== paths


def _str(p: PathLike) -> str:
    return os.fspath(p)


def is_remote(p: PathLike) -> bool:
    """Whether `p` is a URL of a remote file system (`gs://...`), as opposed to a local path (or `file://`)."""
    from fsspec.utils import get_protocol

    return get_protocol(_str(p)) not in ("file", "local")


def _remote(p: PathLike):
    """(fsspec file system, the path as that file system names it) of a URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(_str(p), **_REMOTE_OPTIONS)


def path(p: PathLike):
    """`p` as an `etils.epath.Path` (pathlib's API, `gs://` included): the path type Orbax takes."""
    from etils import epath

    return epath.Path(_str(p))


def as_path(p: PathLike) -> Path | str:
    """`p` for code that takes paths apart: a local path as a `pathlib.Path` (what such code did before URLs), a
    URL as its string (a `Path` would turn `gs://b/x` into `gs:/b/x`)."""
    return _str(p) if is_remote(p) else Path(p)


def joinpath(base: PathLike, *parts: str) -> Path | str:
    """`base / part / ...` in the type `as_path` gives: `Path.joinpath` for a local path, `join` for a URL."""
    return join(base, *parts) if is_remote(base) else Path(base).joinpath(*parts)


def parent(p: PathLike) -> Path | str:
    """The folder of `p` in the type `as_path` gives: `Path(p).parent` locally, `dirname` for a URL."""
    return dirname(p) if is_remote(p) else Path(p).parent


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...`: `os.path.join` for a local path, `/`-joined for a URL."""
    base = _str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def absolute(p: PathLike) -> str:
    """A local path made absolute; a URL as it is (without a trailing `/`)."""
    p = _str(p)
    if is_remote(p):
        return p.rstrip("/") if not p.endswith("://") else p
    return os.path.abspath(p)


def basename(p: PathLike) -> str:
    """The last component, ignoring a trailing separator: basename("gs://b/run/") == "run"."""
    p = _str(p)
    if is_remote(p):
        return posixpath.basename(p.rstrip("/"))
    return os.path.basename(os.path.normpath(p))


def dirname(p: PathLike) -> str:
    """The parent: dirname("gs://b/run/x") == "gs://b/run"."""
    p = _str(p)
    if is_remote(p):
        return posixpath.dirname(p.rstrip("/"))
    return os.path.dirname(os.path.normpath(p))


# ============================================================================== queries


def exists(p: PathLike) -> bool:
    if not is_remote(p):
        return os.path.exists(p)
    fsys, inner = _remote(p)
    return fsys.exists(inner)


def isdir(p: PathLike) -> bool:
    """A local folder, or a URL prefix under which some object lies."""
    if not is_remote(p):
        return os.path.isdir(p)
    fsys, inner = _remote(p)
    return fsys.isdir(inner)


def isfile(p: PathLike) -> bool:
    if not is_remote(p):
        return os.path.isfile(p)
    fsys, inner = _remote(p)
    return fsys.isfile(inner)


def size(p: PathLike) -> int:
    if not is_remote(p):
        return os.path.getsize(p)
    fsys, inner = _remote(p)
    return int(fsys.size(inner))


def version(p: PathLike) -> tuple:
    """A value that changes when a file's content does: (size, mtime in ns) locally; for an object (size, its
    generation, or the ETag / MD5 where the store reports no generation). FileNotFoundError if there is none."""
    if not is_remote(p):
        stat = os.stat(p)
        return (stat.st_size, stat.st_mtime_ns)
    fsys, inner = _remote(p)
    info = fsys.info(inner)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{p}: a folder, not a file")
    tag = info.get("generation") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or ""
    return (int(info.get("size") or 0), str(tag))


def listdir(p: PathLike) -> list[str]:
    """The names directly inside a folder (files and sub-folders), sorted. FileNotFoundError if there is none."""
    if not is_remote(p):
        return sorted(os.listdir(p))
    fsys, inner = _remote(p)
    inner = inner.rstrip("/")
    names = {posixpath.basename(entry.rstrip("/")) for entry in fsys.ls(inner, detail=False)
             if entry.rstrip("/") != inner}
    if not names and fsys.isfile(inner):
        raise NotADirectoryError(f"{p}: a file, not a folder")
    return sorted(n for n in names if n)


def listfiles(p: PathLike) -> list[str]:
    """The names of the files directly inside a folder (no sub-folders), sorted; for a URL one listing (a request
    per thousand names). FileNotFoundError if there is no such folder."""
    if not is_remote(p):
        return sorted(n for n in os.listdir(p) if os.path.isfile(os.path.join(p, n)))
    fsys, inner = _remote(p)
    inner = inner.rstrip("/")
    entries = fsys.ls(inner, detail=True)
    names = {posixpath.basename(e["name"].rstrip("/")) for e in entries
             if e.get("type") == "file" and e["name"].rstrip("/") != inner}
    if not names and not entries:
        raise FileNotFoundError(f"{p}: no such folder")
    return sorted(names)


def glob(pattern: PathLike) -> list[str]:
    """Paths (URLs for a URL pattern) that match a `*` / `?` / `[...]` / `**` pattern, sorted."""
    pattern = _str(pattern)
    if not is_remote(pattern):
        return sorted(_glob.glob(pattern, recursive=True))
    fsys, inner = _remote(pattern)
    return sorted(fsys.unstrip_protocol(m) for m in fsys.glob(inner))


def walk_files(p: PathLike) -> list[str]:
    """Every file under a folder, as `/`-separated paths relative to it, sorted."""
    p = _str(p)
    if not is_remote(p):
        out = []
        for root, _, files in os.walk(p):
            rel = os.path.relpath(root, p)
            out += [f if rel == "." else posixpath.join(*rel.split(os.sep), f) for f in files]
        return sorted(out)
    fsys, inner = _remote(p)
    inner = inner.rstrip("/")
    if not fsys.isdir(inner):
        return []
    return sorted(f[len(inner) + 1:] for f in fsys.find(inner) if f.startswith(inner + "/") and not f.endswith("/"))


class FileIndex:
    """`isfile` for the many media files of a data set: for URLs each folder is listed once (one request per
    thousand names) and its file names kept, instead of one request per file; local paths ask the OS each time.

    A reader that checks every image of a data set before it starts makes one per read (the listing is a
    snapshot of that moment); safe to share between threads.
    """

    def __init__(self):
        self._names: dict[str, frozenset[str]] = {}
        self._lock = threading.Lock()

    def isfile(self, p: PathLike) -> bool:
        p = _str(p)
        if not is_remote(p):
            return os.path.isfile(p)
        if p.endswith("/"):
            return False
        folder, name = posixpath.split(p)
        with self._lock:
            names = self._names.get(folder)
        if names is None:
            names = self._list(folder)
            with self._lock:
                self._names[folder] = names
        return name in names

    @staticmethod
    def _list(folder: str) -> frozenset[str]:
        try:
            return frozenset(listfiles(folder))
        except (FileNotFoundError, NotADirectoryError):
            return frozenset()


# ============================================================================== reading and writing


def open(p: PathLike, mode: str = "r", encoding: str | None = None, **remote_options) -> IO:  # noqa: A001
    """A file object, as the built-in `open` gives. For a URL: fsspec's (seekable when reading, ranged reads;
    written when closed, larger files in a resumable upload as they grow); text modes default to UTF-8 there.
    `remote_options` (e.g. `block_size`, `cache_type="none"`) go to fsspec and are ignored for local paths."""
    if not is_remote(p):
        return builtins.open(p, mode, encoding=encoding)
    fsys, inner = _remote(p)
    if "b" not in mode:
        encoding = encoding or "utf-8"
        return fsys.open(inner, mode, encoding=encoding, **remote_options)
    return fsys.open(inner, mode, **remote_options)


def read_bytes(p: PathLike) -> bytes:
    if not is_remote(p):
        with builtins.open(p, "rb") as f:
            return f.read()
    fsys, inner = _remote(p)
    return fsys.cat_file(inner)


def read_text(p: PathLike, encoding: str = "utf-8") -> str:
    if not is_remote(p):
        with builtins.open(p, encoding=encoding) as f:
            return f.read()
    return read_bytes(p).decode(encoding)


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
    if not is_remote(p):
        with builtins.open(p, "wb") as f:
            f.write(data)
        return
    fsys, inner = _remote(p)
    fsys.pipe_file(inner, bytes(data))


def write_text(p: PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(p, text.encode(encoding))


def write_bytes_atomic(p: PathLike, data: bytes) -> None:
    """Writes a whole file so that readers see the old content or the new one, never a part.

    Local: a temporary file in the same folder, flushed to disk, then renamed over `p` (`os.replace`, atomic
    on POSIX). Object storage: one PUT of the object, which the store makes visible all at once.
    """
    p = _str(p)
    if is_remote(p):
        write_bytes(p, data)
        return
    folder = os.path.dirname(os.path.abspath(p))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(p: PathLike, text: str, encoding: str = "utf-8") -> None:
    """`write_bytes_atomic` of the encoded text."""
    write_bytes_atomic(p, text.encode(encoding))


def makedirs(p: PathLike) -> None:
    """Creates a local folder and its parents (fine if it exists). A no-op for URLs: object names need no
    folders, and buckets are created by their owner, never here."""
    if not is_remote(p):
        os.makedirs(p, exist_ok=True)


def remove(p: PathLike) -> None:
    """Deletes one file."""
    if not is_remote(p):
        os.remove(p)
        return
    fsys, inner = _remote(p)
    fsys.rm_file(inner)


def rmtree(p: PathLike, missing_ok: bool = True) -> None:
    """Deletes a folder and everything under it (every object under the prefix)."""
    if not is_remote(p):
        if missing_ok and not os.path.exists(p):
            return
        shutil.rmtree(p)
        return
    fsys, inner = _remote(p)
    if missing_ok and not fsys.exists(inner):
        return
    fsys.rm(inner.rstrip("/"), recursive=True)


def copy(src: PathLike, dst: PathLike) -> None:
    """Copies one file between any two of local / remote (remote to remote on one store: a server-side copy)."""
    src, dst = _str(src), _str(dst)
    if not is_remote(src) and not is_remote(dst):
        shutil.copyfile(src, dst)
    elif not is_remote(src):
        fsys, inner = _remote(dst)
        fsys.put_file(src, inner)
    elif not is_remote(dst):
        fsys, inner = _remote(src)
        fsys.get_file(inner, dst)
    else:
        sfs, sin = _remote(src)
        dfs, din = _remote(dst)
        if sfs is dfs:
            sfs.copy(sin, din)
        else:
            with open(src, "rb") as r, open(dst, "wb") as w:
                shutil.copyfileobj(r, w, 16 * 2**20)


def copy_tree(src: PathLike, dst: PathLike, names: Iterable[str] | None = None) -> list[str]:
    """Copies every file under `src` (or only `names`, relative paths) to the same place under `dst`; returns
    the relative paths copied. A local tree going to a URL is uploaded in concurrent batches (fsspec's `put` of
    the file lists); in every other direction file by file."""
    rels = list(names) if names is not None else walk_files(src)
    if rels and not is_remote(src) and is_remote(dst):
        fsys, _ = _remote(dst)
        fsys.put([os.path.join(_str(src), *rel.split("/")) for rel in rels],
                 [_remote(join(dst, *rel.split("/")))[1] for rel in rels])
        return rels
    for rel in rels:
        target = join(dst, *rel.split("/"))
        if not is_remote(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy(join(src, *rel.split("/")), target)
    return rels


@contextlib.contextmanager
def local_copy(directory: PathLike, names: Sequence[str]) -> Iterator[str]:
    """A local folder holding the files `names` of `directory` that exist (for libraries that read local files
    only, e.g. a tokenizer's JSON files). A local `directory` is yielded as it is; a remote one is copied into a
    temporary folder, removed afterwards. Meant for small files: never copy weights this way."""
    directory = _str(directory)
    if not is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="btoks-remote-") as tmp:
        present = set(listdir(directory)) if isdir(directory) else set()
        for name in names:
            if name in present:
                copy(join(directory, name), os.path.join(tmp, name))
        yield tmp


# ============================================================================== publishing a directory


def staging_dir(dst: PathLike) -> str:
    """A fresh sibling of `dst` to build a directory in before `publish_dir` puts it in place: a new hidden local
    folder next to it, or an unused `.NAME.partial-XXXXXXXX` prefix next to a URL (nothing is created there)."""
    dst = absolute(dst)
    name = basename(dst)
    if is_remote(dst):
        return join(dirname(dst), f".{name}.partial-{uuid.uuid4().hex[:8]}")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)


def publish_dir(staged: PathLike, dst: PathLike, *, last: Sequence[str] = ()) -> None:
    """Puts the finished directory `staged` (from `staging_dir`) in place of `dst`, replacing what `dst` held.

    Local: renames (an existing `dst` is moved aside first and deleted only once the new one is in place), so a
    reader sees the old directory or the new one. Object storage has no rename; there the files are copied
    server-side in this order: first the `last` files are deleted from `dst` (for a model directory,
    `config.json`, which its loaders read first, so that while the rest changes `dst` does not look like a
    complete model), then every other file is copied, files of the old `dst` that the new one lacks are
    deleted, and the `last` files are copied at the end. Each object appears whole; a failure part-way leaves
    `dst` without its `last` files, i.e. visibly incomplete, never a mix that looks finished. `staged` is
    removed afterwards.
    """
    staged, dst = absolute(staged), absolute(dst)
    if not is_remote(dst):
        if not os.path.exists(dst):
            os.rename(staged, dst)
            return
        old = staged + ".old"
        os.rename(dst, old)
        try:
            os.rename(staged, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old)
        return
    new = walk_files(staged)
    old = walk_files(dst)
    for name in last:
        if name in old:
            remove(join(dst, name))
    for rel in new:
        if rel not in last:
            copy(join(staged, rel), join(dst, rel))
    for rel in sorted(set(old) - set(new)):
        if rel not in last:
            remove(join(dst, rel))
    for rel in last:
        if rel in new:
            copy(join(staged, rel), join(dst, rel))
    rmtree(staged)


# ============================================================================== append-only logs


class LineLog:
    """Lines appended to one file by the one process that writes it (the trainer's metrics.jsonl).

    Local: each line is appended to the file and flushed, as `open(path, "a")` does. Object storage has no
    append, so for a URL the log holds the file's whole content in memory, read once when the log is opened (a
    resumed run keeps the lines of the runs before), and rewrites the object with one PUT on every `append`.
    Each PUT is atomic: a reader always sees whole lines, and a killed writer loses nothing it had appended.
    Cost: one upload of the whole file per append, fine for logs of a few megabytes. Only one process may
    write a given log (several writers would overwrite each other's lines): in a pod, process 0.
    """

    def __init__(self, p: PathLike):
        self.path = _str(p)
        self.remote = is_remote(self.path)
        self._content = bytearray()
        if self.remote and exists(self.path):
            self._content += read_bytes(self.path)
            if self._content and not self._content.endswith(b"\n"):
                self._content += b"\n"

    def append(self, line: str) -> None:
        """Appends `line` (a newline is added) and makes it durable before returning."""
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        if not self.remote:
            with builtins.open(self.path, "ab") as f:
                f.write(data)
            return
        self._content += data
        write_bytes(self.path, bytes(self._content))

    def append_json(self, obj: Any) -> None:
        self.append(json.dumps(obj))


def append_line(p: PathLike, line: str) -> None:
    """Appends one line to a file. For a URL that is a read of the whole object and one PUT of it with the line
    added (see `LineLog`, which keeps the content and saves the read, for a log written many times)."""
    LineLog(p).append(line)


__all__ = ["FileIndex", "LineLog", "absolute", "append_line", "as_path", "basename", "copy", "copy_tree", "dirname",
           "exists", "glob", "is_remote", "isdir", "isfile", "join", "joinpath", "listdir", "listfiles", "local_copy",
           "makedirs", "open", "parent", "path", "publish_dir", "read_bytes", "read_json", "read_text", "remove",
           "rmtree", "size", "staging_dir", "version", "walk_files", "write_bytes", "write_bytes_atomic", "write_text",
           "write_text_atomic"]
