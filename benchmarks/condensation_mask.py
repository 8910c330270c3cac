"""The condensation mask as one masked pass against the authors' two passes: compiled FLOPs, time, splash tiles.

The generative objective needs the target T to see the query Q only through the K BToks. btoks-jax runs `[Q | B | T]`
once with the condensation mask (`btoks_jax.mask.static_mask`); the reference code runs `[Q ; B]` with a KV cache,
cuts every layer's cache to the K BTok entries and runs T on it (the two-pass formulation, written here with the
same decoder modules, checked to give the same hidden states). Both are compared on the decoder alone (the vision
tower and the vocabulary projection are the same work in both, so they are left out), forward and forward +
backward (gradients of every decoder parameter), for an image-sized query of about 1k tokens and a 64-token target:

- dense path (XLA attention with a boolean bias, what runs on CPU and GPU): XLA's compiled FLOP count
  (`cost_analysis()`) and the measured time, the two formulations interleaved;
- splash path (the TPU Pallas kernel, which skips (block x block) tiles of the mask that are entirely masked): the
  tiles it computes and skips, from the mask's block layout as the kernel pads it (`splash.block_skip_fraction`'s
  rule), against the tiles of the two passes. The kernel does not run here: off TPU it only has an interpreter, and
  XLA does not cost its custom call, so no compiled FLOPs or times of the splash path are reported.

    python benchmarks/condensation_mask.py [--query-len 1020 --target-len 64 --batch 4 --repeats 7] [--out r.json]
    python benchmarks/condensation_mask.py --tiny
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
    p.add_argument("--query-len", type=int, default=1020, help="query region Q (1020 + 4 BToks = 1024 columns)")
    p.add_argument("--target-len", type=int, default=64, help="target region T")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary rows (the packed special ids need 151646+)")
    p.add_argument("--num-btoks", type=int, default=4)
    p.add_argument("--blocks", default="512,256,128", help="splash tile sizes to count (the kernel's default: 512)")
    p.add_argument("--tile-query-lens", default="1020,1024",
                   help="query lengths of the splash tile table (1020: [Q;B] ends on a tile edge; 1024: it does not)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--one-core", action="store_true", help="pin the process to one core (one XLA thread)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences: runs in seconds")
    p.add_argument("--out", default=None, help="JSON record")
    args = p.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 32, 1, 4, 2, 64
        args.query_len, args.target_len, args.batch, args.repeats = 60, 16, 2, 2
        args.tile_query_lens, args.blocks = "60", "128"
    args.blocks = [int(x) for x in str(args.blocks).split(",")]
    args.tile_query_lens = [int(x) for x in str(args.tile_query_lens).split(",")]
    return args


# ============================================================================== the two formulations


def single_pass(model, inputs, layout):
    """(target hidden [B, Lt, D], BTok hidden [B, K, D]) of one condensation-masked pass over `[Q | B | T]`."""
    hidden = model.forward(inputs, layout, mask_mode="condensation")
    return hidden[:, layout.target_slice], hidden[:, layout.btok_slice]


def _attention_inputs(attn, x, cos, sin):
    import jax.numpy as jnp  # noqa: F401

    from btoks_jax.model.layers import apply_rotary

    b, t, _ = x.shape
    q = attn.q_proj(x).reshape(b, t, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).reshape(b, t, attn.num_kv_heads, attn.head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def two_pass(model, inputs, layout):
    """The same as `single_pass` in the authors' form: pass 1 over `[Q ; B]` (causal) keeps each layer's keys and
    values at the K BTok columns; pass 2 runs T on [those K entries ; T], causal inside T."""
    import jax.numpy as jnp

    from btoks_jax.model import attention
    from btoks_jax.model.layers import mrope_cos_sin

    text = model.backbone.model
    cfg = text.cfg
    qb, k = layout.query_len + layout.num_btoks, layout.num_btoks
    embeds = model.backbone.embed_inputs(inputs)
    embeds = embeds.at[:, layout.btok_slice].set(jnp.broadcast_to(model.btoks.get_value().astype(embeds.dtype)[None],
                                                                  (embeds.shape[0],) + model.btoks.shape))
    seg = inputs.segment_ids
    cos, sin = mrope_cos_sin(inputs.positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    # Pass 1: [Q ; B], causal; the cache is cut to the BToks.
    x, cache = embeds[:, :qb], []
    mask1 = attention.dense_mask(seg[:, :qb], seg[:, :qb], np.tri(qb, dtype=bool))
    for layer in text.layers:
        a = layer.self_attn
        q_, k_, v_ = _attention_inputs(a, layer.input_layernorm(x), cos[:, :qb], sin[:, :qb])
        cache.append((k_[:, -k:], v_[:, -k:]))
        out = attention.dense_attention(q_, k_, v_, mask1, a.head_dim ** -0.5)
        x = x + a.o_proj(out.reshape(*x.shape[:2], -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    btok_hidden = text.norm(x)[:, -k:]

    # Pass 2: T on the K-entry cache.
    lt = layout.target_len
    xt = embeds[:, qb:]
    seg_t = seg[:, qb:]
    static2 = np.concatenate([np.ones((lt, k), bool), np.tri(lt, dtype=bool)], axis=1)  # [Lt, K + Lt]
    mask2 = attention.dense_mask(seg_t, jnp.concatenate([jnp.ones_like(seg_t[:, :k]), seg_t], 1), static2)
    for layer, (kc, vc) in zip(text.layers, cache):
        a = layer.self_attn
        q_, k_, v_ = _attention_inputs(a, layer.input_layernorm(xt), cos[:, qb:], sin[:, qb:])
        out = attention.dense_attention(q_, jnp.concatenate([kc, k_], 1), jnp.concatenate([vc, v_], 1), mask2,
                                        a.head_dim ** -0.5)
        xt = xt + a.o_proj(out.reshape(*xt.shape[:2], -1))
        xt = xt + layer.mlp(layer.post_attention_layernorm(xt))
    return text.norm(xt), btok_hidden


def attention_flops(layout, batch: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Compiled FLOPs of the attention alone (scores, softmax, weighted sum; forward and forward + backward) of
    one layer: the single pass's blocks (`attention.block_masks`) against the two passes' [Q ; B] causal square
    and T against [K cached BTok columns ; T]. The rest of a layer (projections, rotary embedding, MLP) is the
    same tokens in both forms."""
    import jax
    import jax.numpy as jnp

    from btoks_jax.mask import static_mask
    from btoks_jax.model import attention

    qb, k, lt, cols = layout.query_len + layout.num_btoks, layout.num_btoks, layout.target_len, layout.length
    mask = static_mask(layout, "condensation")
    static2 = np.concatenate([np.ones((lt, k), bool), np.tri(lt, dtype=bool)], axis=1)  # [Lt, K + Lt]
    scale = head_dim ** -0.5

    def single(q, kk, v, seg):
        return attention.blocked_dense_attention(q, kk, v, attention.block_masks(seg, mask), scale)

    def two_pass(q, kk, v, seg):
        m1 = attention.dense_mask(seg[:, :qb], seg[:, :qb], np.tri(qb, dtype=bool))
        seg_t = seg[:, qb:]
        m2 = attention.dense_mask(seg_t, jnp.concatenate([jnp.ones_like(seg_t[:, :k]), seg_t], 1), static2)
        return jnp.concatenate([attention.dense_attention(q[:, :qb], kk[:, :qb], v[:, :qb], m1, scale),
                                attention.dense_attention(q[:, qb:], kk[:, qb - k:], v[:, qb - k:], m2, scale)], 1)

    shapes = (jax.ShapeDtypeStruct((batch, cols, heads, head_dim), jnp.float32),
              *[jax.ShapeDtypeStruct((batch, cols, kv_heads, head_dim), jnp.float32)] * 2,
              jax.ShapeDtypeStruct((batch, cols), jnp.int32))
    out = {}
    for what in ("forward", "forward_backward"):
        flops = {}
        for name, f in (("single", single), ("two_pass", two_pass)):
            if what == "forward_backward":
                f = jax.grad(lambda q, kk, v, seg, f=f: jnp.sum(f(q, kk, v, seg)), argnums=(0, 1, 2))
            flops[name] = _flops(jax.jit(f).lower(*shapes).compile())
        out[what] = {"flops": flops, "flops_ratio": flops["single"] / flops["two_pass"]}
    return out


