"""Readers for the 24 MMEB-V2 visual-document sets (BEIR shape: `queries`, `corpus`, `qrels`).

Every set is a Hugging Face repository with three configs, each one split of parquet shards:

    ROOT/<owner>/<name>/queries/<split>-*.parquet   query-id, query (+ extra columns, ignored)
    ROOT/<owner>/<name>/corpus/<split>-*.parquet    corpus-id, image (HF Image: struct {bytes, path})
    ROOT/<owner>/<name>/qrels/<split>-*.parquet     query-id, corpus-id, score

Repositories and splits follow VLM2Vec's evaluation table (`src/constant/dataset_hf_path.py`,
`experiments/public/eval/visdoc.yaml`): ViDoRe v1 (10 sets) and v2 (4; the `_multilingual` names keep every
query, the English-only copies are not on the leaderboard and are not read), VisRAG (6, split `train`) and
the out-of-domain sets (ViDoSeek and MMLongBench, page- and document-level). Ids are int64 (ViDoRe, OOD) or
strings (VisRAG, e.g. corpus `37313.jpeg`, query `3960.png-2`).

What a loader returns, as VLM2Vec reads these sets (`src/data/eval_dataset/{vidore,visrag}_dataset.py`):

- qrels become {query-id: {corpus-id: grade}}, keeping rows with score > 0 and the highest score of
  repeated pairs (the document-level OOD sets list reference pages twice, graded 2 and 3); qrels rows for
  query ids absent from `queries` are ignored; a query without any relevant page is an error;
- one row per query, in the order of `queries`: the query text without media, its relevant pages as
  candidates with their grades; ranking is global, against every page of the corpus (`Task.corpus`);
- each page is written once to `MEDIA_DIR/<set>/<file>` under VLM2Vec's file name (`<corpus-id>.png`;
  VisRAG `<base[:50]>_<md5(corpus-id)[:8]><ext>`), with the published bytes (not re-encoded); one page is
  one Item, shared by the corpus and every row that lists it.

Prompt styles:

- "vlm2vec": query `Find a document image that matches the given query: {query}` (the bare instruction for
  an empty query), page `<|image_1|> Understand the content of the provided document image.` (one space,
  no final newline) -- VLM2Vec's `process_input_text` with the instructions of its two visdoc readers;
- "btoks": the authors' canonical runtime form (`src/vlm2emb/data/datasets/mmeb_v2/parsers/{vidore,visrag}.py`,
  `runtime_mode: canonical`): query `Find a document image that matches the given query: {query}\n` with
  its whitespace normalised (CR/CRLF to LF, spaces and tabs stripped at line ends and around the whole text,
  exactly one final newline; a blank query is an error), page
  `<|image_1|>\nUnderstand the content of the provided document image.\n`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from btoks_jax import fs
from btoks_jax.data.media import RowError
from btoks_jax.evaluate.mmeb import EvalRow, Item
from btoks_jax.evaluate.published.common import (
    IMAGE,
    Task,
    check_style,
    field,
    image_bytes,
    iter_parquet,
    parquet_file,
    read_schema,
    repo_dir,
    short_hash,
    split_files,
    write_media,
)

Loader = Callable[[Path | str, str, Path | str], Task]  # (root, style, media_dir): local paths or URLs

QUERY_INSTRUCTION = "Find a document image that matches the given query:"
PAGE_INSTRUCTION = "Understand the content of the provided document image."
CORPUS_BATCH_ROWS = 64  # page images held in memory at once while the corpus is streamed


@dataclasses.dataclass(frozen=True)
class VisdocSource:
    repo: str  # "<owner>/<name>" under the MMEB-V2 root
    split: str
    naming: str  # "vidore": <corpus-id>.png; "visrag": <base[:50]>_<md5[:8]><ext>


def _vidore(repo: str) -> VisdocSource:
    return VisdocSource(repo, "test", "vidore")


def _visrag(name: str) -> VisdocSource:
    return VisdocSource(f"openbmb/VisRAG-Ret-Test-{name}", "train", "visrag")


# VLM2Vec reads the OOD sets with its ViDoRe parser, hence their `<corpus-id>.png` names.
SOURCES: dict[str, VisdocSource] = {
    "ViDoRe_arxivqa": _vidore("vidore/arxivqa_test_subsampled_beir"),
    "ViDoRe_docvqa": _vidore("vidore/docvqa_test_subsampled_beir"),
    "ViDoRe_infovqa": _vidore("vidore/infovqa_test_subsampled_beir"),
    "ViDoRe_tabfquad": _vidore("vidore/tabfquad_test_subsampled_beir"),
    "ViDoRe_tatdqa": _vidore("vidore/tatdqa_test_beir"),
    "ViDoRe_shiftproject": _vidore("vidore/shiftproject_test_beir"),
    "ViDoRe_syntheticDocQA_artificial_intelligence": _vidore("vidore/syntheticDocQA_artificial_intelligence_test_beir"),
    "ViDoRe_syntheticDocQA_energy": _vidore("vidore/syntheticDocQA_energy_test_beir"),
    "ViDoRe_syntheticDocQA_government_reports": _vidore("vidore/syntheticDocQA_government_reports_test_beir"),
    "ViDoRe_syntheticDocQA_healthcare_industry": _vidore("vidore/syntheticDocQA_healthcare_industry_test_beir"),
    "ViDoRe_esg_reports_human_labeled_v2": _vidore("vidore/esg_reports_human_labeled_v2"),
    "ViDoRe_biomedical_lectures_v2_multilingual": _vidore("vidore/biomedical_lectures_v2"),
    "ViDoRe_economics_reports_v2_multilingual": _vidore("vidore/economics_reports_v2"),
    "ViDoRe_esg_reports_v2_multilingual": _vidore("vidore/esg_reports_v2"),
    "VisRAG_ArxivQA": _visrag("ArxivQA"),
    "VisRAG_ChartQA": _visrag("ChartQA"),
    "VisRAG_MP-DocVQA": _visrag("MP-DocVQA"),
    "VisRAG_SlideVQA": _visrag("SlideVQA"),
    "VisRAG_InfoVQA": _visrag("InfoVQA"),
    "VisRAG_PlotQA": _visrag("PlotQA"),
    "ViDoSeek-page": _vidore("VLM2Vec/ViDoSeek-page-fixed"),
    "ViDoSeek-doc": _vidore("VLM2Vec/ViDoSeek"),
    "MMLongBench-page": _vidore("VLM2Vec/MMLongBench-page-fixed"),
    "MMLongBench-doc": _vidore("VLM2Vec/MMLongBench-doc"),
}


# ===================================== prompt text =====================================


def query_text(query: str, style: str) -> str:
    """The finished query prompt of one style (no media)."""
    if style == "vlm2vec":
        return f"{QUERY_INSTRUCTION} {query}" if query else QUERY_INSTRUCTION
    return _canonical_whitespace(f"{QUERY_INSTRUCTION} {query}\n")


def page_text(style: str) -> str:
    """The finished page prompt of one style, with the MMEB image placeholder."""
    if style == "vlm2vec":
        return f"{IMAGE} {PAGE_INSTRUCTION}"
    return f"{IMAGE}\n{PAGE_INSTRUCTION}\n"


def _canonical_whitespace(text: str) -> str:
    """The authors' visdoc query normalisation: LF line ends, no spaces or tabs at line ends or at either end
    of the text, exactly one final newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    text = "\n".join(line.rstrip(" \t") for line in lines).strip(" \t")
    return text.rstrip("\n") + "\n"


