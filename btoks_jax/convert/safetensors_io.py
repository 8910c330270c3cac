"""Reading Hugging Face safetensors checkpoints one tensor at a time, local or in a bucket.

Local files go through the `safetensors` package (memory-mapped). Files behind a URL (`gs://...`) are read
through `btoks_jax.fs` without a local copy: the 8-byte header length and the JSON header first, then each
tensor's byte range on its own, one ranged read per tensor.
"""

from __future__ import annotations

import json
import struct

import ml_dtypes  # registers np.dtype("bfloat16"), which safetensors' numpy backend asks for
import numpy as np
from safetensors import SafetensorError, safe_open

from btoks_jax import fs

# safetensors dtype tags -> NumPy dtypes (the format's table).
DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
          "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F32": np.float32, "F64": np.float64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
MAX_HEADER_BYTES = 100 * 2**20  # what the safetensors format allows


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a Hugging Face directory, through its index when there is one."""
    index = fs.join(directory, "model.safetensors.index.json")
    if fs.exists(index):
        names = sorted(set(fs.read_json(index)["weight_map"].values()))
    elif fs.exists(fs.join(directory, "model.safetensors")):
        names = ["model.safetensors"]  # what transformers reads without an index
    else:
        # Files of btoks-jax's own (`btoks_head.safetensors`, the v2 pooling head) are not model weights.
        names = sorted(n for n in fs.listdir(directory) if n.endswith(".safetensors") and not n.startswith("btoks_"))
    if not names:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
    paths = [fs.join(directory, n) for n in names]
    missing = [p for p in paths if not fs.exists(p)]
    if missing:
        raise FileNotFoundError(f"{directory}: the index names files that are missing: {missing}")
    return paths


def _open(path: str) -> safe_open:
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e


class RemoteSafetensors:
    """One safetensors file behind a URL, read through a file object of `btoks_jax.fs`: the header when opened,
    then one ranged read per `get`. Arrays come back read-only (views of the bytes read, so that the largest
    tensor is held once)."""

    def __init__(self, path: str):
        self.path = path
        self._file = fs.open(path, "rb", cache_type="none")  # no read-ahead: each read is exactly one request
        try:
            raw = self._file.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"{path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(self._file.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
        except BaseException:
            self._file.close()
            raise
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def header(self) -> dict[str, dict]:
        return {key: {"dtype": e["dtype"], "shape": list(e["shape"])} for key, e in self.entries.items()}

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which is not supported")
        begin, end = entry["data_offsets"]
        self._file.seek(self.data_start + begin)
        raw = self._file.read(end - begin)
        if len(raw) != end - begin:
            raise ValueError(f"{self.path}: tensor {key!r} is cut short ({len(raw)} of {end - begin} bytes)")
        return np.frombuffer(raw, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


def read_header(path: str) -> dict[str, dict]:
    """name -> {"dtype": safetensors tag such as "BF16", "shape": list} for every tensor of one file."""
    if fs.is_remote(path):
        with RemoteSafetensors(path) as f:
            return f.header()
    with _open(path) as f:
        slices = {key: f.get_slice(key) for key in f.keys()}
        return {key: {"dtype": s.get_dtype(), "shape": s.get_shape()} for key, s in slices.items()}


def tensor_index(directory: str) -> dict[str, tuple[str, dict]]:
    """key -> (file, header entry) for every tensor of the checkpoint; nothing is read but the headers."""
    out = {}
    for path in checkpoint_files(directory):
        for key, entry in read_header(path).items():
            if key in out:
                raise ValueError(f"{directory}: tensor {key!r} appears in two files")
            out[key] = (path, entry)
    return out


def load_tensor(path: str, key: str) -> np.ndarray:
    """One tensor of one file, read on its own (a local file is memory-mapped and the tensor copied out; a remote
    one is read in one ranged request after its header)."""
    if fs.is_remote(path):
        with RemoteSafetensors(path) as f:
            return f.get(key)
    with _open(path) as f:
        return f.get_tensor(key)


class TensorReader:
    """Loads many tensors of a checkpoint, keeping each remote file open (its header read once) until closed;
    local files are read with `load_tensor` as they are."""

    def __init__(self):
        self._remote: dict[str, RemoteSafetensors] = {}

    def load(self, path: str, key: str) -> np.ndarray:
        if not fs.is_remote(path):
            return load_tensor(path, key)
        if path not in self._remote:
            self._remote[path] = RemoteSafetensors(path)
        return self._remote[path].get(key)

    def close(self) -> None:
        for f in self._remote.values():
            f.close()
        self._remote.clear()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
