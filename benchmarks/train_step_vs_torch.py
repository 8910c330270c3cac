"""The joint BToks train step: btoks-jax's jitted step against the same computation in PyTorch, side by side.

Both sides train the same model from the same weights on the same batch, one step after another:

- btoks-jax: `train_step.compile_step` (what `btoks train` runs), the single masked `[Q | B | T]` pass with the
  condensation mask, InfoNCE + lambda x GIC (chunk-token mean, chunks of 8), backward, clipping, optax AdamW;
- PyTorch (`benchmarks/torch_reference.py`): the authors' formulation on a `transformers` Qwen2-VL, the query side
  `[Q ; B]` encoded with a KV cache, the cache cut to the K BTok entries, the target run on that cache, the same
  loss, backward, `clip_grad_norm_`, `torch.optim.AdamW` and the same linear schedule.

The weights come from one random Hugging Face model, imported into btoks-jax with its converter
(`build.build(hf_dir=...)`); the LoRA adapters (non-zero B, so they matter from the first step) and the BTok vectors
are copied from btoks-jax into the PyTorch model. The first step's losses must agree (`--rtol`): that is the check
that both compute the same thing. Then the two steps run interleaved, `--repeats` times each, and the script reports
tokens/s of each side (real tokens, as the trainer counts them), the ratio of the medians and btoks-jax's compile
time, separately.

    python benchmarks/train_step_vs_torch.py [--batch 16 --query-len 64 --target-len 32 --repeats 7] [--out r.json]
    python benchmarks/train_step_vs_torch.py --tiny          # seconds: the same code paths on a tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256, help="decoder width")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    p.add_argument("--intermediate", type=int, default=1536, help="MLP width (Qwen2-VL-2B: 5.8 x hidden)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows (Qwen2-VL's 151936)")
    p.add_argument("--batch", type=int, default=16, help="rows of the global batch")
    p.add_argument("--query-len", type=int, default=64, help="query region Q (text), before the K BToks")
    p.add_argument("--target-len", type=int, default=32, help="target region T on the query side")
    p.add_argument("--positive-len", type=int, default=32, help="positive region (text, no target)")
    p.add_argument("--num-btoks", type=int, default=4)
    p.add_argument("--trainable", choices=("lora", "full"), default="lora",
                   help="lora: adapters r16/alpha32 on q/k/v/o/down + the BToks (the recipe, without DoRA and "
                        "dropout); full: every parameter")
    p.add_argument("--ntp-reduction", choices=("chunk_token_mean", "sample_mean"), default="chunk_token_mean")
    p.add_argument("--ntp-logits-chunk", default="8",
                   help="also time btoks-jax with StepConfig.ntp_logits_chunk = N (the fused, chunked vocabulary "
                        "projection + NTP loss, which projects only the chunks holding scored positions), one side "
                        "per N of a comma-separated list; 0: only the default step")
    p.add_argument("--breakdown", action="store_true",
                   help="also time btoks-jax's contrastive-only step (no target pass, no vocabulary projection), "
                        "to show what the generative part costs")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--torch-attention", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers' attention implementation")
    p.add_argument("--one-core", action="store_true",
                   help="pin the process to one core, one thread for XLA and torch (less disturbed by other processes)")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per side, interleaved")
    p.add_argument("--rtol", type=float, default=1e-4, help="first-step loss agreement required")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch: runs in seconds")
    p.add_argument("--out", default=None, help="JSON record")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 32, 1, 4, 2, 64
        args.batch, args.query_len, args.target_len, args.positive_len, args.repeats = 8, 12, 8, 8, 1
        args.ntp_logits_chunk = "0"  # one btoks-jax program: the fused loss has its own tests
    return args


def model_config(args):
    from btoks_jax.model_config import Qwen2VLConfig, TextConfig, VisionConfig

    head_dim = args.hidden // args.heads
    half = head_dim // 2
    # Qwen2-VL's M-RoPE split (16, 24, 24) of 64 frequency slots, scaled to this head width.
    t = max(1, round(half * 16 / 64))
    h = (half - t) // 2
    text = TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, mrope_section=(t, h, half - t - h))
    # The vision tower is not used by text-only batches; the smallest one the config allows.
    vision = VisionConfig(depth=1, embed_dim=32, hidden_size=args.hidden, mlp_ratio=2, num_heads=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def make_batch(cfg, args, rng: np.random.Generator):
    """Text queries that generate their positive's text (ntp_side positive), text positives with no target:
    lengths vary per row, so both regions are padded as the pipeline pads them."""
    from btoks_jax.inputs import pack
    from btoks_jax.model_config import IM_END_ID, IM_START_ID

    prefix = [IM_START_ID, 77091, 198]  # "<|im_start|>assistant\n"

    def rows(n, lo, hi):
        return [[int(x) for x in rng.integers(100, 150000, int(rng.integers(lo, hi + 1)))] for _ in range(n)]

    def hf(token_rows):
        width = max(len(r) for r in token_rows)
        ids = np.full((len(token_rows), width), 151643, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(token_rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    b = args.batch
    queries = rows(b, max(1, args.query_len // 2), args.query_len)
    bodies = rows(b, max(1, args.target_len // 4), args.target_len - len(prefix) - 1)
    positives = bodies if args.positive_len >= args.target_len else rows(b, max(1, args.positive_len // 2),
                                                                          args.positive_len)
    positives = [p[:args.positive_len] for p in positives]
    targets = [(prefix + body + [IM_END_ID], len(prefix)) for body in bodies]
    q = pack(hf(queries), cfg, num_btoks=args.num_btoks, query_len=args.query_len, targets=targets,
             target_len=args.target_len)
    p = pack(hf(positives), cfg, num_btoks=args.num_btoks, query_len=args.positive_len)
    return q, p


def build_both(args, cfg, q, p):
    """(btoks-jax step pieces, PyTorch model and optimizer) from one set of weights."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch_reference as R
    from flax import nnx

    from btoks_jax import build, sharding, train_step
    from btoks_jax.lora import LoRAConfig, _target_linears

    hf = R.hf_model(cfg, seed=args.seed, attn_implementation=args.torch_attention)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    lora = LoRAConfig(rank=16, alpha=32.0, dropout=0.0, dora=False) if args.trainable == "lora" else None
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = build.build(cfg, num_btoks=args.num_btoks, lora=lora, hf_dir=d, seed=args.seed, mesh=mesh,
                            progress=False)
    rng = np.random.default_rng(args.seed + 1)
    btoks = (rng.standard_normal(model.btoks.shape) * 0.05).astype(np.float32)
    model.btoks.value = jnp.asarray(btoks)
    adapters = {}
    if lora is not None:
        for path, linear in _target_linears(model.backbone, lora.targets):
            linear.lora.b.value = jnp.asarray(rng.standard_normal(linear.lora.b.shape) * 0.02, jnp.float32)
            adapters[path] = (np.asarray(linear.lora.a.get_value()), np.asarray(linear.lora.b.get_value()))

    step_cfg = train_step.StepConfig(objective="joint", temperature=0.02, ntp_weight=5.0,
                                     ntp_reduction=args.ntp_reduction, ntp_chunk_size=8, chunk_size=0,
                                     trainable=args.trainable)
    opt_kw = dict(learning_rate=args.learning_rate, warmup_steps=0, total_steps=1000, weight_decay=0.01)
    tx, schedule = train_step.make_optimizer(clip_norm=1.0, **opt_kw)
    graphdef, params, frozen = train_step.split_model(model, args.trainable)
    batch = {"query": {"inputs": q.inputs, "labels": q.labels, "label_mask": q.label_mask},
             "positive": {"inputs": p.inputs, "labels": p.labels, "label_mask": p.label_mask}}
    batch = jax.device_put(batch, sharding.batch_shardings(batch, mesh))
    # One jitted step per btoks-jax side, each with its own copy of the train state (the step donates it).
    jax_sides = {}
    fused = [int(c) for c in str(args.ntp_logits_chunk).split(",") if int(c)]
    variants = [("btoks_jax", 0, "joint")]
    variants += [(f"btoks_jax_fused_ntp_{c}" if len(fused) > 1 else "btoks_jax_fused_ntp", c, "joint") for c in fused]
    variants += [("btoks_jax_contrastive_only", 0, "contrastive")] if args.breakdown else []
    for name, chunk, objective in variants:
        cfg_i = dataclasses.replace(step_cfg, ntp_logits_chunk=chunk, objective=objective)
        state = train_step.init_state(jax.tree.map(jnp.copy, params), tx, args.seed)
        step = train_step.compile_step(graphdef=graphdef, layouts=(q.layout, p.layout), cfg=cfg_i, tx=tx,
                                       schedule=schedule, state=state, frozen=frozen, batch=batch, mesh=mesh)
        jax_sides[name] = {"step": step, "state": state, "cfg": cfg_i}

    torch_model = R.BToksTorch(hf, btoks, model.btok_ids)
    if lora is not None:
        for prm in hf.parameters():
            prm.requires_grad_(False)
        params_t = R.attach_lora(hf, adapters, lora.alpha / lora.rank) + [torch_model.btoks]
        groups = [{"params": params_t}]
    else:
        # The Trainer's rule, as train_step.decays: biases and norm weights do not decay.
        named = [(n, prm) for n, prm in torch_model.named_parameters()]
        no_decay = [prm for n, prm in named if "bias" in n or "norm" in n or "ln_q" in n]
        decay = [prm for n, prm in named if not ("bias" in n or "norm" in n or "ln_q" in n)]
        params_t = decay + no_decay
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt, sched = R.make_optimizer(groups, **opt_kw)
    torch_batch = R.from_packed(q, p)
    del nnx, torch
    return (jax_sides, frozen, batch, mesh), (torch_model, torch_batch, params_t, opt, sched), step_cfg


