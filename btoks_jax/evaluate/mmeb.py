"""MMEB-V2 evaluation: the 78-dataset map, a reader for evaluation rows, cached embedding, scoring and reports.

The dataset names, meta-tasks, main metrics and local/global ranking follow TIGER-Lab's VLM2Vec evaluation
configs (`experiments/public/eval/{image,video,visdoc}.yaml`) and its score reporter (`report_score_v2.py`).
Score files keep VLM2Vec's `{dataset}_score.json` shape, so either side's files can be aggregated here.

The model stays outside: `evaluate_dataset` takes `embed_fn(items: list[Item]) -> float[B, D]`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from btoks_jax import fs
from btoks_jax.data.media import (
    RowError,
    first_present,
    image_path,
    iter_records,
    string_field,
    string_list_field,
    video_frames,
)
from btoks_jax.evaluate.metrics import DEFAULT_KS, global_ranking_metrics, local_ranking_metrics
from btoks_jax.processing.image import MediaError

# ===================================== the MMEB-V2 dataset map =====================================

MODALITY_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str  # image | video | visdoc
    meta_task: str  # e.g. "CLS"; unique only together with the modality
    ranking: str  # local: own candidate list; global: the whole corpus

    @property
    def metric(self) -> str:
        return MODALITY_METRIC[self.modality]

    @property
    def group(self) -> str:
        return f"{self.modality}/{self.meta_task}"


def _specs(modality: str, meta_task: str, ranking: str, names: str) -> list[DatasetSpec]:
    return [DatasetSpec(name, modality, meta_task, ranking) for name in names.split()]


# Order and names as in VLM2Vec's reporter; the meta-task split follows the MMEB-V2 paper's tables.
MMEB_V2_DATASETS: tuple[DatasetSpec, ...] = tuple(
    _specs("image", "CLS", "local",
           "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R ObjectNet Country211")
    + _specs("image", "QA", "local",
             "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA")
    + _specs("image", "RET", "local",
             "VisDial CIRR VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA FashionIQ Wiki-SS-NQ "
             "OVEN EDIS")
    + _specs("image", "GD", "local", "MSCOCO RefCOCO RefCOCO-Matching Visual7W-Pointing")
    # Video classification: Something-Something V2 ranks each clip's own candidate list, the others the full label set.
    + _specs("video", "CLS", "global", "K700")
    + _specs("video", "CLS", "local", "SmthSmthV2")
    + _specs("video", "CLS", "global", "HMDB51 UCF101 Breakfast")
    + _specs("video", "QA", "local", "MVBench Video-MME NExTQA EgoSchema ActivityNetQA")
    + _specs("video", "RET", "global", "DiDeMo MSR-VTT MSVD VATEX YouCook2")
    + _specs("video", "MRET", "local", "QVHighlight Charades-STA MomentSeeker")
    + _specs("visdoc", "ViDoRe-V1", "global",
             "ViDoRe_arxivqa ViDoRe_docvqa ViDoRe_infovqa ViDoRe_tabfquad ViDoRe_tatdqa ViDoRe_shiftproject "
             "ViDoRe_syntheticDocQA_artificial_intelligence ViDoRe_syntheticDocQA_energy "
             "ViDoRe_syntheticDocQA_government_reports ViDoRe_syntheticDocQA_healthcare_industry")
    + _specs("visdoc", "ViDoRe-V2", "global",
             "ViDoRe_esg_reports_human_labeled_v2 ViDoRe_biomedical_lectures_v2_multilingual "
             "ViDoRe_economics_reports_v2_multilingual ViDoRe_esg_reports_v2_multilingual")
    + _specs("visdoc", "VisRAG", "global",
             "VisRAG_ArxivQA VisRAG_ChartQA VisRAG_MP-DocVQA VisRAG_SlideVQA VisRAG_InfoVQA VisRAG_PlotQA")
    + _specs("visdoc", "OOD", "global", "ViDoSeek-page ViDoSeek-doc MMLongBench-page MMLongBench-doc")
)
MMEB_V2_BY_NAME: dict[str, DatasetSpec] = {spec.name: spec for spec in MMEB_V2_DATASETS}
# Other spellings seen in VLM2Vec outputs: its config's HF name for K700, and the reporter's "-fixed" suffix on
# the two re-paged OOD sets (the corrected page-level versions behind the published numbers).
DATASET_ALIASES = {"Kinetics-700": "K700", "ViDoSeek-page-fixed": "ViDoSeek-page",
                   "MMLongBench-page-fixed": "MMLongBench-page"}


def canonical_name(name: str) -> str:
    return DATASET_ALIASES.get(name, name)


# ===================================== evaluation rows =====================================


@dataclasses.dataclass(frozen=True)
class Item:
    """One query or candidate as the embedding function sees it; hashable, so it is its own cache key.

    `instruction` is the raw MMEB instruction (it may still hold the `<|image_1|>` placeholder, which the
    prompt builder replaces). Paths are resolved against the data folder. `video` holds every frame path found;
    picking the frames to feed (e.g. 8 evenly spaced) is the model side's choice.
    """

    text: str
    image: str | None = None
    video: tuple[str, ...] | None = None
    instruction: str = ""

    @property
    def kind(self) -> str:
        return "video" if self.video else "image" if self.image else "text"


class ItemError(RowError):
    """An item that cannot be embedded: an image or frame that cannot be read, frames of different sizes, ...

    `field` is the part of the item at fault ("image" or "video"), `index` its position in the items an embedding
    call was given, `item` the item itself; the readers turn it into `{file}: row {n}: field '{field}': ...`
    (`RowError.at`, `evaluate_dataset`)."""

    def __init__(self, field: str, message: str, *, index: int | None = None, item: Item | None = None):
        super().__init__(field, message)
        self.index, self.item = index, item

    def __str__(self) -> str:
        where = f"item {self.index}: " if self.index is not None else ""
        return f"{where}field '{self.field}': {self.message}"


@dataclasses.dataclass(frozen=True)
class EvalRow:
    query: Item
    candidates: tuple[Item, ...]
    relevance: tuple[float, ...]  # one grade per candidate; > 0 means relevant
    # "{file}: row {n}" and the row's video field names, to name the row of an item that cannot be embedded;
    # not part of a row's identity.
    source: str = dataclasses.field(default="", compare=False)
    video_fields: tuple[str, str] = dataclasses.field(default=("qry_video_path", "tgt_video_path"), compare=False)


def read_eval_rows(path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                   check_files: bool = True, allow_outside_root: bool = False) -> list[EvalRow]:
    """Reads MMEB-V2-format evaluation rows from `.jsonl` or `.parquet`.

    Fields: `qry_inst`, `qry_text`, `qry_img_path` (str, "" or null for none), `tgt_inst`, `tgt_text` (list),
    `tgt_img_path` (list of the same length; "" or null entries for text candidates; may be absent).
    Optional: `qrels` (one grade per listed candidate; default: the first is the only positive), video frames as
    `qry_video_path` / `qry_frame_paths` (a folder of frame images or a list of frame paths) and
    `tgt_video_path` / `tgt_frame_paths` (one such entry per candidate).

    Args:
      path: the file (local, or a URL such as `gs://BUCKET/eval/x_test.jsonl`).
      data_dir: folder the relative media paths start from (default: the file's folder); local or a URL.
      check_files: verify that every image / frame exists (for URLs: one listing per folder).
      allow_outside_root: read media paths that leave `data_dir` (an absolute path, a `..` leading out, a
        symbolic link pointing out; `btoks_jax.data.media.outside_root`), refused by default.
    Raises:
      ValueError naming the file, the 1-based row number and the field of the first bad row (a missing or wrongly
      typed field, a query with no content, a missing image or frame, a video of fewer than
      `btoks_jax.data.media.MIN_VIDEO_FRAMES` frames, a media path outside `data_dir`). No row is skipped:
      every query is scored.
    """
    path = fs.as_path(path)
    data_dir = fs.as_path(data_dir) if data_dir is not None else fs.parent(path)
    files = fs.FileIndex()
    rows = []
    for number, record in iter_records(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: row {number}: expected a JSON object, got {type(record).__name__}")
        source = f"{path}: row {number}"
        try:
            rows.append(_parse_row(record, data_dir, check_files, files, allow_outside_root, source))
        except RowError as err:
            raise err.at(source) from None
    return rows


def _parse_row(record: dict, data_dir: Path | str, check_files: bool, files: fs.FileIndex | None = None,
               allow_outside_root: bool = False, source: str = "") -> EvalRow:
    media = {"check_files": check_files, "files": files, "allow_outside_root": allow_outside_root}
    texts = string_list_field(record, "tgt_text", required=True)
    if not texts:
        raise RowError("tgt_text", "empty candidate list")
    num = len(texts)
    images = string_list_field(record, "tgt_img_path", required=False) or [None] * num
    if len(images) != num:
        raise RowError("tgt_img_path", f"{len(images)} entries but tgt_text has {num}")
    video_field, videos = first_present(record, "tgt_video_path", "tgt_frame_paths")
    videos = [None] * num if videos is None else videos
    if not isinstance(videos, list) or len(videos) != num:
        raise RowError(video_field, f"expected a list of {num} frame folders / frame lists")
    tgt_inst = string_field(record, "tgt_inst")
    candidates = tuple(
        Item(text=text or "", image=image_path(image, data_dir, "tgt_img_path", **media),
             video=video_frames(video, data_dir, video_field, **media),
             instruction=tgt_inst)
        for text, image, video in zip(texts, images, videos)
    )
    qry_video_field, qry_video = first_present(record, "qry_video_path", "qry_frame_paths")
    query = Item(text=string_field(record, "qry_text"),
                 image=image_path(string_field(record, "qry_img_path", required=False), data_dir, "qry_img_path",
                                  **media),
                 video=video_frames(qry_video, data_dir, qry_video_field, **media),
                 instruction=string_field(record, "qry_inst"))
    if query.text == "" and query.image is None and query.video is None and query.instruction == "":
        raise RowError("qry_text", "the query has no text, image or video")
    return EvalRow(query, candidates, _relevance(record.get("qrels"), num), source=source,
                   video_fields=(qry_video_field, video_field))


def _relevance(value, num: int) -> tuple[float, ...]:
    if value is None:
        return (1.0,) + (0.0,) * (num - 1)
    if not isinstance(value, (list, tuple)) or len(value) != num:
        raise RowError("qrels", f"expected a list of {num} relevance grades, one per candidate")
    try:
        grades = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RowError("qrels", "grades must be numbers") from None
    if not all(math.isfinite(g) for g in grades) or max(grades) <= 0:
        raise RowError("qrels", "grades must be finite and at least one must be > 0")
    return grades


# ===================================== embedding =====================================

EmbedFn = Callable[[list[Item]], np.ndarray]


class EmbeddingCache:
    """Embeds each distinct item once, in batches of one kind (text / image / video) to keep padding low.

    Items are equal when every field is, so a query identical to a candidate shares its embedding. A cache
    belongs to one model state: make a new one after the weights change.
    """

    def __init__(self, embed_fn: EmbedFn, batch_size: int = 32, progress: bool = True, store=None):
        """`store`: an optional `btoks_jax.evaluate.store.EmbeddingStore`; items found there are not embedded,
        and what is embedded is added to it."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.embed_fn, self.batch_size, self.progress, self.store = embed_fn, batch_size, progress, store
        self.embedded = 0  # items embedded by embed_fn (not read from the store)
        self._rows: dict[Item, int] = {}
        self._blocks: list[np.ndarray] = []
        self._table: np.ndarray | None = None  # the blocks stacked, rebuilt lazily after new ones arrive

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item: Item) -> bool:
        return item in self._rows

    def __call__(self, items: Sequence[Item], desc: str = "embed") -> np.ndarray:
        """float32[len(items), D], rows in the order of `items` (duplicates allowed)."""
        missing = list(dict.fromkeys(item for item in items if item not in self._rows))
        keys = {}
        if self.store is not None and missing:
            keys = {item: self.store.key(item) for item in missing}
            stored = self.store.get(list(keys.values()))
            found = [item for item in missing if keys[item] in stored]
            if found:
                self._add(found, np.stack([stored[keys[item]] for item in found]))
                missing = [item for item in missing if keys[item] not in stored]
        missing.sort(key=lambda item: ("text", "image", "video").index(item.kind))  # stable: first-seen order
        batches = [missing[i : i + self.batch_size] for i in range(0, len(missing), self.batch_size)]
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress or not batches):
            embeddings = np.asarray(self.embed_fn(batch), dtype=np.float32)
            if embeddings.ndim != 2 or embeddings.shape[0] != len(batch):
                raise ValueError(f"embed_fn returned shape {embeddings.shape} for {len(batch)} items; want [B, D]")
            if not np.isfinite(embeddings).all():
                raise ValueError(f"embed_fn returned NaN or Inf (first item: {batch[0]})")
            self._add(batch, embeddings)
            self.embedded += len(batch)
            if self.store is not None:
                self.store.put([keys[item] for item in batch], embeddings)
        if self.store is not None:
            self.store.flush()
        if not items:
            width = self._blocks[0].shape[1] if self._blocks else 0
            return np.zeros((0, width), np.float32)
        if self._table is None:
            self._table = np.concatenate(self._blocks)
            self._blocks = [self._table]
        return self._table[[self._rows[item] for item in items]]

    def _add(self, items: Sequence[Item], embeddings: np.ndarray) -> None:
        if self._blocks and embeddings.shape[1] != self._blocks[0].shape[1]:
            raise ValueError(f"embedding width changed: {embeddings.shape[1]} vs {self._blocks[0].shape[1]}")
        for item in items:
            self._rows[item] = len(self._rows)
        self._blocks.append(np.asarray(embeddings, np.float32))
        self._table = None


