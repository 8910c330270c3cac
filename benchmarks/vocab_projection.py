"""The GIC loss's vocabulary projection over 151,936 rows: the full logits against the fused, chunked loss.

Today's path (`StepConfig.ntp_logits_chunk = 0`) projects the whole target region at once, [B, Lt, V] float32 logits,
then takes the token losses (`losses.token_nll`). The fused path (`ntp_logits_chunk = c`,
`losses.fused_token_nll_sum`) gathers the scored positions first, takes c target positions per row at a time and
computes each chunk's loss and gradients in one pass, skipping the chunks left with only padding; it never holds
more than [B, c, V]. Both run the model's own head
(`BToksModel.target_logits`: the tied table with the BTok rows), forward + backward, with the gradients a LoRA run
needs (hidden states and BToks; the table frozen) or a full fine-tune needs (the table too). For LoRA it adds a head
without the BTok rows (a constant table, gradients for the hidden states only): the bound of the model's head, which
computes the K BTok columns apart from the frozen table. For each width the script reports the compiled
temporaries (`memory_analysis()`) and the measured time, all paths of a row interleaved, ratios against the full
logits of the model's head.

    python benchmarks/vocab_projection.py [--widths 256,1536 --batch 16 --target-len 32 --chunks 8] [--out r.json]
    python benchmarks/vocab_projection.py --tiny
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
    p.add_argument("--widths", default="256,1536", help="hidden widths D (1536: Qwen2-VL-2B)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--target-len", type=int, default=32, help="target region Lt")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", default="8", help="target positions per chunk of the fused path")
    p.add_argument("--trainable", default="lora,full", help="lora: grads of hidden + BToks; full: + the table")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--one-core", action="store_true", help="pin the process to one core (one XLA thread)")
    p.add_argument("--tiny", action="store_true", help="a narrow head and a few rows: runs in seconds")
    p.add_argument("--out", default=None, help="JSON record")
    args = p.parse_args(argv)
    if args.tiny:
        args.widths, args.batch, args.target_len, args.chunks, args.repeats = "32", 4, 8, "4", 2
        args.trainable = "lora"
    args.widths = [int(x) for x in str(args.widths).split(",")]
    args.chunks = [int(x) for x in str(args.chunks).split(",")]
    args.trainable = str(args.trainable).split(",")
    return args


def head_model(width: int, vocab: int):
    """A BToksModel whose head is the real one (tied table of `vocab` rows with the K BTok rows) at `width`; the
    decoder behind it is irrelevant here and kept to one small layer."""
    from btoks_jax import build
    from btoks_jax.model_config import Qwen2VLConfig, TextConfig, VisionConfig

    # Heads of width 32 (M-RoPE split (4, 6, 6) of its 16 frequency slots); the decoder is not timed.
    text = TextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=max(1, width // 32), num_key_value_heads=1, mrope_section=(4, 6, 6))
    vision = VisionConfig(depth=1, embed_dim=32, hidden_size=width, mlp_ratio=2, num_heads=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    return build.build(cfg, num_btoks=4, seed=0, progress=False)


def main(args: argparse.Namespace) -> int:
    import timing

    load_at_start = list(os.getloadavg())
    if args.one_core:
        timing.one_core()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from btoks_jax import losses
    from btoks_jax.btoks import BTokParam

    rng = np.random.default_rng(0)
    b, lt = args.batch, args.target_len
    labels = jnp.asarray(rng.integers(0, args.vocab, (b, lt)), jnp.int32)
    # Targets of different lengths, right-padded (the region fits the longest), as the pipeline packs them.
    lengths = rng.integers(max(1, lt // 4), lt - 3, b)
    mask = np.arange(lt)[None] < lengths[:, None]
    weights = jnp.asarray(mask / mask.sum(), jnp.float32)
    results = []
    print(f"rows {b} x {lt} target positions ({int(mask.sum())} scored), vocabulary {args.vocab}, float32; "
          f"forward + backward; times are medians of {args.repeats} interleaved repeats")
    print(f"{'D':>6}{'grads':>7}{'path':>30}{'temp MiB':>10}{'s':>9}{'time ratio':>12}{'temp ratio':>12}"
          f"{'compile s':>11}")
    for width in args.widths:
        model = head_model(width, args.vocab)
        model.btoks.value = model.btoks.get_value() + (0.05 * rng.standard_normal(model.btoks.shape)).astype(np.float32)
        hidden = jnp.asarray(rng.standard_normal((b, lt, width)), jnp.float32)
        for trainable in args.trainable:
            graphdef, train, frozen = nnx.split(model, BTokParam if trainable == "lora" else nnx.Param, ...)

            def loss(p, h, chunk, table, graphdef=graphdef, frozen=frozen):
                m = nnx.merge(graphdef, p, frozen)
                if chunk:
                    return losses.fused_token_nll_sum(m.target_logits, h, labels, weights, chunk=chunk)
                return jnp.sum(weights * losses.token_nll(m.target_logits(h), labels))

            def plain(p, h, chunk, table):
                """A head without the BTok rows, the table a constant: what the projection costs when only the
                hidden states need gradients (the lower bound of a LoRA step's head)."""
                head = lambda x: jnp.einsum("btd,vd->btv", x, table)  # noqa: E731
                if chunk:
                    return losses.fused_token_nll_sum(head, h, labels, weights, chunk=chunk)
                return jnp.sum(weights * losses.token_nll(head(h), labels))

            paths = {"full_logits": (loss, 0), **{f"fused_chunk_{c}": (loss, c) for c in args.chunks}}
            if trainable == "lora":
                paths.update({"no_btok_rows_full_logits": (plain, 0),
                              **{f"no_btok_rows_fused_chunk_{c}": (plain, c) for c in args.chunks}})
            table = model.backbone.model.embed_tokens.get_value()  # an argument, not a compiled-in constant
            compiled, temp, compile_s, outs = {}, {}, {}, {}
            for name, (f, chunk) in paths.items():
                fn = jax.jit(jax.value_and_grad(lambda p, h, t, f=f, c=chunk: f(p, h, c, t), argnums=(0, 1)))
                t0 = time.perf_counter()
                compiled[name] = fn.lower(train, hidden, table).compile()
                compile_s[name] = time.perf_counter() - t0
                temp[name] = compiled[name].memory_analysis().temp_size_in_bytes
                outs[name] = compiled[name](train, hidden, table)
            diffs = {}
            for name, (v, g) in outs.items():
                ref_v, ref_g = outs["no_btok_rows_full_logits" if name.startswith("no_btok") else "full_logits"]
                if name.startswith("no_btok"):  # only the hidden states' gradients exist there
                    g, ref_g = g[1], ref_g[1]
                scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ref_g))
                diffs[name] = {"loss": abs(float(v) - float(ref_v)) / abs(float(ref_v)),
                               "grads": max(float(jnp.abs(x - y).max()) for x, y in
                                            zip(jax.tree.leaves(g), jax.tree.leaves(ref_g))) / scale}
            del outs
            fns = {name: (lambda c=c: jax.block_until_ready(c(train, hidden, table))) for name, c in compiled.items()}
            times = timing.interleaved(fns, repeats=args.repeats, warmup=1)
            for name, (_, chunk) in paths.items():
                r = timing.ratio(times, name, "full_logits")
                # The fused loss gathers the scored positions of the batch (one group on one device) at the front
                # and takes chunk x B positions at a time: the chunks after the last scored position are skipped.
                per = chunk * b
                chunks = -(-(b * lt) // per) if chunk else 0
                skipped = chunks - -(-int(mask.sum()) // per) if chunk else 0
                results.append({"width": width, "trainable": trainable, "path": name, "chunk": chunk,
                                "temp_bytes": temp[name], "temp_ratio": temp[name] / temp["full_logits"],
                                "times": timing.summary(times)[name], "time_ratio": r,
                                "compile_s": compile_s[name], "relative_difference": diffs[name],
                                "chunks_skipped": skipped, "chunks": chunks})
                print(f"{width:>6}{trainable:>7}{name:>30}{temp[name] / 2**20:>10.0f}"
                      f"{statistics.median(times[name]):>9.3f}{r['of_medians']:>12.3f}"
                      f"{temp[name] / temp['full_logits']:>12.3f}{compile_s[name]:>11.2f}")
            print(f"{'':>13}same loss and gradients as the full logits: " + ", ".join(
                f"{n} {d['loss']:.1e} / {d['grads']:.1e}" for n, d in diffs.items() if "fused" in n)
                + " (relative: loss / largest gradient)")
        del model
    print(f"the full float32 logits alone are {b * lt * args.vocab * 4 / 2**20:.0f} MiB ([{b}, {lt}, {args.vocab}])")
    record = {"benchmark": "vocab_projection", "machine": timing.machine(), "load_average_at_start": load_at_start,
              "argv": sys.argv[1:], "tiny": args.tiny, "one_core": args.one_core, "batch": b,
              "target_len": lt, "vocab": args.vocab, "scored_tokens": int(mask.sum()),
              "logits_bytes": b * lt * args.vocab * 4, "results": results}
    timing.write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
