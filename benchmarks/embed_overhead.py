"""What the K bottleneck tokens cost at inference: BToks pooling against last-token pooling, side by side.

Both sides embed the same text inputs with the same weights, the way `btoks_jax.api.Embedder` does it: the inputs
packed by `btoks_jax.inputs.pack` into a query region as wide as the Embedder makes it (`api.query_width`, left
padded), then one jitted `model(x, layout, pooling=pooling)` (whose last layer computes only the columns the pooling
reads: the BToks, or the last input token). BToks pooling adds K = 4 columns
(the mean of their final states is the embedding); last-token pooling (K = 0, VLM2Vec's EOS pooling) reads the last
input column. Two kinds of input per length L, each embedded by both sides:
  "room": rows of L - K tokens, which leave room for the BToks in the L-column bucket (every length of a bucket
          but its last K): both sides run L columns;
  "full": rows of exactly L tokens, which fill the bucket: last-token pooling runs L columns, BToks L + K.
The four programs run interleaved, `--repeats` times each; an overhead is the ratio of the medians minus 1. Rows per
call shrink as L grows so every call holds about the same number of tokens.

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
    from btoks_jax.api import query_width
    from btoks_jax.btoks import BToksModel
    from btoks_jax.inputs import pack

    cfg = model_config(args)
    btoks_model = build.build(cfg, num_btoks=args.num_btoks, seed=0, progress=False)
    last_model = BToksModel(cfg, 0, rngs=nnx.Rngs(0), backbone=btoks_model.backbone)  # same weights, no BToks
    k = args.num_btoks
    rng = np.random.default_rng(0)
    rows_out = []
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, MLP "
          f"{args.intermediate}, float32, dense attention; K = {k}")
    print(f"{'L':>6}{'rows':>6}  {'inputs':<12}{'columns last/btoks':>19}{'last s':>10}{'btoks s':>10}"
          f"{'overhead':>10}{'pairs':>9}   (medians of {args.repeats} interleaved repeats; pairs: median of "
          "per-repeat ratios)")
    for length in args.lengths:
        rows = max(1, args.tokens // length)
        ids = rng.integers(100, 150000, (rows, length))
        inputs = {"room": ids[:, :length - k], "full": ids}
        fns, compile_s, columns = {}, {}, {}
        for case, case_ids in inputs.items():
            hf = {"input_ids": case_ids, "attention_mask": np.ones_like(case_ids)}
            for side, model, num_btoks in (("last", last_model, 0), ("btoks", btoks_model, k)):
                name = f"{side}_{case}"
                packed = pack(hf, cfg, num_btoks=num_btoks, query_len=query_width(case_ids.shape[1], num_btoks))
                layout = packed.layout
                columns[name] = layout.query_len + layout.num_btoks
                embed = jax.jit(lambda m, x, layout=layout, pooling=side: m(x, layout, pooling=pooling)[0])
                t0 = time.perf_counter()
                compiled = embed.lower(model, packed.inputs).compile()
                compile_s[name] = time.perf_counter() - t0
                fns[name] = (lambda c=compiled, m=model, x=packed.inputs: jax.block_until_ready(c(m, x)))
        times = timing.interleaved(fns, repeats=args.repeats, warmup=1)
        med = {name: statistics.median(v) for name, v in times.items()}
        entry = {"length": length, "rows": rows, "times": timing.summary(times), "columns": columns,
                 "compile_s": compile_s}
        for case in inputs:
            r = timing.ratio(times, f"btoks_{case}", f"last_{case}")
            entry[f"overhead_{case}"] = r["of_medians"] - 1
            entry[f"overhead_{case}_median_of_pairs"] = r["median_of_pairs"] - 1
            tokens = length - k if case == "room" else length
            print(f"{length:>6}{rows:>6}  {case + ' (' + str(tokens) + ')':<12}"
                  f"{str(columns['last_' + case]) + ' / ' + str(columns['btoks_' + case]):>19}"
                  f"{med['last_' + case]:>10.4f}{med['btoks_' + case]:>10.4f}{r['of_medians'] - 1:>+10.1%}"
                  f"{r['median_of_pairs'] - 1:>+9.1%}")
        rows_out.append(entry)
    at = next((r for r in rows_out if r["length"] == 1024), None)
    met = None if at is None else {case: at[f"overhead_{case}"] <= args.target for case in ("room", "full")}
    if at is not None:
        print(f"overhead at 1024 tokens (target <= {args.target:.0%}): inputs that leave room for the BToks "
              f"{at['overhead_room']:+.1%} ({'met' if met['room'] else 'NOT met'}); inputs that fill the bucket "
              f"{at['overhead_full']:+.1%} ({'met' if met['full'] else 'NOT met'})")
    record = {"benchmark": "embed_overhead", "machine": timing.machine(), "load_average_at_start": load_at_start,
              "argv": sys.argv[1:], "tiny": args.tiny, "one_core": args.one_core,
              "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                        "intermediate": args.intermediate, "vocab": args.vocab, "dtype": "float32",
                        "attention": "dense"},
              "num_btoks": k, "tokens_per_call": args.tokens, "lengths": rows_out,
              "target_overhead_at_1024": args.target, "target_met": met}
    timing.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