def evaluate_dataset(rows: Sequence[EvalRow], embed_fn: EmbedFn | EmbeddingCache, ranking: str = "local",
                     batch_size: int = 32, *, corpus: Sequence[Item] = (), ks=DEFAULT_KS,
                     progress: bool = True, name: str = "") -> dict[str, float]:
    """Embeds queries and candidates, ranks by cosine similarity and returns a VLM2Vec-shaped score dict.

    Args:
      rows: evaluation rows (`read_eval_rows`).
      embed_fn: `embed_fn(items) -> float[B, D]`, or an `EmbeddingCache` to share embeddings across calls.
      ranking: "local" ranks each query against its own candidates (duplicates in a list collapse into one,
        keeping the highest grade); "global" against the union of every row's candidates plus `corpus`.
      batch_size: items per `embed_fn` call (ignored when an `EmbeddingCache` is passed).
      corpus: extra candidates for global ranking (e.g. document pages no query lists).
      ks: metric cut-offs.
      progress: show tqdm bars.
      name: label for the progress bars.
    Returns:
      {"hit@1", ..., "mrr@10", "num_pred", "num_data"} as in VLM2Vec's `{dataset}_score.json`.
    Raises:
      ValueError naming the row and field (`EvalRow.source`) of an item that cannot be embedded (`ItemError`
      from the embedder, or a `MediaError` from `embed_fn`): a query is never dropped.
    """
    if ranking not in ("local", "global"):
        raise ValueError(f"ranking must be 'local' or 'global', got {ranking!r}")
    if not rows:
        raise ValueError("no evaluation rows")
    cache = embed_fn if isinstance(embed_fn, EmbeddingCache) else EmbeddingCache(embed_fn, batch_size, progress)
    label = f"{name} " if name else ""

    def embedded(items: Sequence[Item], desc: str) -> np.ndarray:
        try:
            return cache(items, desc=desc)
        except (ItemError, MediaError) as err:
            raise _row_error(err, rows, name) from None

    queries = embedded([row.query for row in rows], desc=f"{label}queries")
    if ranking == "local":
        candidate_lists, grade_lists = [], []
        for row in rows:
            grades = _merge_duplicates(row.candidates, row.relevance)
            candidate_lists.append(list(grades))
            grade_lists.append(list(grades.values()))
        flat = [item for items in candidate_lists for item in items]
        table = embedded(flat, desc=f"{label}candidates")
        bounds = np.cumsum([0] + [len(items) for items in candidate_lists])
        scores = local_ranking_metrics(queries, [table[a:b] for a, b in itertools.pairwise(bounds)],
                                       grade_lists, ks)
    else:
        index: dict[Item, int] = {}
        qrels = []
        for row in rows:
            grades = _merge_duplicates(row.candidates, row.relevance)
            qrels.append({index.setdefault(item, len(index)): g for item, g in grades.items() if g > 0})
        for item in corpus:
            index.setdefault(item, len(index))
        scores = global_ranking_metrics(queries, embedded(list(index), desc=f"{label}corpus"), qrels, ks)
    scores["num_pred"] = len(rows)
    scores["num_data"] = len(rows)
    return scores


