"""Embeddings kept on disk by content hash, so a rerun (or a second evaluation over the same corpus) does not
re-embed what one model already embedded.

A key is the SHA-256 of the namespace (the model's fingerprint, pooling and prompt style: whatever changes the
vector) and of the item's content: its text, its instruction and the bytes of its image or frames (not their
paths, so a moved or re-extracted file keeps its key). Vectors are stored in append-only shards
`part-*.npz` (keys + float32 rows), each written to a temporary file and renamed, so a killed run leaves only
complete shards behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from btoks_jax.evaluate.mmeb import Item

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def item_key(item: Item, namespace: str) -> str:
    """The content hash of an item under a namespace."""
    digest = hashlib.sha256()
    for part in (namespace, item.instruction, item.text, item.kind):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    if item.image:
        digest.update(file_digest(item.image).encode())
    for frame in item.video or ():
        digest.update(file_digest(frame).encode())
        digest.update(b"\0")
    return digest.hexdigest()


class EmbeddingStore:
    """A folder of embeddings keyed by content hash: `get` what is there, `put` what was computed, `flush`."""

    def __init__(self, directory: str | os.PathLike, namespace: str, flush_every: int = 4096):
        self.directory = Path(directory) / hashlib.sha256(namespace.encode()).hexdigest()[:16]
        self.namespace = namespace
        self.flush_every = flush_every
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        self._pending_keys: list[str] = []
        self._pending: list[np.ndarray] = []
        for path in sorted(self.directory.glob("part-*.npz")):
            with np.load(path) as shard:
                keys, vectors = shard["keys"], shard["vectors"]
            shard_id = len(self._shards)
            self._shards.append(vectors)
            for row, key in enumerate(keys.tolist()):
                self._index[key] = (shard_id, row)
        (self.directory / "namespace.txt").write_text(namespace + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self._index) + len(self._pending_keys)

    def key(self, item: Item) -> str:
        return item_key(item, self.namespace)

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those keys that are present."""
        self.flush()
        found = {}
        for key in keys:
            where = self._index.get(key)
            if where is not None:
                found[key] = self._shards[where[0]][where[1]]
        return found

    def put(self, keys: Iterable[str], vectors: np.ndarray) -> None:
        keys = list(keys)
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but {vectors.shape[0]} vectors")
        self._pending_keys += keys
        self._pending.append(vectors)
        if len(self._pending_keys) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Writes the pending vectors as one new shard (atomically)."""
        if not self._pending_keys:
            return
        keys = np.array(self._pending_keys)
        vectors = np.concatenate(self._pending)
        name = f"part-{uuid.uuid4().hex}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=keys, vectors=vectors)
            os.replace(tmp, self.directory / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        shard_id = len(self._shards)
        self._shards.append(vectors)
        for row, key in enumerate(self._pending_keys):
            self._index[key] = (shard_id, row)
        self._pending_keys, self._pending = [], []