# ===================================== ids and file names =====================================

_ID_KINDS = {int: "integer", str: "string"}


def _column_kind(files: list[Path], column: str) -> type:
    """int or str: the id type of `column`, the same in every shard; ValueError naming the file otherwise."""
    import pyarrow as pa

    kind, first = None, None
    for file in files:
        schema = read_schema(file)
        if column not in schema.names:
            raise ValueError(f"{file}: missing column '{column}' (has {sorted(schema.names)})")
        arrow_type = schema.field(column).type
        if pa.types.is_integer(arrow_type):
            this = int
        elif pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
            this = str
        else:
            raise ValueError(f"{file}: field '{column}': ids must be integers or strings, got {arrow_type}")
        if kind is None:
            kind, first = this, file
        elif this is not kind:
            raise ValueError(f"{file}: field '{column}' holds {_ID_KINDS[this]} ids but {first} holds "
                             f"{_ID_KINDS[kind]} ids")
    return kind


def _same_kind(kind: type, files: list[Path], column: str, reference: type, reference_files: list[Path],
               reference_column: str) -> None:
    if kind is not reference:
        raise ValueError(f"{files[0]}: field '{column}' holds {_ID_KINDS[kind]} ids but {reference_files[0]} "
                         f"field '{reference_column}' holds {_ID_KINDS[reference]} ids")


