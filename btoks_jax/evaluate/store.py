"""Embeddings kept on disk by content hash, so a rerun (or a second evaluation over the same corpus) does not
re-embed what one model already embedded.

A key is the SHA-256 of the namespace (the model's fingerprint, pooling and prompt style: whatever changes the
vector) and of the item's content: its text, its instruction and the bytes of its image or frames (not their
paths, so a moved or re-extracted file keeps its key). Vectors are stored in append-only shards
`part-*.npz` (keys + float32 rows), each written to a temporary file and renamed (in object storage: one PUT of a
new object), so a killed run leaves only complete shards behind. The store's folder and the media may be local or
`gs://` URLs.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from btoks_jax import fs
from btoks_jax.evaluate.mmeb import Item

_FILE_DIGESTS: dict[tuple, str] = {}  # (path, *fs.version(path)) -> digest


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes (a local path or a URL), memoised per file version within the process."""
    key = (path, *fs.version(path))
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
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
        self.directory = fs.joinpath(directory, hashlib.sha256(namespace.encode()).hexdigest()[:16])
        self.remote = fs.is_remote(self.directory)
        self.namespace = namespace
        self.flush_every = flush_every
        fs.makedirs(self.directory)
        self._index: dict[str, tuple[int, int]] = {}
        self._shards: list[np.ndarray] = []
        self._pending_keys: list[str] = []
        self._pending: list[np.ndarray] = []
        if self.remote:
            shards = fs.glob(fs.join(self.directory, "part-*.npz"))
        else:
            shards = sorted(self.directory.glob("part-*.npz"))
        for path in shards:
            with np.load(io.BytesIO(fs.read_bytes(path)) if self.remote else path) as shard:
                keys, vectors = shard["keys"], shard["vectors"]
            shard_id = len(self._shards)
            self._shards.append(vectors)
            for row, key in enumerate(keys.tolist()):
                self._index[key] = (shard_id, row)
        fs.write_text(fs.joinpath(self.directory, "namespace.txt"), namespace + "\n")

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
        if self.remote:
            buffer = io.BytesIO()
            np.savez(buffer, keys=keys, vectors=vectors)
            fs.write_bytes_atomic(fs.join(self.directory, name), buffer.getvalue())
        else:
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
