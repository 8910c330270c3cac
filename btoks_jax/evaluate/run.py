"""`btoks eval`: evaluate an embedder on every MMEB-V2-format data set of a folder.

Each `.jsonl` / `.parquet` file of the folder (a `_test` suffix is dropped from the name) is one
data set; its ranking (local or global) and main metric come from the MMEB-V2 map when the name is
known there, else ranking is local. Scores are written per data set as VLM2Vec's
`{dataset}_score.json`, plus `summary.json` with the meta-task / modality / Overall aggregation.
Every folder (data, scores, the MMEB-V2 root, extracted media) may be local or a `gs://` URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from btoks_jax import fs
from btoks_jax.evaluate import mmeb

EVAL_SUFFIXES = (".jsonl", ".parquet")


def discover(data_dir: str | os.PathLike, datasets: Sequence[str] | None = None,
             pattern_suffix: str = "_test") -> dict[str, Path | str]:
    """{data set name: file} for the evaluation files of a folder (optionally only `datasets`); a local folder
    gives `Path`s, a URL (`gs://BUCKET/eval`) URL strings."""
    if fs.is_remote(data_dir):
        if not fs.isdir(data_dir):
            raise FileNotFoundError(f"{data_dir}: no such evaluation folder")
        paths = [fs.join(data_dir, name) for name in fs.listdir(data_dir)]
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{data_dir}: no such evaluation folder")
        paths = sorted(root.iterdir())
    found = {}
    for path in paths:
        stem, suffix = os.path.splitext(fs.basename(path))
        if suffix not in EVAL_SUFFIXES or stem.endswith("_train"):
            continue
        name = stem[: -len(pattern_suffix)] if stem.endswith(pattern_suffix) else stem
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
                    batch_size: int = 16, progress: bool = True, max_rows: int | None = None,
                    allow_outside_root: bool = False) -> dict:
    """Scores every data set of `data_dir`; returns the summary (and writes files when `out_dir`). Media paths
    of the rows must stay inside `data_dir` unless `allow_outside_root` (`mmeb.read_eval_rows`)."""
    scores = {}
    for name, path in discover(data_dir, datasets).items():
        rows = mmeb.read_eval_rows(path, data_dir, allow_outside_root=allow_outside_root)
        if max_rows:
            rows = rows[:max_rows]
        scores[name] = mmeb.evaluate_dataset(rows, embed_fn, ranking_of(name), batch_size, progress=progress,
                                             name=name)
        if out_dir is not None:
            mmeb.write_score_file(out_dir, name, scores[name])
    summary = mmeb.summarize(scores)
    summary["datasets"] = scores
    if out_dir is not None:
        mmeb.write_summary(fs.joinpath(out_dir, "summary.json"), summary)
    return summary


# ===================================== MMEB-V2 in its published layouts =====================================


def evaluate_mmeb_v2(embed_fn: Callable[[Sequence[mmeb.Item]], np.ndarray], root: str | os.PathLike,
                     out_dir: str | os.PathLike, *, style: str, media_dir: str | os.PathLike,
                     store=None, datasets: Sequence[str] | None = None, batch_size: int = 16,
                     max_rows: int | None = None, overwrite: bool = False, model_name: str = "btoks-jax",
                     progress: bool = True, log=print, allow_outside_media: bool = False) -> dict:
    """Scores every MMEB-V2 data set found under `root` (the layout of `btoks_jax.evaluate.published.common`).

    Writes VLM2Vec's files: `out_dir/<image|video|visdoc>/<Dataset>_score.json` per data set (an existing one is
    reused unless `overwrite`, so an interrupted run resumes where it stopped), the leaderboard JSON its reporter
    (`experiments/report_score_v2.py`) writes, `out_dir/<model_name>.json`, and `out_dir/summary.json` with the
    meta-task / modality / Overall means and the list of missing data sets.

    Args:
      embed_fn: `embed_fn(items) -> float[B, D]`.
      root: the download root (local or a URL).
      out_dir: where the score files go (local or a URL).
      style: prompt style of the readers' surface forms ("vlm2vec" or "btoks"; the model's own).
      media_dir: where inline images (document pages) are written once (local or a URL).
      store: an `EmbeddingStore` shared by all data sets (candidates embedded once, across runs too).
      datasets: only these names (default: all 78).
      max_rows: first rows of each data set only (a partial score, for smoke runs).
      allow_outside_media: accept items whose media leave `root` and `media_dir` (`check_task_media`).
    Returns:
      the summary, with "missing" = {name: why} for the sets not found.
    """
    from btoks_jax.evaluate import published

    loaders = published.loaders()
    names = list(loaders)
    if datasets:
        unknown = [mmeb.canonical_name(d) for d in datasets if mmeb.canonical_name(d) not in loaders]
        if unknown:
            raise ValueError(f"not MMEB-V2 data sets: {unknown}")
        wanted = {mmeb.canonical_name(d) for d in datasets}
        names = [n for n in names if n in wanted]
    out_dir, media_dir, root = fs.as_path(out_dir), fs.as_path(media_dir), fs.as_path(root)
    cache = mmeb.EmbeddingCache(embed_fn, batch_size, progress, store=store)
    scores, missing = {}, {}
    for name in names:
        spec = mmeb.MMEB_V2_BY_NAME[name]
        path = fs.joinpath(out_dir, spec.modality, f"{name}_score.json")
        if fs.isfile(path) and not overwrite:
            scores[name] = json.loads(fs.read_text(path))
            log(f"{name}: reusing {path}")
            continue
        try:
            task = loaders[name](root, style, media_dir)
        except published.MissingData as err:
            missing[name] = str(err)
            continue
        if task.ranking != spec.ranking:
            raise RuntimeError(f"{name}: the reader ranks {task.ranking}, the MMEB-V2 map says {spec.ranking}")
        if not allow_outside_media:
            check_task_media(task, name, (root, media_dir))
        rows = task.rows[:max_rows] if max_rows else task.rows
        before = cache.embedded
        scores[name] = mmeb.evaluate_dataset(rows, cache, task.ranking, corpus=task.corpus, progress=progress,
                                             name=name)
        mmeb.write_score_file(fs.parent(path), name, scores[name])
        log(f"{name}: {spec.metric} {100 * scores[name][spec.metric]:.2f} ({len(rows)} queries, "
            f"{len(task.corpus)} corpus items, {cache.embedded - before} items embedded)")
    summary = mmeb.summarize(scores)
    summary["missing"] = missing
    mmeb.write_summary(fs.joinpath(out_dir, "summary.json"), summary)
    mmeb.write_summary(fs.joinpath(out_dir, f"{model_name}.json"), leaderboard(scores, model_name))
    return summary


def check_task_media(task, name: str, roots: Sequence[str | os.PathLike]) -> None:
    """Raises ValueError when an item of a published set's `task` names an image or frame outside every one of
    `roots` (the download root and the folder extracted pages go to): the paths come from the downloaded
    annotations, which are data (`btoks_jax.data.media.outside_root`: an absolute path, a `..` leading out, a
    symbolic link pointing out; URLs checked for `..` segments only; `check_inside`, the reason given being the
    first root's). Each distinct path is checked once."""
    from btoks_jax.data.media import OUTSIDE_HINT, OutsidePathError, check_inside

    first, *others = roots
    seen: set[str] = set()

    def check(path: str | None, where: str) -> None:
        if path is None or path in seen:
            return
        try:
            check_inside(first, _relative(path, first), path, also=others)
        except OutsidePathError as err:
            raise ValueError(f"{where}: media path {path} is outside the MMEB-V2 folders "
                             f"{', '.join(map(str, roots))} ({err.reason}); {OUTSIDE_HINT}") from None
        seen.add(path)

    for number, row in enumerate(task.rows, start=1):
        for label, item in [("query", row.query)] + [(f"candidate {j}", c) for j, c in enumerate(row.candidates, 1)]:
            for path in (item.image, *(item.video or ())):
                check(path, f"{name}: row {number}: {label}")
    for item in task.corpus:
        for path in (item.image, *(item.video or ())):
            check(path, f"{name}: corpus")


def _relative(path: str, root: str | os.PathLike) -> str:
    """`path` as a value under `root` would spell it (what `outside_root` judges `..` and absolute paths by)."""
    if fs.is_remote(path) or fs.is_remote(root):
        return path
    return os.path.relpath(path, os.fspath(root))


# The reporter's file-level gaps and its renaming of the two re-paged OOD sets (report_score_v2.py).
_NOT_FOUND = "FILE_N/A"
_REPORTER_RENAMES = {"ViDoSeek-page": "ViDoSeek-page-fixed", "MMLongBench-page": "MMLongBench-page-fixed"}


def leaderboard(scores: dict[str, dict], model_name: str) -> dict:
    """The JSON VLM2Vec's `report_score_v2.py` writes: metadata, then metrics by modality, each of the reporter's
    data sets mapped to its score dict or "FILE_N/A"."""
    import datetime

    metrics: dict[str, dict] = {"image": {}, "video": {}, "visdoc": {}}
    for spec in mmeb.MMEB_V2_DATASETS:
        key = _REPORTER_RENAMES.get(spec.name, spec.name) if spec.modality == "visdoc" else spec.name
        metrics[spec.modality][key] = scores.get(spec.name, _NOT_FOUND)
    return {"metadata": {"model_name": model_name,
                         "report_generated_date": datetime.datetime.now().isoformat()},
            "metrics": metrics}
