"""Shared by the side-by-side benchmarks: interleaved timing, medians and ratios, the machine, JSON records.

Every comparison runs its sides in one process, interleaved (A B, then B A, ...), several repeats each, and
reports medians and the ratio of medians (plus the median of the per-repeat ratios, which cancels slow drifts of
a shared machine). An absolute time is never the result on its own: it only says what the ratio is made of.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def machine() -> dict:
    """Where and when the numbers were measured: UTC time, usable cores, CPU model, load, library versions."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "nproc": cores, "cpu_model": model or platform.processor(), "python": platform.python_version(),
            # Other processes compete for the cores: the 1, 5 and 15 minute load averages when the record was made.
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    import jax

    info.update(jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count())
    torch = sys.modules.get("torch")  # only when the benchmark uses it
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of every function, `repeats` times each, the sides interleaved and their order reversed on
    every other repeat. Each function must block until its work is done (`jax.block_until_ready`)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> dict:
    """The ratio numerator / denominator: of the medians, and the median of the per-repeat ratios."""
    a, b = times[numerator], times[denominator]
    return {"of_medians": statistics.median(a) / statistics.median(b),
            "median_of_pairs": statistics.median(x / y for x, y in zip(a, b))}


def summary(times: Mapping[str, list[float]]) -> dict[str, dict]:
    """Per side: the median, min and max seconds and every repeat."""
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats_s": list(t)}
            for name, t in times.items()}


def write_json(path: str | os.PathLike | None, record: dict) -> None:
    """The record as a JSON file (nothing when no path is given)."""
    if path is None:
        return
    Path(path).write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def one_core() -> int:
    """Pins this process to one core (its first allowed CPU) and asks XLA and torch for one thread each: a
    comparison that other processes on a shared machine disturb less than two thread pools competing for the
    same cores. Must run before jax is imported. Returns the core."""
    if "jax" in sys.modules:
        raise RuntimeError("one_core() must run before jax is imported")
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    return core
