"""Import of Hugging Face Qwen2-VL weights from a directory (local or `gs://`) into the NNX model.

The model is first built abstractly (shapes only); each checkpoint tensor is then read on its own,
shape-checked, converted to the parameter dtype and put straight into its target sharding, one
tensor at a time, so host memory stays near one copy of the largest tensor plus the device copy.
From a bucket the shards are streamed (header, then one ranged read per tensor), never copied whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from btoks_jax import fs
from btoks_jax.convert import names
from btoks_jax.convert.safetensors_io import TensorReader, tensor_index
from btoks_jax.model import Qwen2VL
from btoks_jax.model_config import Qwen2VLConfig, from_hf_config


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected and mis-shaped key."""


def read_hf_config(source: str) -> dict:
    """The `config.json` of a Hugging Face directory (or that file itself), local or `gs://`, as a dict."""
    source = str(source)
    return fs.read_json(fs.join(source, "config.json") if fs.isdir(source) else source)


def hf_config(source: str, **runtime) -> Qwen2VLConfig:
    """`from_hf_config` of a directory's `config.json`, wherever it lies."""
    return from_hf_config(read_hf_config(source), **runtime)


def path_str(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def abstract_model(config: Qwen2VLConfig) -> Qwen2VL:
    """The model with ShapeDtypeStruct leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)))


@dataclasses.dataclass
class ImportReport:
    loaded: list[str]
    ignored: list[str]  # checkpoint keys deliberately not used (e.g. a tied lm_head copy)


def load_hf_weights(
    directory: str,
    config: Qwen2VLConfig | None = None,
    *,
    sharding_for: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
    progress: bool = True,
    extra_keys: dict[str, Callable[[np.ndarray], None]] | None = None,
) -> tuple[Qwen2VL, ImportReport]:
    """Loads a Hugging Face Qwen2-VL directory into a `Qwen2VL` module.

    `sharding_for(path, shape)` gives each parameter's target sharding (default: the first device).
    `extra_keys` maps checkpoint keys that are not model weights to callbacks (used for BTok rows).
    Raises `CheckpointMismatchError` listing every problem at once.
    """
    config = config or hf_config(directory)
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    index = tensor_index(directory)

    conv_shape = (config.vision_config.embed_dim, config.vision_config.in_channels,
                  config.vision_config.temporal_patch_size, config.vision_config.patch_size,
                  config.vision_config.patch_size)
    plan, unexpected, misshaped, ignored, misshaped_paths = {}, [], [], [], set()
    for key in sorted(index):
        mapped = names.hf_to_path(key)
        if mapped is None or mapped[0] not in flat:
            if config.tie_word_embeddings and names.canonical_key(key) == "lm_head.weight":
                ignored.append(key)  # some exporters write the tied head too; the embedding is the truth
            elif extra_keys and key in extra_keys:
                pass
            else:
                unexpected.append(key)
            continue
        path, layout = mapped
        want = names.expected_hf_shape(flat[path].value.shape, layout, conv_shape)
        got = tuple(index[key][1]["shape"])
        if got != tuple(want):
            misshaped.append(f"{key}: checkpoint {got}, model expects {tuple(want)}")
            misshaped_paths.add(path)
            continue
        plan[path] = (key, layout)
    missing = [f"{names.path_to_hf(p)[0]} (parameter {p})" for p in sorted(set(flat) - set(plan) - misshaped_paths)]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {directory} does not match the model config:"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {u}" for u in unexpected]
        lines += [f"  mis-shaped: {m}" for m in misshaped]
        raise CheckpointMismatchError("\n".join(lines))

    values = {}
    with TensorReader() as reader:
        for path in tqdm(sorted(plan), desc="importing weights", disable=not progress, unit="tensor"):
            key, layout = plan[path]
            target = flat[path].value
            array = names.to_jax_layout(reader.load(index[key][0], key), layout)
            array = np.asarray(array, dtype=target.dtype) if array.dtype != target.dtype else np.asarray(array)
            sharding = sharding_for(path, target.shape) if sharding_for else jax.devices()[0]
            values[path] = jax.device_put(array, sharding)
            del array
        for key, callback in (extra_keys or {}).items():
            if key in index:
                callback(reader.load(index[key][0], key))

    for p, v in nnx.to_flat_state(state):
        v.value = values[path_str(p)]
    return nnx.merge(graphdef, state), ImportReport(loaded=sorted(plan.values()), ignored=ignored)


def model_from_hf(directory: str, **runtime) -> Qwen2VL:
    """Convenience: config from `config.json` (plus runtime overrides such as dtype) and weights."""
    model, _ = load_hf_weights(directory, hf_config(directory, **runtime))
    return model


__all__ = ["CheckpointMismatchError", "abstract_model", "hf_config", "load_hf_weights", "model_from_hf",
           "read_hf_config"]
