"""Reading Hugging Face safetensors checkpoints one tensor at a time, through the `safetensors` package."""

from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401  registers np.dtype("bfloat16"), which safetensors' numpy backend asks for
import numpy as np
from safetensors import SafetensorError, safe_open


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


def _open(path: str) -> safe_open:
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e


def read_header(path: str) -> dict[str, dict]:
    """name -> {"dtype": safetensors tag such as "BF16", "shape": list} for every tensor of one file."""
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
    """One tensor of one file, read on its own (the file is memory-mapped, the tensor copied out)."""
    with _open(path) as f:
        return f.get_tensor(key)