def _row_error(err: ItemError | MediaError, rows: Sequence[EvalRow], name: str) -> ValueError:
    """The error of an item that cannot be embedded, naming the first row holding it and its field (a row of a
    published set, which has no `source`, by its position), or the corpus when no row lists it."""
    if isinstance(err, ItemError) and err.item is not None:
        message = err.message

        def holds(item: Item) -> bool:
            return item == err.item
    else:  # a file: the item holding it
        message = err.message if isinstance(err, ItemError) else str(err)
        path = getattr(err, "path", None)

        def holds(item: Item) -> bool:
            return path is not None and (item.image == path or path in (item.video or ()))
    for number, row in enumerate(rows, start=1):
        where = row.source or f"{name or 'evaluation rows'}: row {number}"
        if holds(row.query):
            field = row.video_fields[0] if row.query.video else "qry_img_path"
            return ValueError(f"{where}: field '{field}': {message}")
        for entry, candidate in enumerate(row.candidates, start=1):
            if holds(candidate):
                field = row.video_fields[1] if candidate.video else "tgt_img_path"
                return ValueError(f"{where}: field '{field}': entry {entry}: {message}")
    return ValueError(f"{name or 'evaluation rows'}: a corpus item: {message}")


def _merge_duplicates(items: Sequence[Item], grades: Sequence[float]) -> dict[Item, float]:
    merged: dict[Item, float] = {}
    for item, grade in zip(items, grades):
        merged[item] = max(grade, merged.get(item, grade))
    return merged


