"""The ahead-of-time compile benchmark on the tiny preset: one GradCache step on a 2x2x2 CPU mesh, JSON schema."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

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


# ============================================================================== the side-by-side benchmarks, --tiny


def _run_tiny(name: str, tmp_path, *extra) -> dict:
    """Runs benchmarks/<name>.py --tiny in this process and returns its JSON record."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / f"{name}.json"
    assert module.main(module.parse_args(["--tiny", "--out", str(out), *extra])) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == name and record["tiny"] is True
    assert {"date_utc", "nproc", "cpu_model", "load_average", "jax"} <= record["machine"].keys()
    return record


def test_train_step_vs_torch_tiny(tmp_path):
    r = _run_tiny("train_step_vs_torch", tmp_path)
    assert r["first_step_agrees"] is True
    assert set(r["tokens_per_s"]) == set(r["times"]) == {"btoks_jax", "torch"}
    assert set(r["speedup"]) == {"btoks_jax"} and "of_medians" in r["speedup"]["btoks_jax"]
    assert {"loss", "info_nce", "ntp", "grad_norm"} <= r["first_step"].keys()
    assert set(r["compile_s"]) == {"btoks_jax"} and r["batch"]["tokens"] > 0


def test_embed_overhead_tiny(tmp_path):
    r = _run_tiny("embed_overhead", tmp_path)
    assert [x["length"] for x in r["lengths"]] == [16, 64]
    for x in r["lengths"]:
        assert {"overhead_room", "overhead_full", "overhead_room_median_of_pairs", "times", "rows"} <= x.keys()
        assert set(x["times"]) == {"last_room", "btoks_room", "last_full", "btoks_full"}
        # The Embedder's widths: the BToks fill the bucket when the input leaves room, else follow it.
        assert x["columns"] == {"last_room": x["length"], "btoks_room": x["length"], "last_full": x["length"],
                                "btoks_full": x["length"] + r["num_btoks"]}
    assert r["target_met"] is None  # no 1024-token length at the toy size


def test_condensation_mask_tiny(tmp_path):
    r = _run_tiny("condensation_mask", tmp_path)
    assert r["same_function"] is True
    for what in ("forward", "forward_backward"):
        d = r["dense"][what]
        assert d["flops"]["single"] > 0 and d["flops"]["two_pass"] > 0 and "of_medians" in d["time_ratio"]
        # The blocks of the single pass are the two passes' score tiles: the same attention work.
        assert r["dense"]["attention_alone"][what]["flops_ratio"] == pytest.approx(1.0, abs=1e-9)
    (tiles,) = r["splash_tiles"]
    assert {"computed", "tiles", "skipped_by_the_cut"} <= tiles["single"].keys() and tiles["single_over_two_pass"] > 0


def test_vocab_projection_tiny(tmp_path):
    r = _run_tiny("vocab_projection", tmp_path)
    paths = {x["path"] for x in r["results"]}
    assert paths == {"full_logits", "fused_chunk_4", "no_btok_rows_full_logits", "no_btok_rows_fused_chunk_4"}
    for x in r["results"]:
        assert x["temp_bytes"] > 0 and "of_medians" in x["time_ratio"]
        assert x["relative_difference"]["loss"] < 1e-5 and x["relative_difference"]["grads"] < 1e-4


def test_compile_count_tiny(tmp_path):
    r = _run_tiny("compile_count", tmp_path)
    assert r["distinct_programs"] >= 1 and len(r["first_step"]) == r["distinct_programs"] == len(r["programs"])
    assert set(r["passes"]) == {"cold_cache", "warm_cache"} and r["compiled_programs"] == 1
    assert r["passes"]["warm_cache"]["cache_files"] > 0 and "warm_cache_over_cold_cache" in r["ratios"]
