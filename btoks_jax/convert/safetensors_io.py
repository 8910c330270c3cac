"""Streaming safetensors reading without a framework: one memory-mapped tensor at a time.

The numpy backend of the `safetensors` package cannot represent bfloat16; reading the (simple)
format directly with `ml_dtypes` keeps every dtype and never loads a whole file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_header(path: str) -> tuple[dict, int]:
    """Returns (header without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a Hugging Face directory, through its index when there is one."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        names = ["model.safetensors"]  # what transformers reads without an index
    else:
        # Files of btoks-jax's own (`btoks_head.safetensors`, the v2 pooling head) are not model weights.
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors") and not n.startswith("btoks_"))
    if not names:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
    paths = [os.path.join(directory, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{directory}: the index names files that are missing: {missing}")
    return paths


def tensor_index(directory: str) -> dict[str, tuple[str, dict, int]]:
    """key -> (file, header entry, data offset) for every tensor of the checkpoint."""
    out = {}
    for path in checkpoint_files(directory):
        header, start = read_header(path)
        for key, entry in header.items():
            if key in out:
                raise ValueError(f"{directory}: tensor {key!r} appears in two files")
            out[key] = (path, entry, start)
    return out


def load_tensor(path: str, entry: dict, start: int) -> np.ndarray:
    """A read-only memory-mapped view of one tensor."""
    dtype = np.dtype(_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{path}: tensor byte size does not match its shape {shape} and dtype {entry['dtype']}")
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def iter_tensors(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    for key, (path, entry, start) in tensor_index(directory).items():
        yield key, load_tensor(path, entry, start)
