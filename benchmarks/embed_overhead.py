"""What the K bottleneck tokens cost at inference: BToks pooling against last-token pooling, side by side.

Both sides embed the same text inputs with the same weights, the way `btoks_jax.api.Embedder` does it: the inputs
packed by `btoks_jax.inputs.pack` into a query region of L columns (left-padded; here every row is L real tokens),
then one jitted `model.pool(model.forward(x, layout), layout, pooling)`. BToks pooling appends K = 4 columns (the
mean of their final states is the embedding); last-token pooling (K = 0, VLM2Vec's EOS pooling) reads column L - 1.
Per input length the two run interleaved, `--repeats` times each; the overhead is the ratio of the medians minus 1.
A third side, "btoks_in_bucket", cuts the same rows by K tokens so that input + BToks fill exactly L columns: it
separates the cost of K more columns from the cost of the shape L + K. Rows per call shrink as L grows so every
call holds about the same number of tokens.

    python benchmarks/embed_overhead.py [--lengths 256,1024,4096 --tokens 4096 --repeats 7] [--out r.json]
    python benchmarks/embed_overhead.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="256,1024,4096", help="input lengths L (real tokens per row)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per call: rows = max(1, tokens // L)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--num-btoks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--one-core", action="store_true", help="pin the process to one core (one XLA thread)")
    p.add_argument("--target", type=float, default=0.03, help="the overhead allowed at 1024 tokens")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short inputs: runs in seconds")
    p.add_argument("--out", default=None, help="JSON record")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 32, 1, 4, 2, 64
        args.lengths, args.tokens, args.repeats = "16,64", 64, 2
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    return args


def main(args: argparse.Namespace) -> int:
    import timing

    load_at_start = list(os.getloadavg())
    if args.one_core:
        timing.one_core()
    import jax
    from flax import nnx
    from train_step_vs_torch import model_config

    from btoks_jax import build
    from btoks_jax.btoks import BToksModel
    from btoks_jax.inputs import pack

    cfg = model_config(args)
    btoks_model = build.build(cfg, num_btoks=args.num_btoks, seed=0, progress=False)
    last_model = BToksModel(cfg, 0, rngs=nnx.Rngs(0), backbone=btoks_model.backbone)  # same weights, no BToks
    rng = np.random.default_rng(0)
    rows_out = []
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, MLP "
          f"{args.intermediate}, float32, dense attention; K = {args.num_btoks}")
    print(f"{'L':>6}{'rows':>6}{'last s':>10}{'btoks s':>10}{'overhead':>10}{'pairs':>9}{'extra cols':>12}"
          f"{'in-bucket s':>12}{'overhead':>11}{'compile s':>11}   (medians of {args.repeats} interleaved repeats; "
          "pairs: median of per-repeat ratios)")
    for length in args.lengths:
        rows = max(1, args.tokens // length)
        ids = rng.integers(100, 150000, (rows, length))
        hf = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        fns, compile_s = {}, {}
        # "btoks_in_bucket": the same rows cut by K tokens, so input + BToks fill exactly L columns (the bucket
        # holds the BToks instead of growing by K): what the K extra columns cost apart from the shape they make.
        cut = ids[:, :length - args.num_btoks]
        short = {"input_ids": cut, "attention_mask": np.ones_like(cut)}
        for name, model, k, pooling, rows_in, q_len in (
                ("last", last_model, 0, "last", hf, length),
                ("btoks", btoks_model, args.num_btoks, "btoks", hf, length),
                ("btoks_in_bucket", btoks_model, args.num_btoks, "btoks", short, length - args.num_btoks)):
            packed = pack(rows_in, cfg, num_btoks=k, query_len=q_len)
            layout = packed.layout
            embed = jax.jit(lambda m, x, layout=layout, pooling=pooling: m.pool(m.forward(x, layout), layout,
                                                                                  pooling))
            t0 = time.perf_counter()
            compiled = embed.lower(model, packed.inputs).compile()
            compile_s[name] = time.perf_counter() - t0
            fns[name] = (lambda c=compiled, m=model, x=packed.inputs: jax.block_until_ready(c(m, x)))
        times = timing.interleaved(fns, repeats=args.repeats, warmup=1)
        r = timing.ratio(times, "btoks", "last")
        r_in = timing.ratio(times, "btoks_in_bucket", "last")
        med = {k: statistics.median(v) for k, v in times.items()}
        rows_out.append({"length": length, "rows": rows, "times": timing.summary(times),
                         "overhead": r["of_medians"] - 1, "overhead_median_of_pairs": r["median_of_pairs"] - 1,
                         "overhead_in_bucket": r_in["of_medians"] - 1,
                         "overhead_in_bucket_median_of_pairs": r_in["median_of_pairs"] - 1,
                         "extra_columns": args.num_btoks / length, "compile_s": compile_s})
        print(f"{length:>6}{rows:>6}{med['last']:>10.4f}{med['btoks']:>10.4f}{r['of_medians'] - 1:>+10.1%}"
              f"{r['median_of_pairs'] - 1:>+9.1%}{args.num_btoks / length:>12.2%}"
              f"{med['btoks_in_bucket']:>12.4f}{r_in['of_medians'] - 1:>+11.1%}{compile_s['btoks']:>11.2f}")
    at = next((r for r in rows_out if r["length"] == 1024), None)
    met = None if at is None else at["overhead"] <= args.target
    if at is not None:
        print(f"overhead at 1024 tokens: {at['overhead']:+.1%} (target <= {args.target:.0%}: "
              f"{'met' if met else 'NOT met'}); with the BToks inside the {1024}-column bucket: "
              f"{at['overhead_in_bucket']:+.1%}")
    record = {"benchmark": "embed_overhead", "machine": timing.machine(), "load_average_at_start": load_at_start,
              "argv": sys.argv[1:], "tiny": args.tiny, "one_core": args.one_core,
              "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                        "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float32",
                        "attention": "dense"},
              "num_btoks": args.num_btoks, "tokens_per_call": args.tokens, "lengths": rows_out,
              "target_overhead_at_1024": args.target, "target_met": met}
    timing.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
