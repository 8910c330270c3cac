"""`btoks main`: the demonstration on the embedded emoji data, end to end on CPU.

Stages (each re-runs alone with `--only STAGE`; finished stages are skipped, training resumes):
  data         build the emoji data set (Twemoji artwork, Unicode names) into WORKDIR/data
  train_btoks  a small Qwen2-VL-architecture model from scratch: 4 BToks, InfoNCE + 5 * condensation-masked NTP
               for the first 40% of the steps, then InfoNCE alone (the authors' main preset, 2000 of 5000)
  train_last   the same model, budget and seed: last-token pooling, InfoNCE only (the VLM2Vec recipe)
  eval         `btoks eval` on the held-out concepts (test split) for both
  export       the BToks model to Hugging Face format, then embeddings recomputed in PyTorch must match
  report       a side-by-side table (WORKDIR/report.md, .json) and a plot (WORKDIR/report.png)
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

log = logging.getLogger("btoks.main")

STAGES = ("data", "train_btoks", "train_last", "eval", "export", "report")
RUNS = {
    "btoks": "objective=joint,pooling=btoks",  # lambda = 5 for the first 40% of the steps (the main preset)
    "last": "objective=contrastive,pooling=last",
}
DEFAULT_STEPS = 400
CHANCE = {"emoji_i2t": 1 / 51, "emoji_t2i": 1 / 51, "emoji_cls": 1 / 99}


def _config(run: str, data_dir: str, steps: int):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_cpu.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the main job needs the repository's configs/ folder")
    spec = importlib.util.spec_from_file_location("tiny_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"{RUNS[run]},steps={steps},data_dir={data_dir}")


def _done(path: str) -> bool:
    return os.path.exists(path)


def stage_data(workdir: str) -> str:
    from btoks_jax.data.emoji_dataset import build_emoji_dataset

    return str(build_emoji_dataset(os.path.join(workdir, "data")).root)


def stage_train(workdir: str, run: str, steps: int) -> None:
    from btoks_jax.train import train

    marker = os.path.join(workdir, run, "DONE")
    if _done(marker):
        log.info("train_%s: done already (%s)", run, marker)
        return
    t0 = time.perf_counter()
    train(_config(run, os.path.join(workdir, "data"), steps), os.path.join(workdir, run))
    with open(marker, "w") as f:
        json.dump({"seconds": time.perf_counter() - t0, "steps": steps}, f)


def stage_eval(workdir: str) -> dict:
    import btoks_jax
    from btoks_jax.evaluate.run import evaluate_folder

    out = {}
    for run, pooling in (("btoks", "btoks"), ("last", "last")):
        path = os.path.join(workdir, f"eval_{run}", "summary.json")
        if not _done(path):
            model = btoks_jax.from_pretrained(os.path.join(workdir, run))
            fn = lambda items, m=model, p=pooling: m.embed_items(items, pooling=p, batch_size=64,  # noqa: E731
                                                                 progress=False)
            evaluate_folder(fn, os.path.join(workdir, "data"), out_dir=os.path.dirname(path), batch_size=64)
        with open(path) as f:
            out[run] = json.load(f)
    return out


def stage_export(workdir: str, n_check: int = 12) -> dict:
    """Exports the BToks run and recomputes embeddings with plain transformers, following the model card."""
    import btoks_jax
    from btoks_jax.convert.checkpoint_export import export_from_checkpoint
    from btoks_jax.evaluate.mmeb import read_eval_rows

    hf_dir = os.path.join(workdir, "hf_btoks")
    result_path = os.path.join(workdir, "export_check.json")
    if _done(result_path):
        with open(result_path) as f:
            return json.load(f)
    export_from_checkpoint(os.path.join(workdir, "btoks"), hf_dir, overwrite=True)
    rows = read_eval_rows(os.path.join(workdir, "data", "emoji_i2t_test.jsonl"), os.path.join(workdir, "data"))
    items = [r.query for r in rows[: n_check // 2]] + [r.candidates[0] for r in rows[: n_check // 2]]
    jax_model = btoks_jax.from_pretrained(os.path.join(workdir, "btoks"))
    ours = jax_model.embed_items(items, pooling="btoks", progress=False)
    theirs = torch_embeddings(hf_dir, items, jax_model.prompt_style)
    result = {"items": len(items), "max_abs_diff": float(np.abs(ours - theirs).max()), "hf_dir": hf_dir}
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    if result["max_abs_diff"] > 1e-4:
        raise AssertionError(f"exported model embeds differently in PyTorch: max |diff| {result['max_abs_diff']}")
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


def _history(workdir: str, run: str):
    train_rows, eval_rows = [], []
    path = os.path.join(workdir, run, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                (eval_rows if "eval" in row else train_rows).append(row)
    return train_rows, eval_rows


def stage_report(workdir: str, scores: dict, export: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(CHANCE)
    labels = {"btoks": "BToks (K=4) + InfoNCE + 5*GIC (first 40%)", "last": "last-token + InfoNCE"}
    lines = ["| model | " + " | ".join(f"{t} hit@1" for t in tasks) + " | mean | final InfoNCE | train time |",
             "|---|" + "---|" * (len(tasks) + 3)]
    table = {}
    for run in ("btoks", "last"):
        ds = scores[run]["datasets"]
        hits = [100 * ds[t]["hit@1"] for t in tasks]
        train_rows, _ = _history(workdir, run)
        with open(os.path.join(workdir, run, "DONE")) as f:
            seconds = json.load(f)["seconds"]
        final_nce = train_rows[-1]["info_nce"] if train_rows else float("nan")
        table[run] = {"hit@1": dict(zip(tasks, hits)), "mean": float(np.mean(hits)), "final_info_nce": final_nce,
                      "train_seconds": seconds}
        lines.append(f"| {labels[run]} | " + " | ".join(f"{h:.1f}" for h in hits)
                     + f" | {np.mean(hits):.1f} | {final_nce:.3f} | {seconds / 60:.1f} min |")
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[t]:.1f}" for t in tasks)
                 + f" | {100 * np.mean(list(CHANCE.values())):.1f} | | |")
    report = "\n".join(lines)
    note = (f"\nExported BToks model re-embedded in PyTorch: max |diff| = {export['max_abs_diff']:.2e} over "
            f"{export['items']} items.\n")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("# btoks main: held-out emoji concepts (test split)\n\n" + report + "\n" + note)
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump({"table": table, "export_check": export}, f, indent=1)

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for run in ("btoks", "last"):
        train_rows, eval_rows = _history(workdir, run)
        steps = [r["step"] for r in train_rows]
        axes[0].plot(steps, [r["info_nce"] for r in train_rows], label=labels[run])
        if run == "btoks":
            gic = [r for r in train_rows if r["ntp_weight"] > 0]  # lambda is 0 after the warm-up
            axes[1].plot([r["step"] for r in gic], [r["ntp"] for r in gic], label="GIC next-token loss")
        for hook, style in (("emoji", "-"), ("train_pairs", ":")):
            rows = [r for r in eval_rows if r["eval"] == hook]
            axes[2].plot([r["step"] for r in rows], [100 * r["mean_hit@1"] for r in rows], style, marker="o",
                         label=f"{labels[run]}, {'test split' if hook == 'emoji' else 'training pairs'}")
    axes[0].set(title="InfoNCE (train)", xlabel="step")
    axes[1].set(title="NTP under the condensation mask (BToks run)", xlabel="step")
    axes[2].set(title="mean hit@1 (%): test split (51 / 99 candidates), training pairs (256)", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "report.png"), dpi=100)
    plt.close(fig)
    return report + note


def run(workdir: str, steps: int | None = None, only: str = "") -> None:
    steps = steps or DEFAULT_STEPS
    if only and only not in STAGES:
        raise ValueError(f"unknown stage {only!r}; choose one of {STAGES}")
    want = (only,) if only else STAGES
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if "data" in want:
        stage_data(workdir)
    if "train_btoks" in want:
        stage_train(workdir, "btoks", steps)
    if "train_last" in want:
        stage_train(workdir, "last", steps)
    scores = stage_eval(workdir) if ("eval" in want or "report" in want) else None
    export = stage_export(workdir) if ("export" in want or "report" in want) else None
    if "report" in want:
        print(stage_report(workdir, scores, export))
        print(f"report: {os.path.join(workdir, 'report.md')}, plot: {os.path.join(workdir, 'report.png')}")
    log.info("main job stages %s took %.1f min", ",".join(want), (time.perf_counter() - t0) / 60)
