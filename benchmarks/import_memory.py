"""Peak host memory of importing a Qwen2-VL-2B-sized checkpoint, against its parameter bytes.

    python benchmarks/import_memory.py [--dtype bfloat16] [--workdir /tmp/btoks_2b_ckpt]

Writes a random checkpoint with the exact Qwen2-VL-2B tensor names and shapes (safetensors shards
with an index, as published checkpoints are), then imports it in a fresh process with
`btoks_jax.convert.hf_import.load_hf_weights` and reports the peak resident set size of that
process (`ru_maxrss`) divided by the parameter bytes. On the CPU backend device memory is host
memory, so the imported parameters themselves count too: the ratio includes one full copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def write_checkpoint(directory: str, dtype: str, shard_bytes: int = 2 * 2**30) -> int:
    import ml_dtypes
    from flax import nnx
    from safetensors.numpy import save_file

    from btoks_jax.convert.hf_export import hf_state_dict_keys
    from btoks_jax.convert.hf_import import abstract_model, path_str
    from btoks_jax.convert.names import expected_hf_shape, path_to_hf
    from btoks_jax.model_config import QWEN2_VL_2B

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    flat = {path_str(p): v.value.shape for p, v in nnx.to_flat_state(nnx.state(abstract_model(QWEN2_VL_2B)))}
    v = QWEN2_VL_2B.vision_config
    conv = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    shapes = {}
    for path, shape in flat.items():
        key, layout = path_to_hf(path)
        shapes[key] = expected_hf_shape(shape, layout, conv)
    assert sorted(shapes) == sorted(hf_state_dict_keys(QWEN2_VL_2B))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(QWEN2_VL_2B.to_hf_dict(), f)
    rng = np.random.default_rng(0)
    shards, current, size, total = [], {}, 0, 0
    for key in sorted(shapes):
        current[key] = (rng.standard_normal(shapes[key], np.float32) * 0.02).astype(np_dtype)
        size += current[key].nbytes
        total += current[key].nbytes
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


CHILD = r"""
import resource, sys, time
import jax
from btoks_jax.model_config import from_hf_config
from btoks_jax.convert.hf_import import load_hf_weights
d, dtype = sys.argv[1], sys.argv[2]
t = time.perf_counter()
model, _ = load_hf_weights(d, from_hf_config(d, param_dtype=dtype, dtype=dtype), progress=False)
jax.block_until_ready(jax.tree.leaves(model))
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--workdir", default=os.path.join("runs", "import_memory_2b"))
    args = parser.parse_args()
    index = os.path.join(args.workdir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            total = json.load(f)["metadata"]["total_size"]
    else:
        t = time.perf_counter()
        total = write_checkpoint(args.workdir, args.dtype)
        seconds = time.perf_counter() - t
        print(f"wrote a random 2B checkpoint ({total / 2**30:.2f} GiB, {args.dtype}) in {seconds:.0f} s")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, args.workdir, args.dtype], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    seconds, peak = float(out[-2]), int(out[-1])
    print(f"parameter bytes     {total / 2**30:8.2f} GiB ({args.dtype})")
    print(f"peak RSS of import  {peak / 2**30:8.2f} GiB (measured, includes the imported copy and the runtime)")
    print(f"ratio               {peak / total:8.2f} x parameter bytes")
    print(f"import time         {seconds:8.1f} s")


if __name__ == "__main__":
    main()
