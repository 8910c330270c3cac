"""How many step programs a recipe run compiles, and what the persistent compilation cache saves.

The trainer jits one step program per (query layout, positive layout, patch budgets, objective) it meets
(`btoks_jax/train.py`): each side of a global batch takes the first length bucket that holds its longest input and
most patches (`data.pipeline.choose_bucket`, the recipe's five buckets 128..1536), the first target region that
holds its longest target (`choose_target_bucket`, 64..512), and the lambda schedule turns the joint objective
contrastive after step 2000 (`train_step.config_at`). This script replays that choice over a run of the 2B recipe's
mixture: which data sets fill each step comes from the pipeline's own `MixtureSchedule` (the recipe's 25 data sets,
weights, seed, 1024 rows as 2 x 512), what a data set's 512 rows need at most is MODELED (`DATASETS` below: image
sizes after the recipe's max_pixels, text lengths; no data is read). It counts the distinct programs and when they
first appear, then compiles them (the recipe's step at `configs/qwen2vl_2b.py:runlocal` size: the tiny model with
every code path of the recipe, a 16-row batch in GradCache chunks of 8, at the recipe's bucket shapes) three times,
each in a fresh process: without the persistent cache, with an empty cache (compile and write), with that cache
filled (read). Lowering (tracing) is timed apart from compiling; the cache only saves the compile.

    python benchmarks/compile_count.py [--steps 5000 --max-programs 12] [--out r.json]
    python benchmarks/compile_count.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# What each data set's 512-row sub-batch needs at most, per side: (text tokens, vision kind or None), and the
# longest text it contributes as a generation target (wrapper tokens included) on the other side. Modeled from the
# MMEB-train / ViDoRe / VisRAG / LLaVA-Hound sets as the recipe resizes them, not measured on the data.
VISION = {  # merged tokens of the largest item of a sub-batch (x 4 = patches)
    "large": 1280,  # news photos, document pages, web images: at max_pixels = 28*28*1280
    "chart": 600,  # ChartQA: about 800 x 600
    "coco": 391,  # COCO-sized photos, 640 x 480 (OK-VQA, A-OKVQA, Visual7W, VisDial, MSCOCO, VOC, SUN)
    "small": 324,  # NIGHTS, CIRR: about 500 x 500
    "crop": 100,  # MSCOCO grounding crops
    "video": 1196,  # LLaVA-Hound: 8 frames of about 640 x 360, 4 temporal patches x 299
}
DATASETS = {
    # name: (query side, positive side, target from the positive's text, target from the query's text)
    "ImageNet_1K": ((20, "large"), (10, None), 16, 24),
    "N24News": ((80, "large"), (10, None), 16, 84),
    "HatefulMemes": ((60, "coco"), (4, None), 8, 64),
    "VOC2007": ((20, "coco"), (6, None), 10, 24),
    "SUN397": ((20, "coco"), (10, None), 14, 24),
    "OK-VQA": ((40, "coco"), (12, None), 16, 44),
    "A-OKVQA": ((40, "coco"), (12, None), 16, 44),
    "DocVQA": ((40, "large"), (30, None), 34, 44),
    "InfographicsVQA": ((50, "large"), (30, None), 34, 54),
    "ChartQA": ((40, "chart"), (12, None), 16, 44),
    "Visual7W": ((40, "coco"), (20, None), 24, 44),
    "VisDial": ((320, None), (10, "coco"), 14, 324),
    "CIRR": ((40, "small"), (10, "small"), 14, 44),
    "VisualNews_t2i": ((120, None), (10, "large"), 14, 124),
    "VisualNews_i2t": ((20, "large"), (120, None), 124, 24),
    "MSCOCO_t2i": ((50, None), (10, "coco"), 14, 54),
    "MSCOCO_i2t": ((20, "coco"), (50, None), 54, 24),
    "NIGHTS": ((10, "small"), (10, "small"), 14, 14),
    "WebQA": ((60, None), (100, "large"), 104, 64),
    "MSCOCO": ((30, "coco"), (10, "crop"), 14, 34),
    "colpali_train_set": ((60, "large"), (100, None), 104, 64),
    "visrag-indomain": ((60, None), (10, "large"), 14, 64),
    "video_caption_300k": ((20, "video"), (200, None), 204, 24),
    "video_caption_300k-video": ((200, None), (10, "video"), 14, 204),
    "video_qa_240k": ((40, "video"), (100, None), 104, 44),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="steps of the replayed run (the recipe: 5000)")
    p.add_argument("--max-programs", type=int, default=3,
                   help="programs compiled in each pass (in order of first appearance); 0: all")
    p.add_argument("--attention", choices=("dense", "splash"), default="dense",
                   help="decoder attention of the compiled step (splash off TPU compiles the Pallas interpreter)")
    p.add_argument("--step", choices=("recipe", "light"), default="recipe",
                   help="recipe: the runlocal step as the recipe builds it (DoRA, dropout, remat, bf16, GradCache); "
                        "light: the same tiny model with one layer, float32, plain LoRA, no remat, no GradCache")
    p.add_argument("--passes", default="no_cache,cold_cache,warm_cache",
                   help="compile passes, each in a fresh process: no_cache (cache off), cold_cache (an empty cache "
                        "folder: compile and write), warm_cache (the folder the cold pass filled: read)")
    p.add_argument("--tiny", action="store_true",
                   help="100 steps, small buckets, the smallest program of the light step, cold and warm cache only: "
                        "a quick check of the machinery")
    p.add_argument("--out", default=None, help="JSON record")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: programs JSON to compile
    p.add_argument("--cache", default="none", help=argparse.SUPPRESS)  # internal: cache folder or "none"
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.max_programs, args.step, args.passes = 100, 1, "light", "cold_cache,warm_cache"
    args.passes = str(args.passes).split(",")
    if "warm_cache" in args.passes and "cold_cache" not in args.passes:
        p.error("--passes: warm_cache needs cold_cache to fill the cache first")
    return args


def load_recipe(tiny_buckets: bool):
    """configs/qwen2vl_2b.py (the data settings of the 2B run) and its runlocal version (the compiled step)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qwen2vl_2b", REPO / "configs" / "qwen2vl_2b.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    full = recipe.get_config("data_root=unused")
    local = recipe.get_config("runlocal")
    if tiny_buckets:  # small buckets (and `TINY_SCALE`), so every program is small
        full.data.buckets, full.data.target_buckets, full.data.target_len = ((32, 64), (128, 512)), (16, 64), 64
    return full, local


