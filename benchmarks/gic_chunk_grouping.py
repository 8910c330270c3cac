"""How the grouping of GradCache chunks changes the authors' GIC normalisation ("chunk_token_mean").

The recipe's GIC loss is a token mean inside each chunk of 8 samples, weighted by the chunk's generating samples
over the per-device batch. Which samples share a chunk therefore changes how much each sample's tokens weigh. Here
a chunk is 8 consecutive rows of the mixture's order (device-local when 8 divides the per-device batch); the
authors' trainer may sort a device's rows by length first. This script measures the difference on real batches of
the embedded emoji mixture (three sets, captions and class names, so target lengths vary) run through the
recipe's pipeline:

    python benchmarks/gic_chunk_grouping.py [--batches 8] [--global-batch 128] [--devices 1]

For every batch and generating side it prints, under both groupings, the spread of per-sample weights (max / min
over the generating samples; 1.0 would be the length-independent "sample_mean") and how far the two weightings
are apart (half the L1 distance of the per-sample weight vectors, as a fraction of the total weight). Nothing is
trained; only the label masks enter the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=8, help="batches of the mixture to measure")
    p.add_argument("--global-batch", type=int, default=128, help="rows per batch (the recipe: 1024)")
    p.add_argument("--devices", type=int, default=1, help="devices the batch is split over (the authors: 8 GPUs)")
    p.add_argument("--chunk", type=int, default=8, help="GIC chunk per device (the recipe: 8)")
    p.add_argument("--data-dir", default="", help="where the emoji data set is (built on first use)")
    return p.parse_args(argv)


def sample_weights(mask: np.ndarray, chunk: int) -> np.ndarray:
    """float64[B]: each sample's total token weight under chunk_token_mean (losses.ntp_token_weights)."""
    import jax.numpy as jnp

    from btoks_jax import losses

    (w,) = losses.ntp_token_weights([jnp.asarray(mask)], reduction="chunk_token_mean", chunk_size=chunk)
    return np.asarray(w, np.float64).sum(-1)


def length_sorted(mask: np.ndarray, devices: int) -> np.ndarray:
    """The rows of each device's slice ordered by target length (longest first), devices kept apart."""
    per = len(mask) // devices
    order = np.concatenate([d * per + np.argsort(-mask[d * per:(d + 1) * per].sum(-1), kind="stable")
                            for d in range(devices)])
    return order


def compare(mask: np.ndarray, chunk: int, devices: int) -> dict[str, float]:
    lengths = mask.sum(-1)
    gen = lengths > 0
    w_mix = sample_weights(mask, chunk)
    order = length_sorted(mask, devices)
    w_sorted = np.empty_like(w_mix)
    w_sorted[order] = sample_weights(mask[order], chunk)  # back in the rows' own order
    spread = lambda w: float(w[gen].max() / w[gen].min())  # noqa: E731
    return {
        "generating": int(gen.sum()),
        "target_tokens_min_max": (int(lengths[gen].min()), int(lengths[gen].max())),
        "spread_mixture": spread(w_mix),
        "spread_sorted": spread(w_sorted),
        "distance": float(0.5 * np.abs(w_mix - w_sorted).sum() / w_mix.sum()),
        "total_mixture": float(w_mix.sum()),
        "total_sorted": float(w_sorted.sum()),
    }


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "configs"))
    import importlib.util

    from btoks_jax import build, train
    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.data.pipeline import TrainBatchIterator
    from btoks_jax.processing import load_tokenizer

    spec = importlib.util.spec_from_file_location("qwen2vl_2b", REPO / "configs" / "qwen2vl_2b.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.get_config("runlocal" + (f",data_root={args.data_dir}" if args.data_dir else ""))
    config.data.global_batch_size = args.global_batch
    config.data.subbatch_size = args.global_batch // 2  # two data sets a batch, as 512 of 1024 in the recipe
    if args.global_batch % (args.devices * args.chunk):
        raise SystemExit("--global-batch must be a multiple of --devices x --chunk")
    train.prepare_data(config)
    model_cfg = build.model_config(config.model.to_dict())
    data = TrainBatchIterator([DatasetSpec(**d) for d in config.data.to_dict()["datasets"]],
                              train.pipeline_config(config), model_cfg, load_tokenizer())
    print(f"GIC chunk_token_mean: chunks of {args.chunk} rows in the mixture's order vs length-sorted within each "
          f"of {args.devices} device(s); batches of {args.global_batch} from the emoji mixture")
    head = f"{'batch':>5} {'side':>9} {'gen':>5} {'tokens':>9} {'spread mix':>11} {'spread sorted':>14} {'apart':>7}"
    print(head)
    print("-" * len(head))
    apart = []
    try:
        for b in range(args.batches):
            tb = next(data)
            # query.label_mask scores the positive's text; positive.label_mask the query's.
            for side, packed in (("positive", tb.query), ("query", tb.positive)):
                mask = np.asarray(packed.label_mask, bool)
                if not mask.shape[1] or not mask.any():
                    continue
                r = compare(mask, args.chunk, args.devices)
                apart.append(r["distance"])
                lo, hi = r["target_tokens_min_max"]
                print(f"{b:>5} {side:>9} {r['generating']:>5} {f'{lo}-{hi}':>9} {r['spread_mixture']:>11.2f} "
                      f"{r['spread_sorted']:>14.2f} {r['distance']:>7.1%}")
    finally:
        data.close()
    if apart:
        print(f"mean fraction of the GIC weight that moves between samples: {np.mean(apart):.1%} "
              f"(max {np.max(apart):.1%}); spread 1.00 = every generating sample weighs the same")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