# ===================================== score files and the summary =====================================


def write_score_file(out_dir: str | os.PathLike, dataset: str, scores: Mapping[str, float]) -> Path | str:
    """Writes `{out_dir}/{dataset}_score.json` (VLM2Vec's name and layout) atomically; returns its path (a URL
    string when `out_dir` is one)."""
    path = fs.joinpath(out_dir, f"{dataset}_score.json")
    _write_json_atomic(path, dict(scores))
    return path


def load_score_files(directory: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Reads every `*_score.json` below `directory` (local or a URL; VLM2Vec nests them by modality); keys are
    canonical names."""
    if fs.is_remote(directory):
        paths = [fs.join(directory, *rel.split("/")) for rel in fs.walk_files(directory)
                 if fs.basename(rel).endswith("_score.json")]
    else:
        paths = sorted(Path(directory).rglob("*_score.json"))
    scores = {}
    for path in sorted(paths):
        name = canonical_name(fs.basename(path)[: -len("_score.json")])
        if name in scores:
            raise ValueError(f"two score files for {name} under {directory}")
        scores[name] = json.loads(fs.read_text(path))
    return scores


def summarize(scores: Mapping[str, Mapping[str, float]], extra_metric: str = "hit@1") -> dict:
    """Aggregates per-dataset score dicts into MMEB-V2 meta-task, modality and overall means.

    Every aggregate is a plain mean over the datasets present, as the paper's Overall is over all 78, and
    carries {"score", "evaluated", "expected", "partial", "missing"}: with a subset the numbers exist but are
    marked partial, never passed off as the benchmark score. Datasets outside MMEB-V2 are listed under
    "extra_datasets" (scored with `extra_metric`) and are not part of any MMEB-V2 aggregate.
    """
    present, extra = {}, {}
    for raw_name, values in scores.items():
        name = canonical_name(raw_name)
        spec = MMEB_V2_BY_NAME.get(name)
        metric = spec.metric if spec else extra_metric
        if metric not in values:
            raise ValueError(f"scores of {raw_name} lack the main metric {metric!r}")
        (present if spec else extra)[name] = float(values[metric])

    def aggregate(specs: Sequence[DatasetSpec]) -> dict:
        found = [present[s.name] for s in specs if s.name in present]
        missing = [s.name for s in specs if s.name not in present]
        return {"score": float(np.mean(found)) if found else None, "evaluated": len(found), "expected": len(specs),
                "partial": bool(missing), "missing": missing}

    groups: dict[str, list[DatasetSpec]] = {}
    modalities: dict[str, list[DatasetSpec]] = {}
    for spec in MMEB_V2_DATASETS:
        groups.setdefault(spec.group, []).append(spec)
        modalities.setdefault(spec.modality, []).append(spec)
    overall = aggregate(MMEB_V2_DATASETS)
    return {
        "benchmark": "MMEB-V2",
        "complete": not overall["partial"],
        "overall": overall,
        "modalities": {m: aggregate(specs) for m, specs in modalities.items()},
        "meta_tasks": {g: aggregate(specs) for g, specs in groups.items()},
        "datasets": {s.name: {"modality": s.modality, "meta_task": s.meta_task, "ranking": s.ranking,
                              "metric": s.metric, "score": present[s.name]}
                     for s in MMEB_V2_DATASETS if s.name in present},
        "extra_datasets": {name: {"metric": extra_metric, "score": value} for name, value in sorted(extra.items())},
    }


def write_summary(path: str | os.PathLike, summary: Mapping) -> Path | str:
    """Writes the summary JSON (a local path or a URL) atomically; returns its path."""
    path = fs.as_path(path)
    _write_json_atomic(path, dict(summary))
    return path


def format_summary(summary: Mapping) -> str:
    """A short human-readable report (scores x100); partial aggregates are marked with their coverage."""

    def line(label: str, agg: Mapping) -> str:
        score = "  n/a" if agg["score"] is None else f"{100 * agg['score']:5.1f}"
        note = f"  (partial: {agg['evaluated']}/{agg['expected']} datasets)" if agg["partial"] else ""
        return f"{label:<20} {score}{note}"

    lines = [line("Overall", summary["overall"])]
    lines += [line(f"  {m}", agg) for m, agg in summary["modalities"].items()]
    lines += [line(f"    {g}", agg) for g, agg in summary["meta_tasks"].items()]
    lines += [f"{name:<20} {100 * e['score']:5.1f}  ({e['metric']}, not in MMEB-V2)"
              for name, e in summary["extra_datasets"].items()]
    missing = summary["overall"]["missing"]
    if missing:
        lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
    return "\n".join(lines)


def _write_json_atomic(path: Path | str, payload: dict) -> None:
    """Readers see the old file or the new one: locally a temporary file renamed over it, on object storage one
    PUT (`fs.write_text_atomic`)."""
    if fs.is_remote(path):
        fs.write_text_atomic(path, json.dumps(payload, indent=4) + "\n")
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=4)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
