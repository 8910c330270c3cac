"""`btoks main`: the demonstration on the embedded emoji data, end to end on CPU, in the paper's regime.

The paper adapts a pretrained *generative* MLLM. At CPU scale the job first makes its tiny Qwen2-VL generative
and then trains every embedding arm from that same model, with the same steps, batch, data order and seed.

Stages (each re-runs alone with `--only STAGE`; finished work is skipped, training resumes):
  data      build the emoji data set (Twemoji artwork, Unicode names) into WORKDIR/data
  pretrain  the shared first stage: plain next-token training (whole input visible, no BToks) of each training
            image captioned with its name or subgroup (`configs/tiny_cpu.py:pretrain`), exported to Hugging Face
            format in WORKDIR/hf_pretrain: the "pretrained MLLM" every arm starts from
  train     the arms (`ARMS`), each from WORKDIR/hf_pretrain, into WORKDIR/<arm>_seed<S>
  eval      `btoks eval` on the held-out concepts (test split) for every arm and seed
  export    the method's model to Hugging Face format; its embeddings recomputed in PyTorch must match
  decode    text generated greedily from the BToks alone (condensation mask) of held-out images (and a few of
            training concepts), beside their true names: what the K tokens carry
  report    the table (WORKDIR/report.md, .json), the plot (WORKDIR/report.png) and the decoded examples;
            with --ablation WORKDIR/ablation.md, .json, .png

`make main` runs the two arms the method is about (last-token + InfoNCE, the VLM2Vec recipe, against BToks +
InfoNCE + GIC) with one seed, which fits in about 20 minutes on 2 cores; `--ablation` runs the paper's four arms
(PAPER.md section 9) with two seeds. Nothing here was tuned on the test split: every setting is the one
`configs/tiny_cpu.py` had before the pretraining stage existed, or the authors' (lambda 5 for the first 40% of
the steps, temperature 0.02, K = 4).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

log = logging.getLogger("btoks.main")

STAGES = ("data", "pretrain", "train", "eval", "export", "decode", "report")
# arm -> (label, configs/tiny_cpu.py arguments). lambda = 5 for the first 40% of the steps where GIC is on.
ARMS = {
    "last": ("last-token + InfoNCE", "objective=contrastive,pooling=last"),
    "btoks_nce": ("BToks + InfoNCE (no GIC)", "objective=contrastive,pooling=btoks"),
    "full": ("BToks + InfoNCE + GIC without the mask", "objective=joint,pooling=btoks,mask=full"),
    "method": ("BToks + InfoNCE + GIC (condensation mask)", "objective=joint,pooling=btoks"),
}
MAIN_ARMS = ("last", "method")
ABLATION_SEEDS = (0, 1)
# The paper's ablation (PAPER.md section 9): MMEB-V2 overall points lost against the full method.
PAPER_DELTAS = {"last": -2.9, "full": -1.1, "btoks_nce": -1.4}
DEFAULT_STEPS = 400
DEFAULT_PRETRAIN_STEPS = 200
CHANCE = {"emoji_i2t": 1 / 51, "emoji_t2i": 1 / 51, "emoji_cls": 1 / 99}
NUM_DECODED = 8  # held-out images decoded in the report
NUM_DECODED_TRAIN = 4  # and images of training concepts, for contrast


def _config(arguments: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the main job needs the repository's configs/ folder")
    spec = importlib.util.spec_from_file_location("tiny_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arguments)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}_seed{seed}"


def _train(config, workdir: str) -> float:
    """Trains `config` into `workdir` unless its DONE marker exists; returns the training seconds."""
    from btoks_jax.train import train

    marker = os.path.join(workdir, "DONE")
    if not os.path.exists(marker):
        t0 = time.perf_counter()
        train(config, workdir)
        with open(marker, "w") as f:
            json.dump({"seconds": time.perf_counter() - t0, "steps": config.total_steps}, f)
    with open(marker) as f:
        return json.load(f)["seconds"]


def stage_data(workdir: str, max_concepts: int | None = None) -> str:
    from btoks_jax.data.emoji_dataset import build_emoji_dataset

    return str(build_emoji_dataset(os.path.join(workdir, "data"), max_concepts=max_concepts).root)


def stage_pretrain(workdir: str, steps: int, extra: str = "") -> str:
    """Trains the generative first stage and exports it; returns the Hugging Face directory the arms start from."""
    from btoks_jax.convert.checkpoint_export import export_from_checkpoint

    data = os.path.join(workdir, "data")
    _train(_config(f"pretrain,steps={steps},data_dir={data}{extra}"), os.path.join(workdir, "pretrain"))
    hf_dir = os.path.join(workdir, "hf_pretrain")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        export_from_checkpoint(os.path.join(workdir, "pretrain"), hf_dir, overwrite=True)
    return hf_dir


def arm_config(workdir: str, arm: str, seed: int, steps: int, extra: str = ""):
    """The config of one arm: `ARMS[arm]` from the shared pretrained model, with the step-0 weights saved."""
    data = os.path.join(workdir, "data")
    return _config(f"{ARMS[arm][1]},steps={steps},seed={seed},data_dir={data},"
                   f"hf_dir={os.path.join(workdir, 'hf_pretrain')},save_initial{extra}")


def stage_train(workdir: str, arm: str, seed: int, steps: int, extra: str = "") -> float:
    return _train(arm_config(workdir, arm, seed, steps, extra), os.path.join(workdir, run_name(arm, seed)))


def stage_eval(workdir: str, runs: list[tuple[str, int]]) -> dict:
    import btoks_jax
    from btoks_jax.evaluate.run import evaluate_folder

    out = {}
    for arm, seed in runs:
        name = run_name(arm, seed)
        path = os.path.join(workdir, f"eval_{name}", "summary.json")
        if not os.path.exists(path):
            pooling = "last" if arm == "last" else "btoks"
            model = btoks_jax.from_pretrained(os.path.join(workdir, name))
            fn = lambda items, m=model, p=pooling: m.embed_items(items, pooling=p, batch_size=64,  # noqa: E731
                                                                 progress=False)
            evaluate_folder(fn, os.path.join(workdir, "data"), out_dir=os.path.dirname(path), batch_size=64)
        with open(path) as f:
            out[name] = json.load(f)
    return out


def stage_export(workdir: str, n_check: int = 12) -> dict:
    """Exports the method's run and recomputes embeddings with plain transformers, following the model card."""
    import btoks_jax
    from btoks_jax.convert.checkpoint_export import export_from_checkpoint
    from btoks_jax.evaluate.mmeb import read_eval_rows

    run = os.path.join(workdir, run_name("method", 0))
    hf_dir = os.path.join(workdir, "hf_method")
    result_path = os.path.join(workdir, "export_check.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    export_from_checkpoint(run, hf_dir, overwrite=True)
    rows = read_eval_rows(os.path.join(workdir, "data", "emoji_i2t_test.jsonl"), os.path.join(workdir, "data"))
    items = [r.query for r in rows[: n_check // 2]] + [r.candidates[0] for r in rows[: n_check // 2]]
    jax_model = btoks_jax.from_pretrained(run)
    ours = jax_model.embed_items(items, pooling="btoks", progress=False)
    theirs = torch_embeddings(hf_dir, items, jax_model.prompt_style)
    result = {"items": len(items), "max_abs_diff": float(np.abs(ours - theirs).max()), "hf_dir": hf_dir}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    if result["max_abs_diff"] > 1e-4:
        raise AssertionError(f"exported model embeds differently in PyTorch: max |diff| {result['max_abs_diff']}")
    return result


def stage_decode(workdir: str, runs: list[tuple[str, int]], name: str = "report", n: int = NUM_DECODED,
                 n_train: int = NUM_DECODED_TRAIN) -> dict:
    """Greedy text from the BToks of `n` held-out i2t query images (and, for contrast, `n_train` images of training
    concepts), for every GIC arm, and from the pretrained model captioning with the whole image visible, beside
    the images' true names. Kept in WORKDIR/<name>_decoded.json."""
    import dataclasses

    import btoks_jax
    from btoks_jax.evaluate.mmeb import read_eval_rows

    path = os.path.join(workdir, f"{name}_decoded.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    data = os.path.join(workdir, "data")
    rows = read_eval_rows(os.path.join(data, "emoji_i2t_test.jsonl"), data)
    pick = np.linspace(0, len(rows) - 1, n).round().astype(int)
    queries = [rows[i].query for i in pick]
    names = [rows[i].candidates[0].text for i in pick]
    with open(os.path.join(data, "emoji_i2t_train.jsonl")) as f:
        train = [json.loads(line) for line in f]
    for i in np.linspace(0, len(train) - 1, n_train).round().astype(int):  # same instruction, a training image
        queries.append(dataclasses.replace(queries[0], image=os.path.join(data, train[i]["qry_image_path"])))
        names.append(train[i]["pos_text"])
    result = {"images": [os.path.relpath(q.image, workdir) for q in queries], "names": names,
              "split": ["test"] * n + ["train"] * n_train, "decoded": {}}
    pretrained = btoks_jax.from_pretrained(os.path.join(workdir, "pretrain"))
    result["decoded"]["pretrain (whole image visible)"] = pretrained.generate_from_btoks(queries, mask_mode="full")
    for arm, seed in runs:
        if ARMS[arm][1].startswith("objective=joint"):
            model = btoks_jax.from_pretrained(os.path.join(workdir, run_name(arm, seed)))
            result["decoded"][f"{run_name(arm, seed)} (BToks only)"] = model.generate_from_btoks(queries)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def torch_embeddings(hf_dir: str, items, prompt_style: str) -> np.ndarray:
    """BToks embeddings with plain transformers + torch, as the exported model card describes."""
    import torch
    import transformers
    from PIL import Image

    from btoks_jax.api import item_prompt

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(hf_dir)
    btok_ids = tok.convert_tokens_to_ids([t for t in tok.additional_special_tokens if t.startswith("<|btok_")]
                                         if getattr(tok, "additional_special_tokens", None) else [])
    if not btok_ids:
        btok_ids = [tok.convert_tokens_to_ids(f"<|btok_{i}|>") for i in range(4)]
    out = []
    for item in items:
        text = item_prompt(item, prompt_style)
        kwargs = {}
        if item.image:
            vis = image_processor(images=[Image.open(item.image)], return_tensors="pt")
            n = int(vis["image_grid_thw"].prod()) // 4
            text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
            kwargs = {"pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}
        ids = tok(text, add_special_tokens=False)["input_ids"] + list(btok_ids)
        input_ids = torch.tensor([ids])
        types = torch.zeros_like(input_ids)
        types[input_ids == model.config.image_token_id] = 1
        with torch.no_grad():
            hidden = model.model(input_ids=input_ids, mm_token_type_ids=types, **kwargs).last_hidden_state[0]
        vec = hidden[-len(btok_ids):].mean(0)
        out.append(torch.nn.functional.normalize(vec, dim=-1).numpy())
    return np.stack(out)


def _history(run_dir: str):
    train_rows, eval_rows = [], []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                (eval_rows if "eval" in row else train_rows).append(row)
    return train_rows, eval_rows


def _cell(text: str) -> str:
    """Generated text as one markdown table cell: line breaks shown as `⏎`, pipes escaped."""
    return text.replace("\n", "⏎").replace("|", "\\|") if text else "(nothing)"


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def stage_report(workdir: str, arms: list[str], seeds: list[int], scores: dict, export: dict, decoded: dict,
                 command: str, name: str = "report") -> str:
    """Writes WORKDIR/<name>.md, .json and .png; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(CHANCE)
    spread = " (mean ± std over seeds)" if len(seeds) > 1 else ""
    lines = ["| arm | " + " | ".join(f"{t} hit@1" for t in tasks) + " | mean | vs method | paper's vs method "
             "| final InfoNCE | train time |", "|---|" + "---|" * (len(tasks) + 6)]
    table = {}
    for arm in arms:
        per_seed = []
        for seed in seeds:
            run = run_name(arm, seed)
            ds = scores[run]["datasets"]
            hits = [100 * ds[t]["hit@1"] for t in tasks]
            train_rows, _ = _history(os.path.join(workdir, run))
            with open(os.path.join(workdir, run, "DONE")) as f:
                seconds = json.load(f)["seconds"]
            per_seed.append({"seed": seed, "hit@1": dict(zip(tasks, hits)), "mean": float(np.mean(hits)),
                             "final_info_nce": train_rows[-1]["info_nce"] if train_rows else float("nan"),
                             "train_seconds": seconds})
        table[arm] = per_seed
    method_mean = np.mean([r["mean"] for r in table["method"]]) if "method" in table else None
    for arm in arms:
        rows = table[arm]
        mean = float(np.mean([r["mean"] for r in rows]))
        delta = "" if method_mean is None or arm == "method" else f"{mean - method_mean:+.1f}"
        paper = "" if arm not in PAPER_DELTAS else f"{PAPER_DELTAS[arm]:+.1f}"
        lines.append(f"| {ARMS[arm][0]} | " + " | ".join(_spread([r['hit@1'][t] for r in rows]) for t in tasks)
                     + f" | {_spread([r['mean'] for r in rows])} | {delta} | {paper} | "
                     + f"{np.mean([r['final_info_nce'] for r in rows]):.3f} | "
                     + f"{np.mean([r['train_seconds'] for r in rows]) / 60:.1f} min |")
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[t]:.1f}" for t in tasks)
                 + f" | {100 * np.mean(list(CHANCE.values())):.1f} | | | | |")
    with open(os.path.join(workdir, "pretrain", "DONE")) as f:
        pretrain_seconds = json.load(f)["seconds"]
    pre_rows, _ = _history(os.path.join(workdir, "pretrain"))
    text = [f"Held-out emoji concepts (test split), hit@1 in %{spread}; seeds {', '.join(map(str, seeds))}. "
            f"Every arm starts from the same pretrained generative model (next-token loss "
            f"{pre_rows[0]['ntp']:.2f} -> {pre_rows[-1]['ntp']:.2f} over {pre_rows[-1]['step']} steps, "
            f"{pretrain_seconds / 60:.1f} min).", "", *lines, "",
            f"Exported method model re-embedded in PyTorch: max |diff| = {export['max_abs_diff']:.2e} over "
            f"{export['items']} items.", "", "What the bottleneck kept: greedy text from held-out images "
            "(the BTok runs see only the K BToks' states; ⏎ is a generated line break):", "",
            "| concept | true name | " + " | ".join(decoded["decoded"]) + " |",
            "|---|---|" + "---|" * len(decoded["decoded"])]
    for i, true_name in enumerate(decoded["names"]):
        cells = [_cell(v[i]) for v in decoded["decoded"].values()]
        split = decoded.get("split", ["test"] * len(decoded["names"]))[i]
        text.append(f"| {'held out' if split == 'test' else 'trained on'} | {true_name} | " + " | ".join(cells) + " |")
    report = "\n".join(text)
    with open(os.path.join(workdir, f"{name}.md"), "w") as f:
        f.write(f"# btoks main: {command}\n\n{report}\n")
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        json.dump({"command": command, "arms": {a: ARMS[a][0] for a in arms}, "seeds": seeds, "table": table,
                   "pretrain_seconds": pretrain_seconds, "export_check": export, "decoded": decoded}, f, indent=1)

    fig, axes = plt.subplots(1, 3, figsize=(19, 4.8))
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange", "tab:green")))
    axes[1].plot([r["step"] for r in pre_rows], [r["ntp"] for r in pre_rows], color="black",
                 label="pretraining (captioning)")
    for arm in arms:
        for seed in seeds:
            train_rows, _ = _history(os.path.join(workdir, run_name(arm, seed)))
            style = "-" if seed == seeds[0] else ":"
            label = ARMS[arm][0] if seed == seeds[0] else None
            axes[0].plot([r["step"] for r in train_rows], [r["info_nce"] for r in train_rows], style,
                         color=colors[arm], label=label)
            gic = [r for r in train_rows if r.get("ntp_weight", 0) > 0]
            if gic:
                axes[1].plot([r["step"] + pre_rows[-1]["step"] for r in gic], [r["ntp"] for r in gic], style,
                             color=colors[arm], label=label)
    x = np.arange(len(arms))
    for i, arm in enumerate(arms):
        means = [r["mean"] for r in table[arm]]
        axes[2].bar(i, np.mean(means), color=colors[arm], alpha=0.6)
        axes[2].scatter([i] * len(means), means, color="black", zorder=3, s=12)
    axes[2].axhline(100 * np.mean(list(CHANCE.values())), color="gray", lw=0.8, ls="--", label="chance")
    axes[2].set_xticks(x, [ARMS[a][0].replace(" + ", "\n+ ") for a in arms], fontsize=7)
    axes[0].set(title="InfoNCE (train)", xlabel="step")
    axes[1].set(title="next-token loss: pretraining, then GIC (steps after pretraining)", xlabel="step")
    axes[2].set(title="mean hit@1 on the test split (%); dots: seeds")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, f"{name}.png"), dpi=100)
    plt.close(fig)
    return report


def run(workdir: str, steps: int | None = None, only: str = "", *, ablation: bool = False,
        seeds: list[int] | None = None, pretrain_steps: int | None = None, extra: str = "",
        max_concepts: int | None = None) -> None:
    """Runs the main job's stages. `extra` (",key=value,...") is appended to every run's `configs/tiny_cpu.py`
    arguments and `max_concepts` shrinks the data set (both for smoke runs)."""
    steps = steps or DEFAULT_STEPS
    pretrain_steps = pretrain_steps or DEFAULT_PRETRAIN_STEPS
    if only and only not in STAGES:
        raise ValueError(f"unknown stage {only!r}; choose one of {STAGES}")
    arms = list(ARMS) if ablation else list(MAIN_ARMS)
    seeds = list(seeds if seeds is not None else (ABLATION_SEEDS if ablation else (0,)))
    if 0 not in seeds:
        raise ValueError("the seeds must include 0 (the method's seed-0 run is exported and decoded)")
    runs = [(a, s) for s in seeds for a in arms]
    want = (only,) if only else STAGES
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if "data" in want:
        stage_data(workdir, max_concepts)
    if "pretrain" in want:
        stage_pretrain(workdir, pretrain_steps, extra)
    if "train" in want:
        for arm, seed in runs:
            log.info("training %s (%s), seed %d", arm, ARMS[arm][0], seed)
            stage_train(workdir, arm, seed, steps, extra)
    scores = stage_eval(workdir, runs) if ("eval" in want or "report" in want) else None
    export = stage_export(workdir) if ("export" in want or "report" in want) else None
    name = "ablation" if ablation else "report"
    decoded = stage_decode(workdir, runs, name) if ("decode" in want or "report" in want) else None
    if "report" in want:
        command = "btoks main" + (" --ablation" if ablation else "") + f" --steps {steps}" \
            + f" --pretrain-steps {pretrain_steps} --seeds {','.join(map(str, seeds))}"
        print(stage_report(workdir, arms, seeds, scores, export, decoded, command, name))
        print(f"report: {os.path.join(workdir, name + '.md')}, plot: {os.path.join(workdir, name + '.png')}")
    log.info("main job stages %s took %.1f min", ",".join(want), (time.perf_counter() - t0) / 60)