TINY_SCALE = (10, 20)  # --tiny: text and vision tokens divided by these


def side_need(side, datasets_in_batch, scale=(1, 1)) -> tuple[int, int, int]:
    """(longest input, most patches, longest target) of one side over the data sets of a batch; `scale` divides
    the text and vision token counts."""
    tokens = patches = target = 0
    for name, ntp_side in datasets_in_batch:
        query, positive, from_positive, from_query = DATASETS[name]
        text, vision = query if side == "query" else positive
        text, from_positive, from_query = (-(-x // scale[0]) for x in (text, from_positive, from_query))
        n = -(-VISION[vision] // scale[1]) if vision else 0
        tokens = max(tokens, text + (n + 2 if vision else 0))
        patches = max(patches, 4 * n)
        # The query side's target is the positive's text (ntp_side positive / both), and the other way round.
        generates = ntp_side in (("positive", "both") if side == "query" else ("query", "both"))
        if generates:
            target = max(target, from_positive if side == "query" else from_query)
    return tokens, patches, target


def replay(config, steps: int, scale=(1, 1)) -> tuple[list[dict], list[int], dict]:
    """The distinct step programs of `steps` steps in order of first appearance, the step each first appears at,
    and how many steps each data-set pairing ran."""
    from btoks_jax.data.pipeline import MixtureSchedule, choose_bucket, choose_target_bucket
    from btoks_jax.train import step_config
    from btoks_jax.train_step import config_at

    data = config.data
    specs = [(d["name"], d["ntp_side"], d["weight"]) for d in data.to_dict()["datasets"]]
    schedule = MixtureSchedule([1] * len(specs), [w for _, _, w in specs], data.global_batch_size,
                               data.subbatch_size, data.seed)
    per_step = data.global_batch_size // data.subbatch_size
    step_cfg = step_config(config)
    programs, first_step, seen = [], [], {}
    for step in range(steps):
        in_batch = {schedule.subbatch(step * per_step + j)[0] for j in range(per_step)}
        batch = [(specs[i][0], specs[i][1]) for i in sorted(in_batch)]
        key = {"objective": config_at(step_cfg, step).objective}
        for side in ("query", "positive"):
            tokens, patches, target = side_need(side, batch, scale)
            query_len, budget = choose_bucket(data.buckets, tokens, patches)
            key[side] = {"query_len": query_len, "patches": budget,
                         "target_len": choose_target_bucket(data.target_buckets, target) if data.target_len else 0}
        name = json.dumps(key, sort_keys=True)
        if name not in seen:
            seen[name] = 0
            programs.append(key)
            first_step.append(step)
        seen[name] += 1
    return programs, first_step, seen


# ============================================================================== compiling (in a fresh process)


def light(local) -> None:
    """The runlocal config cut to a cheaper step that still has both objectives: one decoder layer and vision
    block, float32, plain LoRA (no DoRA, no dropout), no remat, the whole batch in one pass."""
    local.model.overrides = {"text": {"num_hidden_layers": 1}, "vision": {"depth": 1}}
    local.model.dtype, local.model.remat = "float32", False
    local.lora.dora, local.lora.dropout = False, 0.0
    local.step.chunk_size = 0


def compile_programs(programs: list[dict], cache: str, attention: str, step: str) -> list[dict]:
    """Lowers and compiles each program of the recipe's runlocal step (or `light`'s); seconds per program."""
    import dataclasses

    import jax

    if cache != "none":
        jax.config.update("jax_compilation_cache_dir", cache)
        # Cache every program (the trainer keeps those over 1 s; these small ones can take less).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_compile_2b", HERE / "aot_compile_2b.py")
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    from btoks_jax import build, sharding, train, train_step

    _, local = load_recipe(False)
    if step == "light":
        light(local)
    model_settings = local.model.to_dict()
    model_settings["attention_impl"] = attention
    model_cfg = build.model_config(model_settings)
    lora, step_cfg = train.lora_config(local), train.step_config(local)
    tx, schedule = train.optimizer(local)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    graphdef, state, frozen = aot.abstract_state(model_cfg, local.data.num_btoks, lora, step_cfg.trainable, tx, mesh)
    rows = local.data.global_batch_size
    out = []
    for program in programs:
        q_side, q_layout = aot.abstract_side(model_cfg, rows, local.data.num_btoks, **program["query"])
        p_side, p_layout = aot.abstract_side(model_cfg, rows, local.data.num_btoks, **program["positive"])
        batch = {"query": q_side, "positive": p_side}
        batch = aot._with_shardings(batch, sharding.batch_shardings(batch, mesh))
        cfg = dataclasses.replace(step_cfg, objective=program["objective"])
        jitted = train_step.compile_step(graphdef=graphdef, layouts=(q_layout, p_layout), cfg=cfg, tx=tx,
                                         schedule=schedule, state=state, frozen=frozen, batch=batch, mesh=mesh)
        with jax.set_mesh(mesh), sharding.activation_sharding(mesh):
            t0 = time.perf_counter()
            lowered = jitted.lower(state, frozen, batch)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
        out.append({"lower_s": t1 - t0, "compile_s": t2 - t1})
    return out


def run_pass(programs: list[dict], cache: str, attention: str, step: str) -> dict:
    """One compile pass in a fresh Python process (nothing cached in memory)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(programs, f)
        path = f.name
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", path, "--cache", cache,
                               "--attention", attention, "--step", step], capture_output=True, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=str(REPO))
        wall = time.perf_counter() - t0
    finally:
        os.unlink(path)
    if proc.returncode:
        raise RuntimeError(f"compile pass failed:\n{proc.stderr[-4000:]}")
    per = json.loads(proc.stdout.strip().splitlines()[-1])
    files = sum(1 for _ in Path(cache).iterdir()) if cache != "none" else 0
    return {"programs": per, "lower_s": sum(p["lower_s"] for p in per),
            "compile_s": sum(p["compile_s"] for p in per), "process_wall_s": wall, "cache_files": files}


def main(args: argparse.Namespace) -> int:
    if args.worker:
        programs = json.loads(Path(args.worker).read_text())
        print(json.dumps(compile_programs(programs, args.cache, args.attention, args.step)))
        return 0
    import timing

    from btoks_jax.data.pipeline import side_shapes
    from btoks_jax.train import pipeline_config

    load_at_start = list(os.getloadavg())
    full, _ = load_recipe(args.tiny)
    programs, first_step, counts = replay(full, args.steps, TINY_SCALE if args.tiny else (1, 1))
    most = side_shapes(pipeline_config(full)) ** 2 * 2
    print(f"replayed {args.steps} steps of the 2B recipe's mixture ({len(DATASETS)} data sets, batches of "
          f"{full.data.global_batch_size} as {full.data.global_batch_size // full.data.subbatch_size} x "
          f"{full.data.subbatch_size}; side needs modeled): {len(programs)} distinct step programs "
          f"(the buckets allow at most {most})")
    for frac in (0.01, 0.1, 0.4, 1.0):
        upto = max(1, int(args.steps * frac))
        print(f"  programs met by step {upto:>5}: {sum(s < upto for s in first_step)}")
    shapes = sorted({(p["query"]["query_len"], p["query"]["patches"], p["query"]["target_len"]) for p in programs})
    print(f"  query-side shapes (query_len, patches, target): {shapes}")

    n = len(programs) if not args.max_programs else min(args.max_programs, len(programs))
    todo = programs[:n]
    if args.tiny:  # the cheapest program to compile: fewest patches and columns, no vocabulary projection
        size = lambda p: (sum(p[s]["patches"] for s in ("query", "positive")),  # noqa: E731
                          sum(p[s]["query_len"] + p[s]["target_len"] for s in ("query", "positive")),
                          p["objective"] != "contrastive")
        todo = sorted(programs, key=size)[:n]
    print(f"compiling {'the smallest' if args.tiny else 'the first'} {n} programs (configs/qwen2vl_2b.py:runlocal, "
          f"{args.step} step, {args.attention} attention), each pass in a fresh process ...")
    passes = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, where in (("no_cache", "none"), ("cold_cache", cache), ("warm_cache", cache)):
            if name not in args.passes:
                continue
            passes[name] = run_pass(todo, where, args.attention, args.step)
            r = passes[name]
            print(f"  {name:<11} compile {r['compile_s']:8.2f} s   lowering {r['lower_s']:7.2f} s   process "
                  f"{r['process_wall_s']:7.2f} s   cache entries {r['cache_files']}")
    base = passes.get("no_cache", passes.get("cold_cache"))["compile_s"]
    reference = "no_cache" if "no_cache" in passes else "cold_cache"
    ratios = {f"{k}_over_{reference}": v["compile_s"] / base for k, v in passes.items() if k != reference}
    per_program = base / n
    print("compile time ratios: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    if n < len(programs):
        print(f"all {len(programs)} programs at {per_program:.1f} s each (the compiled ones' mean): about "
              f"{per_program * len(programs):.0f} s of compiling at this model size (an extrapolation)")
    record = {"benchmark": "compile_count", "machine": timing.machine(), "load_average_at_start": load_at_start,
              "argv": sys.argv[1:], "tiny": args.tiny, "steps": args.steps, "attention": args.attention,
              "step": args.step,
              "buckets": [list(b) for b in full.data.buckets], "target_buckets": list(full.data.target_buckets),
              "distinct_programs": len(programs), "most_programs": most, "first_step": first_step,
              "programs": [dict(p, steps=counts[json.dumps(p, sort_keys=True)]) for p in programs],
              "compiled_programs": n, "passes": passes, "ratios": ratios,
              "extrapolated_compile_s_all": per_program * len(programs)}
    timing.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