_UNSAFE = re.compile(r"[^\w.+-]")


def page_file_name(corpus_id: int | str, naming: str) -> str:
    """VLM2Vec's file name for a page; ids that would not make a plain file name (a path separator, a leading
    dot, too long) get a sanitised stem plus the md5 of the id instead."""
    name_id = str(corpus_id)
    if naming == "visrag":
        base, suffix = os.path.splitext(name_id)
        name = f"{base[:50]}_{short_hash(name_id)}{suffix}"
    else:
        base, suffix = name_id, ".png"
        name = f"{name_id}{suffix}"
    if _plain_file_name(name):
        return name
    if not (len(suffix) <= 16 and _plain_file_name(f"x{suffix}")):
        suffix = ""
    stem = _UNSAFE.sub("_", base)[:50].lstrip(".") or "page"
    return f"{stem}_{short_hash(name_id)}{suffix}"


def _plain_file_name(name: str) -> bool:
    return (bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name
            and "\0" not in name and len(name.encode("utf-8")) <= 200)


# ===================================== the loader =====================================


def load_visdoc(name: str, root: str | os.PathLike, style: str, media_dir: str | os.PathLike) -> Task:
    """Reads one visdoc set (see the module docstring); MissingData when its files are absent."""
    check_style(style)
    if name not in SOURCES:
        raise ValueError(f"unknown visdoc set {name!r}; expected one of {sorted(SOURCES)}")
    source = SOURCES[name]
    repo = repo_dir(root, source.repo)
    query_files = split_files(repo, source.split, config="queries")
    corpus_files = split_files(repo, source.split, config="corpus")
    qrels_files = split_files(repo, source.split, config="qrels")

    qid_kind = _column_kind(query_files, "query-id")
    cid_kind = _column_kind(corpus_files, "corpus-id")
    _same_kind(_column_kind(qrels_files, "query-id"), qrels_files, "query-id", qid_kind, query_files, "query-id")
    _same_kind(_column_kind(qrels_files, "corpus-id"), qrels_files, "corpus-id", cid_kind, corpus_files,
               "corpus-id")

    queries = _read_queries(query_files, qid_kind, style)
    corpus_ids = _read_corpus_ids(corpus_files, cid_kind)
    qrels = _read_qrels(qrels_files, qid_kind, cid_kind, queries, corpus_ids)

    # Every query needs a relevant page before any image is written.
    for qid, (where, _) in queries.items():
        if qid not in qrels:
            raise ValueError(f"{where}: field 'query-id': query {qid!r} has no relevant page (a qrels row with "
                             f"score > 0) in {', '.join(map(str, qrels_files))}")

    pages = _write_pages(corpus_files, cid_kind, source.naming, fs.joinpath(media_dir, name), page_text(style))
    rows = []
    for qid, (_, text) in queries.items():
        grades = qrels[qid]
        rows.append(EvalRow(query=Item(text=text, instruction=""),
                            candidates=tuple(pages[cid] for cid in grades),
                            relevance=tuple(float(g) for g in grades.values())))
    return Task(name=name, rows=rows, ranking="global", corpus=tuple(pages.values()), source=str(repo))


