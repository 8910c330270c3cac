"""`btoks eval`: evaluate an embedder on every MMEB-V2-format data set of a folder.

Each `.jsonl` / `.parquet` file of the folder (a `_test` suffix is dropped from the name) is one
data set; its ranking (local or global) and main metric come from the MMEB-V2 map when the name is
known there, else ranking is local. Scores are written per data set as VLM2Vec's
`{dataset}_score.json`, plus `summary.json` with the meta-task / modality / Overall aggregation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from btoks_jax.evaluate import mmeb

EVAL_SUFFIXES = (".jsonl", ".parquet")


def discover(data_dir: str | os.PathLike, datasets: Sequence[str] | None = None,
             pattern_suffix: str = "_test") -> dict[str, Path]:
    """{data set name: file} for the evaluation files of a folder (optionally only `datasets`)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such evaluation folder")
    found = {}
    for path in sorted(root.iterdir()):
        if path.suffix not in EVAL_SUFFIXES or path.stem.endswith("_train"):
            continue
        name = path.stem[: -len(pattern_suffix)] if path.stem.endswith(pattern_suffix) else path.stem
        found[name] = path
    if datasets:
        missing = [d for d in datasets if d not in found]
        if missing:
            raise FileNotFoundError(f"{data_dir}: no evaluation file for {missing} (found {sorted(found)})")
        found = {d: found[d] for d in datasets}
    if not found:
        raise FileNotFoundError(f"{data_dir}: no *.jsonl or *.parquet evaluation files")
    return found


def ranking_of(name: str) -> str:
    spec = mmeb.MMEB_V2_BY_NAME.get(mmeb.canonical_name(name))
    return spec.ranking if spec is not None else "local"


def evaluate_folder(embed_fn: Callable[[Sequence[mmeb.Item]], np.ndarray], data_dir: str | os.PathLike, *,
                    out_dir: str | os.PathLike | None = None, datasets: Sequence[str] | None = None,
                    batch_size: int = 16, progress: bool = True, max_rows: int | None = None) -> dict:
    """Scores every data set of `data_dir`; returns the summary (and writes files when `out_dir`)."""
    scores = {}
    for name, path in discover(data_dir, datasets).items():
        rows = mmeb.read_eval_rows(path, data_dir)
        if max_rows:
            rows = rows[:max_rows]
        scores[name] = mmeb.evaluate_dataset(rows, embed_fn, ranking_of(name), batch_size, progress=progress,
                                             name=name)
        if out_dir is not None:
            mmeb.write_score_file(out_dir, name, scores[name])
    summary = mmeb.summarize(scores)
    summary["datasets"] = scores
    if out_dir is not None:
        mmeb.write_summary(Path(out_dir) / "summary.json", summary)
    return summary
