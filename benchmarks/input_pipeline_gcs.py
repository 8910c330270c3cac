"""Input-pipeline throughput reading the training data from Cloud Storage (an emulator) versus from local disk.

    python benchmarks/input_pipeline_gcs.py [--concepts N] [--batch 32] [--batches 20] [--threads 1,8]
                                            [--repeats 3] [--tiny] [--out result.json]

The embedded emoji data set (`btoks_jax.data.emoji_dataset`, `--concepts` of its concepts, all by default) is built
in a temporary folder and uploaded to a fake-gcs-server that the script starts itself (`tests/gcs_emulator.py`,
the test suite's emulator; it needs the `test` extra). Then the trainer's own pipeline,
`btoks_jax.data.pipeline.TrainBatchIterator` over the three emoji training sets with the data settings of
`configs/tiny_cpu.py` (batch `--batch`, `--threads` grain read threads, 2 batches of prefetch), is run over the
same rows read two ways, side by side: the local folder, and the `gs://` URL of its copy (rows streamed, image
existence checked by one listing per folder, every image read in the pipeline's read threads, as in training).

Per thread count, after one untimed warm-up run, the sources are interleaved within each repeat (their order
alternating) and each figure is the median over `--repeats`: the time to open the data sets (read the rows, check
the images), the first batch (read threads starting), then batches/s and rows/s over `--batches` more batches, and
the ratio gcs / local. The two sources must give identical batches (checked on every batch). The emulator answers
on 127.0.0.1, so this measures what the Cloud Storage client path costs (HTTP requests, no disk cache), not the
latency of a real bucket, which is larger per request (tens of milliseconds for a first byte) and is hidden by
the same read threads only as far as there are enough of them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=0, help="emoji concepts to keep (0: all of them)")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--batches", type=int, default=20, help="batches timed after the first")
    p.add_argument("--threads", default="1,8", help="comma-separated grain read thread counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke run (20 concepts, 2 batches, 1 repeat)")
    p.add_argument("--out", default="", help="write the result as JSON here")
    return p.parse_args(argv)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch_digest(batch) -> str:
    """A digest of everything a batch holds (both sides' arrays, data set and row ids)."""
    import jax
    import numpy as np

    digest = hashlib.sha256()
    for side in (batch.query, batch.positive):
        for value in (*jax.tree.leaves(side.inputs), side.labels, side.label_mask):
            if value is not None:
                digest.update(np.ascontiguousarray(value).tobytes())
    digest.update(batch.dataset_ids.tobytes())
    digest.update(batch.row_ids.tobytes())
    return digest.hexdigest()


def _new_threads(before: set) -> list:
    return [t for t in threading.enumerate() if t not in before and not t.name.startswith(("fsspec", "gcsfs"))]


def run_once(datasets, pipeline_cfg, model_cfg, tokenizer, batches: int) -> dict:
    from btoks_jax.data.pipeline import TrainBatchIterator

    before = set(threading.enumerate())
    t = time.perf_counter()
    data = TrainBatchIterator(datasets, pipeline_cfg, model_cfg, tokenizer)
    open_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        digests = [_batch_digest(next(data))]
        first_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(batches):
            digests.append(_batch_digest(next(data)))
        seconds = time.perf_counter() - t
    finally:
        data.close()
        # The pipeline's read threads finish their reads in flight before the next run starts (and before the
        # emulator stops); the Cloud Storage client's own threads (fsspecIO, gcsfs-...) live on.
        deadline = time.monotonic() + 30
        while _new_threads(before) and time.monotonic() < deadline:
            time.sleep(0.05)
    return {"open_s": open_s, "first_batch_s": first_s, "seconds": seconds, "batches_per_s": batches / seconds,
            "rows_per_s": batches * pipeline_cfg.global_batch_size / seconds, "digests": digests}


def main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from btoks_jax import build, fs
    from btoks_jax.data.emoji_dataset import build_emoji_dataset
    from btoks_jax.data.mmeb_train import DatasetSpec
    from btoks_jax.processing import load_tokenizer
    from btoks_jax.train_config import emoji_datasets

    if args.tiny:
        args.concepts, args.batches, args.repeats = 20, 2, 1
        args.batch = min(args.batch, 8)
    threads = [int(n) for n in args.threads.split(",") if n.strip()]
    emulator_module = _load("gcs_emulator", REPO / "tests" / "gcs_emulator.py")
    config = _load("tiny_cpu", REPO / "configs" / "tiny_cpu.py").get_config("runlocal")
    model_cfg = build.model_config(config.model.to_dict())
    tokenizer = load_tokenizer()
    result = {"benchmark": "input_pipeline_gcs", "tiny": bool(args.tiny), "batch": args.batch,
              "batches": args.batches, "repeats": args.repeats, "machine": platform.machine(),
              "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp, emulator_module.running_emulator() as emulator:
        local = Path(tmp) / "emoji"
        t = time.perf_counter()
        build_emoji_dataset(local, max_concepts=args.concepts or None)
        result["build_s"] = time.perf_counter() - t
        url = f"gs://{emulator_module.BUCKET}/bench/emoji"
        t = time.perf_counter()
        uploaded = fs.copy_tree(local, url)
        result["upload_s"] = time.perf_counter() - t
        result["files"] = len(uploaded)
        sources = {"local": str(local), "gcs": url}
        specs = {name: [DatasetSpec(**d) for d in emoji_datasets(root)] for name, root in sources.items()}
        print(f"emoji data set: {len(uploaded)} files, uploaded to {url} on {emulator.url} in "
              f"{result['upload_s']:.1f} s; batch {args.batch}, {args.batches} timed batches, {args.repeats} repeats")
        print(f"{'threads':>7} {'source':>6} {'open s':>8} {'1st batch s':>11} {'batches/s':>10} {'rows/s':>9}")
        try:
            measure(args, threads, config, specs, model_cfg, tokenizer, result)
        except BaseException:
            if emulator.process is None or emulator.process.poll() is not None:
                print(f"the emulator stopped; its log:\n{emulator.log_tail()}", file=sys.stderr)
            raise
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def measure(args, threads, config, specs, model_cfg, tokenizer, result) -> None:
    """Per thread count: the interleaved repeats over both sources, their medians and ratios (into `result`)."""
    from btoks_jax.train import pipeline_config

    sources = list(specs)
    for n in threads:
        config.data = dict(config.data.to_dict(), global_batch_size=args.batch, subbatch_size=args.batch,
                           num_threads=n, prefetch_batches=2)
        pipeline_cfg = pipeline_config(config)
        runs = {name: [] for name in sources}
        run_once(specs["local"], pipeline_cfg, model_cfg, tokenizer, 1)  # untimed: imports, thread start-up
        for repeat in range(args.repeats):
            for name in sources if repeat % 2 == 0 else sources[::-1]:
                runs[name].append(run_once(specs[name], pipeline_cfg, model_cfg, tokenizer, args.batches))
        for i in range(args.repeats):
            if runs["local"][i]["digests"] != runs["gcs"][i]["digests"]:
                raise AssertionError("the batches read from the bucket differ from the local ones")
        entry = {"threads": n}
        for name in sources:
            med = {k: statistics.median(r[k] for r in runs[name])
                   for k in ("open_s", "first_batch_s", "batches_per_s", "rows_per_s")}
            entry[name] = med
            print(f"{n:>7} {name:>6} {med['open_s']:8.3f} {med['first_batch_s']:11.3f} "
                  f"{med['batches_per_s']:10.2f} {med['rows_per_s']:9.1f}")
        entry["gcs_over_local_rows_per_s"] = entry["gcs"]["rows_per_s"] / entry["local"]["rows_per_s"]
        entry["gcs_over_local_open_s"] = entry["gcs"]["open_s"] / entry["local"]["open_s"]
        print(f"{n:>7} {'ratio':>6} {entry['gcs_over_local_open_s']:8.2f} {'':>11} "
              f"{entry['gcs_over_local_rows_per_s']:10.2f} {entry['gcs_over_local_rows_per_s']:9.2f}"
              "   (gcs / local; batches identical)")
        result["runs"].append(entry)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