# ============================================================================== splash tiles


def splash_tiles(query_len: int, num_btoks: int, target_len: int, block: int) -> dict:
    """Tiles the splash kernel computes for the single pass (the condensation mask and, for reference, plain causal,
    padded to whole tiles as `btoks_jax.model.splash` pads them) and for the two passes (pass 1 causal over
    [Q ; B]; pass 2 a Lt x (K + Lt) block, every tile of it needed)."""
    from btoks_jax.mask import Layout, static_mask
    from btoks_jax.model.splash import _pad_static_mask, _round_up

    def tiles(mask: np.ndarray, bq: int, bk: int) -> tuple[int, int]:
        lq, lk = _round_up(mask.shape[0], bq), _round_up(mask.shape[1], bk)
        padded = np.zeros((lq, lk), bool)
        padded[:mask.shape[0], :mask.shape[1]] = mask
        live = padded.reshape(lq // bq, bq, lk // bk, bk).any(axis=(1, 3))
        return int(live.sum()), int(live.size)

    def square(mask: np.ndarray, blind_padding: bool = False) -> tuple[int, int]:
        b = min(block, _round_up(len(mask), 128))  # `splash.block_sizes_for`: tiles shrink for short sequences
        t, padded_len = len(mask), _round_up(len(mask), b)
        if blind_padding:  # padding rows that see only padding columns (they carry a segment of their own)
            padded = np.zeros((padded_len, padded_len), bool)
            padded[:t, :t] = mask
            padded[t:, t:] = np.tri(padded_len - t, dtype=bool)
        else:  # what the kernel runs: `splash._pad_static_mask` (for the condensation mask the same blind rows)
            padded = _pad_static_mask(mask, padded_len)
        return tiles(padded, b, b) + (b,)

    layout = Layout(query_len, num_btoks, target_len)
    live, total, b = square(static_mask(layout, "condensation"))
    blind_live, _, _ = square(static_mask(layout, "condensation"), blind_padding=True)
    causal_live, _, _ = square(static_mask(layout, "full"))
    qb = query_len + num_btoks
    p1_live, p1_total, b1 = square(np.tri(qb, dtype=bool))
    # Pass 2 with a cache: Lt query rows against K + Lt keys; a kernel over it tiles both sides (at least 128).
    bq2 = min(block, _round_up(target_len, 128))
    bk2 = min(block, _round_up(num_btoks + target_len, 128))
    p2_live, p2_total = tiles(np.ones((target_len, num_btoks + target_len), bool), bq2, bk2)
    single_work = live * b * b
    two_work = p1_live * b1 * b1 + p2_live * bq2 * bk2
    return {"block": block, "query_len": query_len, "columns": layout.length,
            "single": {"tile": b, "computed": live, "tiles": total, "skipped": total - live,
                       "skipped_by_causality": total - causal_live, "skipped_by_the_cut": causal_live - live,
                       "score_entries": single_work, "computed_if_padding_rows_blind": blind_live},
            "two_pass": {"pass1_tile": b1, "pass1_computed": p1_live, "pass1_tiles": p1_total,
                         "pass2_tiles": (bq2, bk2), "pass2_computed": p2_live, "score_entries": two_work},
            "single_over_two_pass": single_work / two_work,
            "single_over_two_pass_if_padding_rows_blind": blind_live * b * b / two_work}


# ============================================================================== main


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def main(args: argparse.Namespace) -> int:
    import timing

    load_at_start = list(os.getloadavg())
    if args.one_core:
        timing.one_core()
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from train_step_vs_torch import model_config

    from btoks_jax import build
    from btoks_jax.inputs import pack
    from btoks_jax.model_config import IM_END_ID, IM_START_ID

    cfg = model_config(args)
    model = build.build(cfg, num_btoks=args.num_btoks, seed=0, progress=False)
    rng = np.random.default_rng(0)
    model.btoks.value = model.btoks.get_value() + (0.05 * rng.standard_normal(model.btoks.shape)).astype(np.float32)
    # Query rows of different real lengths (left padding), targets of different lengths (right padding).
    lengths = np.linspace(args.query_len * 3 // 4, args.query_len, args.batch).astype(int)
    ids = np.full((args.batch, args.query_len), 151643, np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n], mask[i, :n] = rng.integers(100, 150000, n), 1
    targets = [([IM_START_ID, 77091, 198] + [int(t) for t in rng.integers(100, 150000, n)] + [IM_END_ID], 3)
               for n in np.linspace(args.target_len // 2, args.target_len - 4, args.batch).astype(int)]
    packed = pack({"input_ids": ids, "attention_mask": mask}, cfg, num_btoks=args.num_btoks,
                  query_len=args.query_len, targets=targets, target_len=args.target_len)
    layout, inputs = packed.layout, packed.inputs

    graphdef, params = nnx.split(model, nnx.Param)
    real_t = jnp.asarray(np.asarray(inputs.segment_ids)[:, layout.target_slice, None] > 0)
    r_t = rng.standard_normal((args.batch, args.target_len, args.hidden)).astype(np.float32)
    r_b = rng.standard_normal((args.batch, args.num_btoks, args.hidden)).astype(np.float32)

    def run(form, p, x):
        m = nnx.merge(graphdef, p)
        return (single_pass if form == "single" else two_pass)(m, x, layout)

    def objective(form, p, x):  # a scalar of the real target states and the BTok states
        t, b = run(form, p, x)
        return jnp.sum(jnp.where(real_t, t, 0) * r_t) + jnp.sum(b * r_b)

    programs = {}
    for form in ("single", "two_pass"):
        programs[("forward", form)] = jax.jit(lambda p, x, f=form: run(f, p, x))
        programs[("forward_backward", form)] = jax.jit(jax.value_and_grad(lambda p, x, f=form: objective(f, p, x)))
    compiled, flops, compile_s = {}, {}, {}
    for key, fn in programs.items():
        t0 = time.perf_counter()
        compiled[key] = fn.lower(params, inputs).compile()
        compile_s[key] = time.perf_counter() - t0
        flops[key] = _flops(compiled[key])

    # Same function: the real target states and the BTok states agree, and so do the gradients.
    (t1, b1), (t2, b2) = compiled[("forward", "single")](params, inputs), compiled[("forward", "two_pass")](params,
                                                                                                          inputs)
    real = np.asarray(real_t)[..., 0]
    diff_t = float(np.abs(np.asarray(t1)[real] - np.asarray(t2)[real]).max())
    diff_b = float(np.abs(np.asarray(b1) - np.asarray(b2)).max())
    (v1, g1), (v2, g2) = (compiled[("forward_backward", f)](params, inputs) for f in ("single", "two_pass"))
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1))
    diff_g = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))) / scale
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, MLP "
          f"{args.intermediate}, float32; batch {args.batch}, [Q {layout.query_len} | B {layout.num_btoks} | "
          f"T {layout.target_len}] = {layout.length} columns")
    print(f"same function: max |difference| target states {diff_t:.1e}, BTok states {diff_b:.1e}, "
          f"gradients {diff_g:.1e} (relative to the largest)")
    same = diff_t < 1e-3 and diff_b < 1e-3 and diff_g < 1e-3

    timings = {}
    for what in ("forward", "forward_backward"):
        fns = {form: (lambda c=compiled[(what, form)]: jax.block_until_ready(c(params, inputs)))
               for form in ("single", "two_pass")}
        timings[what] = timing.interleaved(fns, repeats=args.repeats, warmup=1)
    print("\ndense attention path (XLA):")
    print(f"{'program':<18}{'single GFLOP':>14}{'two-pass GFLOP':>16}{'ratio':>8}{'single s':>10}{'two-pass s':>12}"
          f"{'ratio':>8}")
    dense = {}
    for what in ("forward", "forward_backward"):
        f1, f2 = flops[(what, "single")], flops[(what, "two_pass")]
        t = timings[what]
        r = timing.ratio(t, "single", "two_pass")
        dense[what] = {"flops": {"single": f1, "two_pass": f2}, "flops_ratio": f1 / f2, "times": timing.summary(t),
                       "time_ratio": r, "compile_s": {f: compile_s[(what, f)] for f in ("single", "two_pass")}}
        print(f"{what:<18}{f1 / 1e9:>14.3f}{f2 / 1e9:>16.3f}{f1 / f2:>8.3f}{statistics.median(t['single']):>10.4f}"
              f"{statistics.median(t['two_pass']):>12.4f}{r['of_medians']:>8.3f}")
    head_dim = args.hidden // args.heads
    dense["attention_alone"] = attention_flops(layout, args.batch, args.heads, args.kv_heads, head_dim)
    for what, r in dense["attention_alone"].items():
        f1, f2 = r["flops"]["single"], r["flops"]["two_pass"]
        print(f"{'attention ' + ('fwd' if what == 'forward' else 'fwd+bwd'):<18}{f1 / 1e9:>14.3f}{f2 / 1e9:>16.3f}"
              f"{r['flops_ratio']:>8.3f}   (one layer's attention alone)")
    met = dense["forward_backward"]["flops_ratio"] <= 1.0 and dense["forward"]["flops_ratio"] <= 1.0
    print(f"single pass no more compiled FLOPs than two-pass: {'met' if met else 'NOT met'} (dense path); times are "
          f"medians of {args.repeats} interleaved repeats")

    print("\nsplash path (TPU kernel, from the mask's block layout; attention score entries computed, per head):")
    print(f"{'Q':>6}{'cols':>6}{'tile':>6}{'single: computed/tiles':>24}{'cut skips':>10}{'two-pass tiles':>16}"
          f"{'single/two-pass work':>22}{'blind padding: tiles, work':>28}")
    tiles = []
    for q in args.tile_query_lens:
        for block in args.blocks:
            r = splash_tiles(q, args.num_btoks, args.target_len, block)
            tiles.append(r)
            s, t2 = r["single"], r["two_pass"]
            single_tiles = f"{s['computed']}/{s['tiles']}"
            two_tiles = f"{t2['pass1_computed']} + {t2['pass2_computed']}"
            blind = f"{s['computed_if_padding_rows_blind']}, {r['single_over_two_pass_if_padding_rows_blind']:.3f}"
            print(f"{q:>6}{r['columns']:>6}{s['tile']:>6}{single_tiles:>24}{s['skipped_by_the_cut']:>10}"
                  f"{two_tiles:>16}{r['single_over_two_pass']:>22.3f}{blind:>28}")
    print("two-pass tiles: pass 1 (causal [Q ; B]) + pass 2 (T against K + T keys); work = score entries computed. "
          "The kernel pads the sequence to whole tiles with causal rows, which keep the tiles the cut empties alive; "
          "'blind padding' counts them with padding rows that see only padding.")
    record = {"benchmark": "condensation_mask", "machine": timing.machine(), "load_average_at_start": load_at_start,
              "argv": sys.argv[1:], "tiny": args.tiny, "one_core": args.one_core,
              "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                        "intermediate": args.intermediate, "dtype": "float32"},
              "batch": args.batch, "query_len": args.query_len, "num_btoks": args.num_btoks,
              "target_len": args.target_len, "columns": layout.length,
              "same_function": same, "max_difference": {"target": diff_t, "btoks": diff_b, "gradients": diff_g},
              "dense": dense, "splash_tiles": tiles, "target_met_dense": met}
    timing.write_json(args.out, record)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
