"""Ahead-of-time compile of the 2B joint BToks train step for a TPU slice: per-chip memory, fit, XLA cost estimates.

The step is the one `btoks train --config configs/qwen2vl_2b.py` runs: the model, LoRA / DoRA, step and optimizer
settings are read from that config file, unmodified; only what a launch chooses (the mesh, the GradCache chunk) and
the sequence budgets of the compiled batch come from the command line.

Nothing runs on a TPU: the step is lowered with abstract inputs (shapes and shardings only, no weights) for the
compile-only devices of a TPU topology that libtpu describes, and compiled by the real TPU compiler. What comes
back are COMPILED ESTIMATES: per-chip bytes from `memory_analysis()` and flops / time from `cost_analysis()`.

    python benchmarks/aot_compile_2b.py --topology v5e:4x4 --mesh 1,16,1 --chunk-size 64 --out results.json
    python benchmarks/aot_compile_2b.py --tiny --out /tmp/tiny.json      # configs/qwen2vl_2b.py:runlocal on CPU

Needs `pip install "jax[tpu]"` (libtpu) for TPU topologies; `--tiny` needs nothing extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

# ============================================================================== hardware and sequence budgets

GIB = 2**30

# Per TPU generation: HBM per chip, peak dense bf16 flop/s per chip (Cloud TPU documentation), how the Cloud
# accelerator type counts (v4 and v5p name TensorCores, two per chip), and its prefix there.
GENERATIONS = {
    "v4": {"hbm": 32 * GIB, "peak_flops": 275e12, "cores_per_chip": 2, "accelerator": "v4"},
    "v5e": {"hbm": 16 * GIB, "peak_flops": 197e12, "cores_per_chip": 1, "accelerator": "v5litepod"},
    "v5p": {"hbm": 95 * GIB, "peak_flops": 459e12, "cores_per_chip": 2, "accelerator": "v5p"},
    "v6e": {"hbm": 32 * GIB, "peak_flops": 918e12, "cores_per_chip": 1, "accelerator": "v6e"},
}

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "qwen2vl_2b.py"


def largest_program(data) -> tuple[dict, dict]:
    """The sequence budgets of the largest step program the config's data settings let the trainer build.

    The query side takes the last (longest) bucket with its patch budget and the longest target region; the
    positive side is text (the first bucket, no pixels) with the longest target region too, although a data set
    generates on one side only. Every program of the run is at most this large: if it fits, they all fit.
    """
    (q_len, q_patches), (p_len, _) = data.buckets[-1], data.buckets[0]
    target = max(data.target_buckets or (data.target_len,))
    return ({"query_len": q_len, "target_len": target, "patches": q_patches},
            {"query_len": p_len, "target_len": target, "patches": 0})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:4x4", help="libtpu topology name, e.g. v5e:4x4, v5p:2x2x2, v6e:4x4, "
                   "v4:2x2x2 (v4 is compiled megacore, one device per chip)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: 1,<chips>,1, i.e. pure fsdp)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="GradCache chunk over the GLOBAL batch (StepConfig.chunk_size); rows per device per chunk "
                        "= chunk / (data * fsdp). Default: one row per device")
    p.add_argument("--config", default=str(RECIPE),
                   help="the training config whose step is compiled (default: the 2B recipe, configs/qwen2vl_2b.py)")
    p.add_argument("--global-batch", type=int, default=None, help="default: the config's data.global_batch_size")
    p.add_argument("--attention", choices=("splash", "dense"), default=None,
                   help="decoder attention path (default: the config's model.attention_impl)")
    p.add_argument("--query-len", type=int, default=None,
                   help="query-side [Q] columns (image side; default: the config's longest bucket)")
    p.add_argument("--target-len", type=int, default=None, help="query-side [T] columns")
    p.add_argument("--patches", type=int, default=None, help="query-side vision patch budget per sample")
    p.add_argument("--pos-query-len", type=int, default=None, help="positive-side [Q] columns (text side)")
    p.add_argument("--pos-target-len", type=int, default=None, help="positive-side [T] columns")
    p.add_argument("--pos-patches", type=int, default=None, help="positive-side vision patch budget per sample")
    p.add_argument("--tiny", action="store_true",
                   help="the config's :runlocal version (tiny model, same code paths) on forced CPU devices")
    p.add_argument("--out", type=Path, default=None, help="JSON file: a list of result records")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out (a record with the same configuration is replaced)")
    return p.parse_args(argv)


def _mesh_shape(text: str | None, chips: int) -> tuple[int, int, int]:
    if text is None:
        return 1, chips, 1
    shape = tuple(int(x) for x in text.split(","))
    if len(shape) != 3 or math.prod(shape) != chips:
        raise SystemExit(f"--mesh {text} must be data,fsdp,tensor with product {chips} (the chips of the slice)")
    return shape


# ============================================================================== devices

ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.tiny:
    # Forced host devices must be requested before jax is imported; 8 like the test suite.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The default backend stays CPU: TPU devices come from the compile-only topology, not from a local chip.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from btoks_jax import build, sharding, train, train_step  # noqa: E402
from btoks_jax.inputs import ModelInputs  # noqa: E402
from btoks_jax.mask import Layout  # noqa: E402


def topology_devices(name: str) -> tuple[str, list]:
    """(generation, compile-only devices, one per chip) of a libtpu topology name such as 'v5e:4x4'."""
    from jax.experimental import topologies

    generation = name.split(":")[0].strip().lower()
    if generation not in GENERATIONS:
        raise SystemExit(f"unknown TPU generation in {name!r}; choose one of {sorted(GENERATIONS)}")
    # v4 and v5p chips have two TensorCores; JAX runs them fused (megacore), one device per chip. libtpu's
    # default v4 description exposes the two cores as separate devices, so ask for megacore explicitly.
    kwargs = {"chip_config_name": "megacore"} if generation == "v4" else {}
    return generation, list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)


def accelerator_type(generation: str, chips: int) -> str:
    """The Cloud TPU accelerator type of a slice ('v5litepod-16'), the name launch/topologies.py keys on."""
    g = GENERATIONS[generation]
    return f"{g['accelerator']}-{chips * g['cores_per_chip']}"


# ============================================================================== abstract state and batch


def _with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the matching leaves of `shardings` (same leaf order)."""
    leaves, treedef = jax.tree.flatten(tree)
    shard_leaves = jax.tree.leaves(shardings)
    if len(leaves) != len(shard_leaves):
        raise ValueError(f"{len(leaves)} leaves but {len(shard_leaves)} shardings")
    return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                              for x, s in zip(leaves, shard_leaves)])