def main(args: argparse.Namespace) -> int:
    import timing

    load_at_start = list(os.getloadavg())
    if args.one_core:
        timing.one_core()
    import jax
    import torch_reference as R

    from btoks_jax import sharding
    cfg = model_config(args)
    q, p = make_batch(cfg, args, np.random.default_rng(args.seed))
    (jax_sides, frozen, batch, mesh), (tm, tb, params_t, opt, sched), step_cfg = build_both(args, cfg, q, p)

    metrics = {name: [] for name in list(jax_sides) + ["torch"]}
    for side in jax_sides.values():
        with jax.set_mesh(mesh), sharding.activation_sharding(mesh):
            t0 = time.perf_counter()
            lowered = side["step"].lower(side["state"], frozen, batch)
            side["lower_s"] = time.perf_counter() - t0
            side["compiled"] = lowered.compile()
            side["compile_s"] = time.perf_counter() - t0
            side["temp_bytes"] = side["compiled"].memory_analysis().temp_size_in_bytes

    def jax_step(name):
        side = jax_sides[name]

        def run():
            side["state"], m = side["compiled"](side["state"], frozen, batch)
            metrics[name].append({k: float(v) for k, v in jax.device_get(m).items()})

        return run

    def torch_step():
        metrics["torch"].append(R.train_step(tm, tb, params_t, opt, sched, clip_norm=1.0, temperature=0.02,
                                             ntp_weight=5.0, reduction=args.ntp_reduction, chunk_size=8))

    fns = {name: jax_step(name) for name in jax_sides}
    fns["torch"] = torch_step
    # The first step of each side, before any timing: its losses are the check that all compute the same thing.
    first_call_s = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first_call_s[name] = time.perf_counter() - t0
    keys = ("loss", "info_nce", "ntp", "grad_norm")
    first = {k: {name: metrics[name][0][k] for name in fns} for k in keys}
    joint = [name for name, side in jax_sides.items() if side["cfg"].objective == "joint"]
    print("first step (same weights, same batch; the contrastive-only step has no NTP term):")
    for k, v in first.items():
        rel = max(abs(v[name] - v["torch"]) / max(abs(v["torch"]), 1e-12) for name in joint)
        print(f"  {k:<10} " + "   ".join(f"{name} {x:.7f}" for name, x in v.items())
              + f"   max rel. diff of the joint steps {rel:.2e}")
    agree = all(np.isclose(first[k][name], first[k]["torch"], rtol=args.rtol, atol=0)
                for k in ("loss", "info_nce", "ntp") for name in joint)
    agree &= all(np.isclose(first["info_nce"][name], first["info_nce"]["torch"], rtol=args.rtol, atol=0)
                 for name in jax_sides)
    if not agree:
        print(f"FIRST-STEP LOSSES DISAGREE beyond rtol {args.rtol}: the sides do not compute the same thing")
        return 1

    times = timing.interleaved(fns, repeats=args.repeats, warmup=0)
    tokens = int(np.asarray(q.inputs.segment_ids).sum() + np.asarray(p.inputs.segment_ids).sum())
    columns = int(np.asarray(q.inputs.segment_ids).size + np.asarray(p.inputs.segment_ids).size)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = {name: timing.ratio(times, "torch", name) for name in joint}
    losses = {name: [m["loss"] for m in ms] for name, ms in metrics.items()}
    drift = max(abs(a - b) / abs(b) for name in joint for a, b in zip(losses[name], losses["torch"]))

    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, MLP "
          f"{args.intermediate}, vocabulary {args.vocab}, float32; trainable: {args.trainable}")
    print(f"batch: {args.batch} rows, query [{args.query_len} + {args.num_btoks} | {args.target_len}], positive "
          f"[{args.positive_len} + {args.num_btoks}]; {tokens} real tokens ({columns} columns), "
          f"{int(np.asarray(q.label_mask).sum())} scored target tokens per step")
    for name, side in jax_sides.items():
        print(f"{name} compile: {side['compile_s']:.2f} s (lowering {side['lower_s']:.2f} s), not in the step "
              f"times; compiled temporaries {side['temp_bytes'] / 2**20:.0f} MiB")
    print(f"{'side':<28}{'median s/step':>15}{'tokens/s':>12}{'speed-up':>10}   (interleaved, {args.repeats} "
          "repeats each)")
    for name in fns:
        up = f"{speedup[name]['of_medians']:.2f}x" if name in speedup else ("1.00x" if name == "torch" else "-")
        print(f"{name:<28}{med[name]:>15.4f}{tokens / med[name]:>12.0f}{up:>10}")
    best = max(s["of_medians"] for s in speedup.values())
    print("speed-up = torch median / btoks-jax median (median of per-repeat ratios: "
          + ", ".join(f"{n} {s['median_of_pairs']:.2f}x" for n, s in speedup.items())
          + f"); target >= 2x: {'met' if best >= 2 else 'NOT met'}")
    print(f"losses of all {len(losses['torch'])} steps agree to {drift:.1e} (relative) after the updates")
    if "btoks_jax_contrastive_only" in med:
        gic = 1 - med["btoks_jax_contrastive_only"] / med["btoks_jax"]
        print(f"the generative part (target region, vocabulary projection, NTP loss) is {gic:.0%} of btoks-jax's "
              "joint step")

    record = {
        "benchmark": "train_step_vs_torch", "machine": timing.machine(), "load_average_at_start": load_at_start,
        "argv": sys.argv[1:], "tiny": args.tiny,
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float32",
                  "trainable": args.trainable},
        "batch": {"rows": args.batch, "query_len": args.query_len, "num_btoks": args.num_btoks,
                  "target_len": args.target_len, "positive_len": args.positive_len, "tokens": tokens,
                  "columns": columns, "scored_tokens": int(np.asarray(q.label_mask).sum())},
        "step": dataclasses.asdict(step_cfg), "torch_attention": args.torch_attention,
        "one_core": args.one_core,
        "first_step": first, "first_step_agrees": agree, "rtol": args.rtol, "losses": losses,
        "max_relative_loss_difference": drift,
        "compile_s": {n: s["compile_s"] for n, s in jax_sides.items()},
        "lower_s": {n: s["lower_s"] for n, s in jax_sides.items()},
        "temp_bytes": {n: s["temp_bytes"] for n, s in jax_sides.items()},
        "first_call_s": first_call_s, "times": timing.summary(times),
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "speedup": speedup, "target_speedup": 2.0, "target_met": best >= 2.0,
    }
    timing.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
