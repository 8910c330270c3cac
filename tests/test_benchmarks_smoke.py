"""The ahead-of-time compile benchmark on the tiny preset: one GradCache step on a 2x2x2 CPU mesh, JSON schema."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "aot_compile_2b.py"

# What launch/topologies.py and the launch scripts read from every record.
FIELDS = {"topology", "chips", "mesh", "global_batch", "chunk_size", "per_device_chunk_rows", "query_len", "target_len",
          "attention_impl", "bytes_per_chip", "hbm_bytes", "fits", "flops", "estimated_seconds", "per_device_batch",
          "accum"}


def _load():
    spec = importlib.util.spec_from_file_location("aot_compile_2b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_compile_writes_records(tmp_path, capsys):
    assert jax.device_count() == 8, "the smoke test needs 8 (forced CPU) devices"
    aot = _load()
    out = tmp_path / "results.json"
    args = aot.parse_args(["--tiny", "--mesh", "2,2,2", "--chunk-size", "8", "--out", str(out)])
    assert aot.main(args) == 0
    assert "COMPILED ESTIMATES" in capsys.readouterr().out
    (record,) = json.loads(out.read_text())
    assert FIELDS <= record.keys()
    assert record["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    # 16 rows in chunks of 8 over data x fsdp = 4 batch shards: 2 rows per device per chunk, 2 chunks.
    assert (record["global_batch"], record["per_device_chunk_rows"], record["num_chunks"]) == (16, 2, 2)
    assert record["per_device_batch"] == 4 and record["accum"] == 2
    assert record["bytes_per_chip"] == (record["argument_bytes"] + record["output_bytes"] + record["temp_bytes"]
                                        - record["alias_bytes"]) > 0
    assert record["fits"] is True and record["flops"] > 0
    # The step compiled is the recipe's own, unpatched: its runlocal version with every code path on.
    assert "workaround" not in record
    assert record["config"].endswith("qwen2vl_2b.py:runlocal")
    assert record["lora"]["dora"] and record["lora"]["dropout"] == 0.05 and record["remat"]
    assert (record["dtype"], record["param_dtype"]) == ("bfloat16", "float32")

    # The committed launch table comes from compiles of the unmodified 2B recipe.
    committed = json.loads((SCRIPT.parents[1] / "launch" / "aot_compile_2b.json").read_text())
    assert committed and not any("workaround" in r for r in committed)
    assert all(r["lora"]["dora"] and r["lora"]["dropout"] == 0.05 and r["remat"] for r in committed)

    # --append replaces the record of the same configuration and keeps the others.
    other = dict(record, chunk_size=16)
    aot.write_results(out, [dict(record, bytes_per_chip=1), other], append=True)
    records = json.loads(out.read_text())
    assert sorted((r["chunk_size"], r["bytes_per_chip"] == 1) for r in records) == [(8, True), (16, False)]


def test_gic_chunk_grouping_measures_the_weights():
    """Rows alternating 1 and 10 target tokens: chunks of 8 in that order mix the lengths, so a sample weighs in
    proportion to its length; length-sorted chunks hold one length each, so every generating sample weighs the
    same. The total GIC weight (generating samples / batch) is the same either way."""
    spec = importlib.util.spec_from_file_location("gic_chunk_grouping", SCRIPT.with_name("gic_chunk_grouping.py"))
    gic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gic)
    import numpy as np

    mask = np.zeros((16, 10), bool)
    for i in range(16):
        mask[i, : 1 if i % 2 else 10] = True
    r = gic.compare(mask, chunk=8, devices=1)
    # Mixed chunk of 4 x 10 + 4 x 1 tokens: a sample weighs len / 44 x 8 / 16, so 10 / 1 apart. (The weights
    # are float32 token weights summed: 1e-6.)
    assert abs(r["spread_mixture"] - 10.0) < 1e-6 and abs(r["spread_sorted"] - 1.0) < 1e-6
    assert abs(r["total_mixture"] - 1.0) < 1e-6 and abs(r["total_sorted"] - 1.0) < 1e-6
    # Each long sample goes from 10/88 to 1/16 of the weight: 8 x (10/88 - 1/16) of 1 moves.
    assert abs(r["distance"] - 8 * (10 / 88 - 1 / 16)) < 1e-6
    # Two devices keep their rows apart: sorting never moves a row across the device boundary.
    order = gic.length_sorted(mask, devices=2)
    assert sorted(order[:8]) == list(range(8)) and sorted(order[8:]) == list(range(8, 16))
