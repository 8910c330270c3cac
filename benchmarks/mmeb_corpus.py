"""Embedding and ranking throughput for a visual-document corpus the size of the large MMEB-V2 sets, on CPU.

    python benchmarks/mmeb_corpus.py [--pages 10000] [--queries 1000] [--batch-size 64] [--out result.json]

A synthetic corpus of `--pages` page images (random 56x56 PNGs, a few vision tokens each) and `--queries` text
queries is embedded by the tiny Qwen2-VL preset through the evaluator's own path (`Embedder.embed_items` inside
`EmbeddingCache` with the on-disk `EmbeddingStore`), then ranked globally by blocked top-k
(`metrics.global_ranking_metrics`), as `btoks eval --mmeb-v2` does for ViDoRe / VisRAG. Printed, side by side in
one run:

- embedding throughput (pages/s) on the first pass, and the second pass served by the store (nothing re-embedded),
  with their ratio;
- ranking throughput (query x page scores/s) at the tiny width and at the 2B width (1536, random unit vectors), and
  the ratio of blocked to dense ranking time where the dense [Q, N] matrix still fits;
- peak resident memory of the process (ru_maxrss) after each phase, and the bytes a dense [Q, N] float64 score
  matrix would take.

Absolute figures depend on the machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pages", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=1536, help="embedding width of the 2B-sized ranking run")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (200 pages, 50 queries)")
    p.add_argument("--out", default="", help="write the result as JSON here")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_corpus(folder: Path, pages: int, queries: int, seed: int = 0):
    from PIL import Image

    from btoks_jax.evaluate.mmeb import EvalRow, Item

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = []
    for i in range(pages):
        path = folder / f"page_{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(path)
        corpus.append(Item(text="<|image_1|> Understand the content of the provided document image.", image=str(path)))
    rows = [EvalRow(query=Item(text=f"Find a document image that matches the given query: question {q}"),
                    candidates=(corpus[int(rng.integers(pages))],), relevance=(1.0,)) for q in range(queries)]
    return rows, tuple(corpus)


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from btoks_jax import build
    from btoks_jax.api import Embedder
    from btoks_jax.evaluate import metrics
    from btoks_jax.evaluate.mmeb import EmbeddingCache, evaluate_dataset
    from btoks_jax.evaluate.store import EmbeddingStore
    from btoks_jax.model_config import PRESETS

    if args.tiny:
        args.pages, args.queries, args.width = 200, 50, 256
    result = {"pages": args.pages, "queries": args.queries, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        rows, corpus = make_corpus(tmp / "pages", args.pages, args.queries)
        result["corpus_write_s"] = time.perf_counter() - t
        model = build.build(PRESETS["tiny"], num_btoks=4, progress=False)
        embedder = Embedder.for_model(model)
        fn = lambda items: embedder.embed_items(items, batch_size=args.batch_size, progress=False)  # noqa: E731
        fingerprint = embedder.fingerprint()
        fn(list(corpus[: args.batch_size]))  # compile outside the timing
        passes = []
        for label in ("first pass", "from the store"):
            cache = EmbeddingCache(fn, args.batch_size, progress=False,
                                   store=EmbeddingStore(tmp / "store", fingerprint))
            t = time.perf_counter()
            scores = evaluate_dataset(rows, cache, "global", corpus=corpus, progress=False)
            seconds = time.perf_counter() - t
            passes.append({"pass": label, "seconds": seconds, "embedded": cache.embedded,
                           "items_per_s": (len(corpus) + len(rows)) / seconds, "peak_rss_mib": peak_rss_mib(),
                           "ndcg_linear@5": scores["ndcg_linear@5"]})
            print(f"{label:>15}: {seconds:7.2f} s, {cache.embedded} items embedded, "
                  f"{passes[-1]['items_per_s']:8.1f} items/s, peak RSS {passes[-1]['peak_rss_mib']:.0f} MiB")
        assert passes[0]["ndcg_linear@5"] == passes[1]["ndcg_linear@5"], "the store changed the scores"
        result["embedding"] = passes
        result["store_speedup"] = passes[0]["seconds"] / passes[1]["seconds"]
        print(f"store speed-up: {result['store_speedup']:.1f}x (second pass re-embeds nothing)")

    rng = np.random.default_rng(1)
    ranking = []
    for width in (model.config.text_config.hidden_size, args.width):
        queries = rng.normal(size=(args.queries, width)).astype(np.float32)
        pages = rng.normal(size=(args.pages, width)).astype(np.float32)
        qrels = [{int(rng.integers(args.pages)): 1.0} for _ in range(args.queries)]
        times = {"blocked": [], "dense": []}
        for _ in range(3):  # interleaved repeats, median
            t = time.perf_counter()
            blocked = metrics.global_ranking_metrics(queries, pages, qrels, query_block=256, corpus_block=4096)
            times["blocked"].append(time.perf_counter() - t)
            dense_grades = np.zeros((args.queries, args.pages))
            for q, rels in enumerate(qrels):
                for i, g in rels.items():
                    dense_grades[q, i] = g
            t = time.perf_counter()
            dense = metrics.ranking_metrics(metrics.cosine_scores(queries, pages), dense_grades)
            times["dense"].append(time.perf_counter() - t)
            assert abs(blocked["ndcg_linear@5"] - dense["ndcg_linear@5"]) < 1e-12
        med = {k: float(np.median(v)) for k, v in times.items()}
        entry = {"width": width, "blocked_s": med["blocked"], "dense_s": med["dense"],
                 "blocked_over_dense": med["blocked"] / med["dense"],
                 "scores_per_s": args.queries * args.pages / med["blocked"],
                 "dense_matrix_bytes": args.queries * args.pages * 8 * 3,  # scores, grades, sort keys (float64)
                 "peak_rss_mib": peak_rss_mib()}
        ranking.append(entry)
        print(f"ranking D={width:5d}: blocked {med['blocked']:.2f} s ({entry['scores_per_s'] / 1e6:.1f} M scores/s), "
              f"dense {med['dense']:.2f} s, blocked/dense {entry['blocked_over_dense']:.2f}x; a dense pass holds "
              f"~{entry['dense_matrix_bytes'] / 2**20:.0f} MiB of [Q, N] float64 arrays, blocked "
              f"{min(256, args.queries) * min(4096, args.pages) * 8 * 3 / 2**20:.0f} MiB")
    result["ranking"] = ranking
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
