"""Small synthetic training batches and models shared by the trainer tests."""

from __future__ import annotations

import dataclasses
import json
import os

import hf_utils as H
import numpy as np
from flax import nnx

from btoks_jax.btoks import BToksModel
from btoks_jax.inputs import pack
from btoks_jax.lora import LoRAConfig, apply_lora
from btoks_jax.model_config import IM_END_ID, IM_START_ID, tiny_config

# One decoder layer and one vision block: the step tests check sharding and chunking, not depth, and a
# shallower graph compiles several times faster on CPU.
_BASE = tiny_config(vocab_size=151700)
CFG = _BASE.replace(text_config=dataclasses.replace(_BASE.text_config, num_hidden_layers=1),
                    vision_config=dataclasses.replace(_BASE.vision_config, depth=1))
K = 4
PREFIX = [IM_START_ID, 77091, 198]


def model(seed: int = 0, lora: bool = True, dropout: float = 0.0):
    m = BToksModel(CFG, K, rngs=nnx.Rngs(seed))
    if lora:
        apply_lora(m.backbone, LoRAConfig(rank=4, alpha=8, dropout=dropout), rngs=nnx.Rngs(seed + 1))
        # Non-zero B so the adapters matter from the first step.
        for _, a in nnx.iter_graph(m):
            if type(a).__name__ == "LoRAAdapter":
                a.b.value = a.b.value + 0.01
    return m


def batch(b: int = 8, seed: int = 0, query_len: int = 24, target_len: int = 10):
    """A global batch: image queries that generate the positive text, text positives."""
    rng = np.random.default_rng(seed)
    q_rows, p_rows, grids, q_targets, p_targets = [], [], [], [], []
    for i in range(b):
        g = (1, 2 * int(rng.integers(1, 3)), 4)
        grids.append(g)
        q_rows.append([int(x) for x in rng.integers(10, 5000, 3)] + H.image_tokens(g) + [int(rng.integers(10, 99))])
        body = [int(x) for x in rng.integers(10, 5000, int(rng.integers(2, 6)))]
        p_rows.append(body)
        q_targets.append((PREFIX + body + [IM_END_ID], 3))
        p_targets.append(None if i % 2 else (PREFIX + q_rows[-1][:3] + [IM_END_ID], 3))
    qb = H.make_batch(q_rows, "right")
    qb["image_grid_thw"] = np.array(grids)
    qb["pixel_values"] = H.random_pixels(grids, CFG.vision_config.patch_dim, seed)
    pb = H.make_batch(p_rows, "right")
    q = pack(qb, CFG, num_btoks=K, query_len=query_len, targets=q_targets, target_len=target_len, patch_budget=32)
    p = pack(pb, CFG, num_btoks=K, query_len=8, targets=p_targets, target_len=target_len)
    as_dict = lambda s: {"inputs": s.inputs, "labels": s.labels, "label_mask": s.label_mask}  # noqa: E731
    return {"query": as_dict(q), "positive": as_dict(p)}, (q.layout, p.layout)


def batch_arrays(batch) -> dict[str, np.ndarray]:
    """Every array of a `TrainBatch`, by name."""
    out = {"dataset_ids": batch.dataset_ids, "row_ids": batch.row_ids}
    for side in ("query", "positive"):
        packed = getattr(batch, side)
        out[f"{side}.labels"], out[f"{side}.label_mask"] = packed.labels, packed.label_mask
        for name, value in vars(packed.inputs).items():
            out[f"{side}.{name}"] = np.asarray(value)
    return out


def assert_same_batches(a, b) -> None:
    """Two `TrainBatch`es hold the same layouts and arrays, bit for bit."""
    assert a.query.layout == b.query.layout and a.positive.layout == b.positive.layout
    x, y = batch_arrays(a), batch_arrays(b)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def loss_rows(workdir) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` that hold a loss, in file order ([] before the file exists); a line
    cut by a kill is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if "loss" in row:
                rows.append(row)
    return rows