def _display_path(path: str) -> str:
    """A config path as a record stores it: relative to the repository when inside it."""
    file, colon, arg = path.partition(":")
    resolved = Path(file).resolve()
    return (str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else file) + colon + arg


def load_recipe(path: str, tiny: bool):
    """The training config (an ml_collections ConfigDict) as `btoks train --config PATH[:ARG]` reads it."""
    import importlib.util

    file, _, arg = path.partition(":")
    if tiny:
        arg = ",".join(filter(None, [arg, "runlocal"]))
    elif not arg and Path(file).resolve() == RECIPE:
        arg = "data_root=unused"  # the step does not read data; the recipe refuses to load without a root
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def abstract_state(model_cfg, num_btoks: int, lora, trainable: str, tx, mesh):
    """(graphdef, abstract TrainState, abstract frozen state), every leaf with the sharding the trainer uses."""
    graphdef, params, frozen = train_step.split_model(build.abstract(model_cfg, num_btoks, lora), trainable)
    replicated = sharding.replicated(mesh)
    params = _with_shardings(params, sharding.state_shardings(params, mesh))
    frozen = _with_shardings(frozen, sharding.state_shardings(frozen, mesh))
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    # Adam moments take their parameter's sharding; counters are replicated (as train_step.init_state leaves them).
    opt = optax.tree_map_params(
        tx, lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(tx.init, params),
        param_shardings, transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated))
    state = train_step.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params=params,
                          opt_state=opt, rng=jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated))
    return graphdef, state, frozen