def _read_queries(files: list[Path], kind: type, style: str) -> dict[int | str, tuple[str, str]]:
    """{query-id: (where, prompt text)} in file order; duplicate ids and blank canonical queries are errors."""
    queries: dict[int | str, tuple[str, str]] = {}
    for where, record in iter_parquet(files, ["query-id", "query"]):
        qid = field(record, "query-id", where, kind)
        query = field(record, "query", where, str)
        if qid in queries:
            raise RowError("query-id", f"duplicate query id {qid!r} (first at {queries[qid][0]})").at(where)
        if style == "btoks" and not query.strip():
            raise RowError("query", "empty query").at(where)
        queries[qid] = (where, query_text(query, style))
    return queries


def _read_corpus_ids(files: list[Path], kind: type) -> set:
    """The corpus ids (the id column only; the images are streamed later); duplicates are errors."""
    seen: dict[int | str, str] = {}
    for where, record in iter_parquet(files, ["corpus-id"]):
        cid = field(record, "corpus-id", where, kind)
        if cid in seen:
            raise RowError("corpus-id", f"duplicate corpus id {cid!r} (first at {seen[cid]})").at(where)
        seen[cid] = where
    return set(seen)


def _read_qrels(files: list[Path], qid_kind: type, cid_kind: type, queries: dict, corpus_ids: set) -> dict:
    """{query-id: {corpus-id: highest score}} over rows with score > 0, pages in first-seen order."""
    qrels: dict[int | str, dict[int | str, float | int]] = {}
    for where, record in iter_parquet(files, ["query-id", "corpus-id", "score"]):
        qid = field(record, "query-id", where, qid_kind)
        cid = field(record, "corpus-id", where, cid_kind)
        score = field(record, "score", where, (int, float))
        if not math.isfinite(score):
            raise RowError("score", f"expected a finite number, got {score!r}").at(where)
        if score <= 0 or qid not in queries:
            continue
        if cid not in corpus_ids:
            raise RowError("corpus-id", f"page {cid!r} (relevant to query {qid!r}) is not in the corpus").at(where)
        grades = qrels.setdefault(qid, {})
        grades[cid] = max(score, grades.get(cid, score))
    return qrels


def _iter_corpus(files: list[Path]) -> Iterator[tuple[str, dict]]:
    """("<file>: row <n>", record) over the corpus, a few images at a time."""
    for file in files:
        number = 0
        for batch in parquet_file(file).iter_batches(batch_size=CORPUS_BATCH_ROWS, columns=["corpus-id", "image"]):
            for record in batch.to_pylist():
                number += 1
                yield f"{file}: row {number}", record


def _write_pages(files: list[Path], kind: type, naming: str, directory: Path | str, text: str) -> dict:
    """{corpus-id: page Item}, each image written once to `directory` (local or a URL; kept when already there)."""
    for file in files:  # the image column is checked before anything is written
        names_in_file = read_schema(file).names
        if "image" not in names_in_file:
            raise ValueError(f"{file}: missing column 'image' (has {sorted(names_in_file)})")
    pages: dict[int | str, Item] = {}
    names: dict[str, int | str] = {}
    for where, record in _iter_corpus(files):
        cid = field(record, "corpus-id", where, kind)
        data, _ = image_bytes(record.get("image"), where, "image")
        name = page_file_name(cid, naming)
        other = names.setdefault(name.lower(), cid)
        if other != cid:
            raise RowError("corpus-id", f"pages {other!r} and {cid!r} map to the same file name {name!r}").at(where)
        pages[cid] = Item(text=text, image=write_media(directory, name, data), instruction="")
    return pages


def _loader(name: str) -> Loader:
    def load(root: Path, style: str, media_dir: Path) -> Task:
        return load_visdoc(name, root, style, media_dir)

    load.__name__ = load.__qualname__ = f"load_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"
    load.__doc__ = f"Reads {name} from `ROOT/{SOURCES[name].repo}` (split {SOURCES[name].split!r})."
    return load


TASKS: dict[str, Loader] = {name: _loader(name) for name in SOURCES}