def abstract_side(cfg, batch: int, num_btoks: int, query_len: int, target_len: int, patches: int
                  ) -> tuple[dict, Layout]:
    """One side of the packed `[Q | B | T]` batch as ShapeDtypeStructs (float32 pixels, as the pipeline gives)."""
    layout = Layout(query_len, num_btoks, target_len)
    length, i32 = layout.length, jnp.int32
    s = jax.ShapeDtypeStruct
    inputs = ModelInputs(
        input_ids=s((batch, length), i32), positions=s((3, batch, length), i32), segment_ids=s((batch, length), i32),
        vision_index=s((batch, length), i32), pixel_values=s((batch, patches, cfg.vision_config.patch_dim),
                                                               jnp.float32),
        patch_positions=s((batch, patches, 2), i32), patch_segment_ids=s((batch, patches), i32))
    side = {"inputs": inputs, "labels": s((batch, target_len), i32), "label_mask": s((batch, target_len), jnp.bool_)}
    return side, layout


# ============================================================================== compile and read back

_OOM = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> tuple[int, int] | None:
    """(used, capacity) from the TPU compiler's out-of-HBM error, or None."""
    m = _OOM.search(message)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_step(args, *, tiny: bool) -> dict:
    """Lowers and compiles one configuration; returns its result record (see benchmarks/README.md)."""
    config = load_recipe(args.config, tiny)
    if tiny:
        devices, generation = jax.devices(), None
    else:
        generation, devices = topology_devices(args.topology)
    q_budget, p_budget = largest_program(config.data)
    for key, value in (("query_len", args.query_len), ("target_len", args.target_len), ("patches", args.patches)):
        q_budget[key] = value if value is not None else q_budget[key]
    for key, value in (("query_len", args.pos_query_len), ("target_len", args.pos_target_len),
                       ("patches", args.pos_patches)):
        p_budget[key] = value if value is not None else p_budget[key]
    model_settings = config.model.to_dict()
    if args.attention:
        model_settings["attention_impl"] = args.attention
    model_cfg = build.model_config(model_settings)
    lora = train.lora_config(config)
    step_cfg = train.step_config(config)
    tx, schedule = train.optimizer(config)
    num_btoks = config.data.num_btoks

    global_batch = args.global_batch or config.data.global_batch_size
    if tiny and args.mesh:  # forced CPU devices: use as many as the mesh asks for
        devices = devices[:math.prod(int(x) for x in args.mesh.split(","))]
    chips = len(devices)
    data, fsdp, tensor = _mesh_shape(args.mesh, chips)
    mesh = sharding.make_mesh(data, fsdp, tensor, devices=devices)
    batch_shards = data * fsdp
    chunk = args.chunk_size or step_cfg.chunk_size or batch_shards
    if global_batch % chunk or chunk % batch_shards:
        raise SystemExit(f"chunk {chunk} must divide the global batch {global_batch} and be a multiple of "
                         f"data x fsdp = {batch_shards}")
    num_chunks = global_batch // chunk
    step_cfg = dataclasses.replace(step_cfg, chunk_size=0 if num_chunks == 1 else chunk)
    graphdef, state, frozen = abstract_state(model_cfg, num_btoks, lora, step_cfg.trainable, tx, mesh)
    q_side, q_layout = abstract_side(model_cfg, global_batch, num_btoks, **q_budget)
    p_side, p_layout = abstract_side(model_cfg, global_batch, num_btoks, **p_budget)
    batch = {"query": q_side, "positive": p_side}
    batch = _with_shardings(batch, sharding.batch_shardings(batch, mesh))
    # The trainer's own jit: explicit in/out shardings, the train state donated.
    jitted = train_step.compile_step(graphdef=graphdef, layouts=(q_layout, p_layout), cfg=step_cfg, tx=tx,
                             schedule=schedule, state=state, frozen=frozen, batch=batch, mesh=mesh)

    hbm = GENERATIONS[generation]["hbm"] if generation else 16 * GIB  # tiny: a nominal 16 GiB, smoke only
    record = {
        "topology": accelerator_type(generation, chips) if generation else "cpu",
        "topology_name": args.topology if generation else f"cpu:{chips}",
        "chips": chips,
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "global_batch": global_batch,
        "chunk_size": chunk,
        "per_device_chunk_rows": chunk // batch_shards,
        "num_chunks": num_chunks,
        "per_device_batch": global_batch // batch_shards,
        "accum": num_chunks,
        "query_len": q_budget["query_len"],
        "target_len": q_budget["target_len"],
        "patches": q_budget["patches"],
        "sequence_len": q_layout.length,
        "positive_query_len": p_budget["query_len"],
        "positive_target_len": p_budget["target_len"],
        "positive_patches": p_budget["patches"],
        "positive_sequence_len": p_layout.length,
        "config": _display_path(args.config) + (":runlocal" if tiny else ""),
        "num_btoks": num_btoks,
        "attention_impl": model_cfg.attention_impl,
        "remat": model_cfg.remat,
        "dtype": model_cfg.dtype,
        "param_dtype": model_cfg.param_dtype,
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                           "dora": lora.dora, "targets": list(lora.targets)},
        "lora_dropout": None if lora is None else lora.dropout,
        "trainable": step_cfg.trainable,
        "objective": step_cfg.objective,
        "ntp_reduction": step_cfg.ntp_reduction,
        "hbm_bytes": hbm,
    }
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), sharding.activation_sharding(mesh):  # set_mesh: splash runs per shard via shard_map
            lowered = jitted.lower(state, frozen, batch)
            record["lower_seconds"] = round(time.perf_counter() - t0, 1)
            # The traced program before partitioning and optimisation: the whole chunk's work, the model's own
            # flop count (custom calls such as the splash kernel are not counted).
            hlo_flops = float(_cost(lowered).get("flops", 0.0))
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - an out-of-HBM compile is a result, anything else is reported
        oom = _oom_bytes(str(e))
        record["compile_seconds"] = round(time.perf_counter() - t0, 1)
        if oom is None:
            record["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            return record
        # The compiler refuses programs that exceed the usable HBM; its message says by how much.
        record.update(bytes_per_chip=oom[0], usable_hbm_bytes=oom[1], fits=False,
                      error=f"out of HBM at compile time: {str(e)[:4000]}")
        return record
    record["compile_seconds"] = round(time.perf_counter() - t0, 1)

    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    # The executable's code sits in HBM too (hundreds of MB for this unrolled program), so it counts against the fit.
    fits = total + mem.generated_code_size_in_bytes <= hbm
    cost = _cost(compiled)
    # XLA's cost analysis counts a while-loop body once, whatever its trip count. The step's work sits in two
    # scans of num_chunks iterations each (GradCache's embedding pass and its gradient pass); what lies outside
    # them (InfoNCE over the batch, the optimizer update on ~20M LoRA parameters) is negligible, so the step is
    # about num_chunks times the reported numbers.
    flops_raw = float(cost.get("flops", 0.0))
    # XLA's time estimate comes out negative when the program holds custom calls it cannot cost (the Pallas
    # splash kernel): no estimate then.
    seconds_raw = float(cost.get("optimal_seconds", 0.0))
    seconds_raw = seconds_raw if seconds_raw > 0 else None
    peak = GENERATIONS[generation]["peak_flops"] if generation else None
    flops = flops_raw * num_chunks
    if seconds_raw is not None:
        estimate, source = seconds_raw * num_chunks, "xla_optimal_seconds"
    else:
        estimate, source = (flops / peak, "xla_flops_at_peak") if peak else (None, None)
    record.update(
        argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
        generated_code_bytes=mem.generated_code_size_in_bytes, bytes_per_chip=total, fits=fits,
        flops_xla_raw=flops_raw, optimal_seconds_xla_raw=seconds_raw, flops=flops,
        flops_global=flops * chips, hlo_flops_global=hlo_flops * num_chunks,
        estimated_seconds=estimate, estimated_seconds_source=source,
        peak_flops_seconds=flops / peak if peak else None,
        hlo_peak_flops_seconds=hlo_flops * num_chunks / chips / peak if peak else None,
    )
    return record


# ============================================================================== report


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def print_table(records: list[dict]) -> None:
    print("\nCOMPILED ESTIMATES (ahead-of-time TPU compile, abstract inputs; nothing was run or measured)")
    head = (f"{'topology':<16}{'mesh d,f,t':<12}{'rows/dev/chunk':>15}{'chunks':>8}{'attn':>8}{'args GiB':>10}"
            f"{'out GiB':>9}{'temp GiB':>10}{'total GiB':>11}{'HBM GiB':>9}{'fits':>6}{'TFLOP/chip':>12}"
            f"{'XLA est s':>11}{'at peak s':>11}")
    print(head)
    print("-" * len(head))
    for r in records:
        mesh = f"{r['mesh']['data']},{r['mesh']['fsdp']},{r['mesh']['tensor']}"
        name = f"{r['topology_name']}"
        if "fits" not in r:
            print(f"{name:<16}{mesh:<12}{r['per_device_chunk_rows']:>15}{r['num_chunks']:>8}{r['attention_impl']:>8}"
                  f"  FAILED: {r.get('error', '')[:200]}")
            continue
        flops = f"{r['flops'] / 1e12:.1f}" if r.get("flops") else "-"
        est = f"{r['estimated_seconds']:.2f}" if r.get("estimated_seconds") else "-"
        peak = f"{r['peak_flops_seconds']:.2f}" if r.get("peak_flops_seconds") else "-"
        print(f"{name:<16}{mesh:<12}{r['per_device_chunk_rows']:>15}{r['num_chunks']:>8}{r['attention_impl']:>8}"
              f"{_gib(r.get('argument_bytes')):>10}{_gib(r.get('output_bytes')):>9}{_gib(r.get('temp_bytes')):>10}"
              f"{_gib(r['bytes_per_chip']):>11}{_gib(r['hbm_bytes']):>9}{'yes' if r['fits'] else 'NO':>6}"
              f"{flops:>12}{est:>11}{peak:>11}")
        if not r["fits"] and r.get("error"):
            print(f"    (compile refused: {r['error'][:300]})")
    print("total = arguments + outputs + temporaries - donated aliases; TFLOP/chip and times are XLA's per-loop-body "
          "numbers x GradCache chunks.")


_KEY_FIELDS = ("topology_name", "mesh", "chunk_size", "global_batch", "attention_impl", "query_len", "target_len",
               "patches", "positive_query_len", "positive_target_len", "positive_patches", "remat", "lora",
              "config")


def write_results(path: Path, records: list[dict], append: bool) -> None:
    """A JSON list of records; only configurations with a byte count go in (launch/topologies.py needs one)."""
    keep = [r for r in records if "bytes_per_chip" in r]
    old = json.loads(path.read_text()) if append and path.exists() else []
    key = lambda r: json.dumps([r.get(k) for k in _KEY_FIELDS], sort_keys=True)  # noqa: E731
    new_keys = {key(r) for r in keep}
    merged = [r for r in old if key(r) not in new_keys] + keep
    path.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {len(keep)} record(s) to {path} ({len(merged)} in all)")


def main(args: argparse.Namespace) -> int:
    record = compile_step(args, tiny=args.tiny)
    print_table([record])
    if args.out is not None:
        write_results(args.out, [record], args.append)
    if "bytes_per_chip" not in record:
        print(record.get("error", ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))

