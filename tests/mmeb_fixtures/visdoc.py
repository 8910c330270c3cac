"""The 24 MMEB-V2 visual-document sets as miniatures, in the published BEIR layout and arrow types.

`write(root)` lays out, for every set, `root/<owner>/<name>/{queries,corpus,qrels}/<split>-00000-of-00001.parquet`
as the hub repositories do, with 3-5 queries and 6-10 tiny Pillow-drawn pages (28-56 px PNG or JPEG) in an HF
Image column (struct<bytes: binary, path: string>). Everything is seeded, so two calls write identical files.

Schemas, as published (hub dataset cards; the authors' conversion tests):
- ViDoRe v1: queries (query-id int64, query string), corpus (corpus-id int64, image), qrels (query-id int64,
  corpus-id int64, score float64; int64 for tabfquad);
- ViDoRe v2: as v1 with int64 graded scores; queries add `language`, corpus `doc-id`, qrels `is-answerable`
  and `answer` (extra columns are not read);
- VisRAG (split train): string ids, corpus `37313.jpeg`-like file names, queries `<page>-<n>`, int64 scores;
  queries add `answer` (ChartQA also `options`, `is_numerical`);
- OOD: int64 ids with gaps in query-id, running corpus ids over documents, queries add `corpus_range`
  (list<int64>, the pages of the query's document); ViDoSeek-doc qrels grade every page of the document 2 and
  list the reference pages again with 3; MMLongBench-doc grades every page 1; the page-level sets list
  reference pages only.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

VIDORE_V1 = {
    "ViDoRe_arxivqa": "vidore/arxivqa_test_subsampled_beir",
    "ViDoRe_docvqa": "vidore/docvqa_test_subsampled_beir",
    "ViDoRe_infovqa": "vidore/infovqa_test_subsampled_beir",
    "ViDoRe_tabfquad": "vidore/tabfquad_test_subsampled_beir",
    "ViDoRe_tatdqa": "vidore/tatdqa_test_beir",
    "ViDoRe_shiftproject": "vidore/shiftproject_test_beir",
    "ViDoRe_syntheticDocQA_artificial_intelligence": "vidore/syntheticDocQA_artificial_intelligence_test_beir",
    "ViDoRe_syntheticDocQA_energy": "vidore/syntheticDocQA_energy_test_beir",
    "ViDoRe_syntheticDocQA_government_reports": "vidore/syntheticDocQA_government_reports_test_beir",
    "ViDoRe_syntheticDocQA_healthcare_industry": "vidore/syntheticDocQA_healthcare_industry_test_beir",
}
VIDORE_V2 = {
    "ViDoRe_esg_reports_human_labeled_v2": "vidore/esg_reports_human_labeled_v2",
    "ViDoRe_biomedical_lectures_v2_multilingual": "vidore/biomedical_lectures_v2",
    "ViDoRe_economics_reports_v2_multilingual": "vidore/economics_reports_v2",
    "ViDoRe_esg_reports_v2_multilingual": "vidore/esg_reports_v2",
}
VISRAG = {f"VisRAG_{n}": f"openbmb/VisRAG-Ret-Test-{n}"
          for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")}
OOD = {
    "ViDoSeek-page": "VLM2Vec/ViDoSeek-page-fixed",
    "ViDoSeek-doc": "VLM2Vec/ViDoSeek",
    "MMLongBench-page": "VLM2Vec/MMLongBench-page-fixed",
    "MMLongBench-doc": "VLM2Vec/MMLongBench-doc",
}
REPOS = {**VIDORE_V1, **VIDORE_V2, **VISRAG, **OOD}
SPLITS = {name: "train" if name in VISRAG else "test" for name in REPOS}

# Queries whose surface the prompt styles treat differently (kept verbatim by one, normalised by the other).
MESSY_QUERY = "  What was the 2019 revenue?  \r\nAnswer in millions. \n\n"  # ViDoRe_tatdqa, query-id 1
TRAILING_NEWLINE_QUERY = "Which pages mention the fuel injector?\n"  # MMLongBench-doc / -page, 2nd query


def _seed(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _page(rng: random.Random, fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    width, height = rng.randint(28, 56), rng.randint(28, 56)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(width - 4), rng.randrange(height - 4)
        draw.rectangle((x0, y0, x0 + rng.randint(2, 12), y0 + rng.randint(2, 12)),
                       fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _write(repo_root: Path, config: str, split: str, table: pa.Table) -> None:
    folder = repo_root / config
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")


def _write_set(root: Path, name: str, queries: pa.Table, corpus: pa.Table, qrels: pa.Table) -> int:
    repo_root = root / REPOS[name]
    for config, table in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        _write(repo_root, config, SPLITS[name], table)
    return queries.num_rows


def _images(rng: random.Random, count: int, fmt: str, paths: list[str | None]) -> pa.Array:
    return pa.array([{"bytes": _page(rng, fmt), "path": path} for path in paths[:count]], IMAGE_TYPE)


def _vidore_v1(root: Path, name: str) -> int:
    rng = random.Random(_seed(name))
    num_pages, num_queries = rng.randint(6, 10), rng.randint(3, 5)
    cids = list(range(num_pages))
    fmt = "JPEG" if name in ("ViDoRe_infovqa", "ViDoRe_shiftproject") else "PNG"
    with_path = name in ("ViDoRe_tabfquad", "ViDoRe_tatdqa")
    paths = [f"images/{name[7:]}_{cid}.{fmt.lower()}" if with_path else None for cid in cids]
    corpus = pa.table({"corpus-id": pa.array(cids, pa.int64()), "image": _images(rng, num_pages, fmt, paths)})
    topic = name.removeprefix("ViDoRe_").replace("_", " ")
    texts = [f"{topic}: what does figure {i + 1} report?" for i in range(num_queries)]
    if name == "ViDoRe_tabfquad":
        texts[0] = "Quelles étaient les principales composantes du bénéfice net par action en 2017?"
    if name == "ViDoRe_tatdqa":
        texts[1] = MESSY_QUERY
    queries = pa.table({"query-id": pa.array(range(num_queries), pa.int64()), "query": pa.array(texts, pa.string())})
    rows = []  # (query-id, corpus-id, score): one relevant page per query, a second one for some
    for qid in range(num_queries):
        relevant = rng.sample(cids, 2 if qid == 0 and name == "ViDoRe_docvqa" else 1)
        rows += [(qid, cid, 1) for cid in relevant]
    if name in ("ViDoRe_arxivqa", "ViDoRe_shiftproject"):  # a judged but irrelevant page, dropped by the reader
        rows.append((0, next(c for c in cids if (0, c, 1) not in rows), 0))
    score_type = pa.int64() if name == "ViDoRe_tabfquad" else pa.float64()
    qrels = pa.table({"query-id": pa.array([r[0] for r in rows], pa.int64()),
                      "corpus-id": pa.array([r[1] for r in rows], pa.int64()),
                      "score": pa.array([r[2] for r in rows], pa.int64()).cast(score_type)})
    return _write_set(root, name, queries, corpus, qrels)


def _vidore_v2(root: Path, name: str) -> int:
    rng = random.Random(_seed(name))
    num_pages, num_queries = rng.randint(6, 10), rng.randint(3, 5)
    cids = [10 + 3 * i for i in range(num_pages)]  # ids need not start at 0 nor be dense
    corpus = pa.table({
        "corpus-id": pa.array(cids, pa.int64()),
        "image": _images(rng, num_pages, "JPEG", [None] * num_pages),
        "doc-id": pa.array([f"doc-{i // 3}" for i in range(num_pages)], pa.string()),
    })
    languages = ["english", "french", "spanish", "german"]
    topic = name.removeprefix("ViDoRe_").removesuffix("_multilingual").replace("_", " ")
    query_columns = {
        "query-id": pa.array([2 * i for i in range(num_queries)], pa.int64()),
        "query": pa.array([f"{topic} ({languages[i % 4]}): which measures are listed in section {i}?"
                           for i in range(num_queries)], pa.string()),
    }
    if name.endswith("_multilingual"):
        query_columns["language"] = pa.array([languages[i % 4] for i in range(num_queries)], pa.string())
    queries = pa.table(query_columns)
    rows = []
    for i in range(num_queries):
        for cid, grade in zip(rng.sample(cids, rng.randint(1, 3)), (2, 1, 1)):
            rows.append((2 * i, cid, grade))
    qrels = pa.table({
        "query-id": pa.array([r[0] for r in rows], pa.int64()),
        "corpus-id": pa.array([r[1] for r in rows], pa.int64()),
        "is-answerable": pa.array(["fully answerable" if r[2] == 2 else "partially answerable" for r in rows]),
        "answer": pa.array([f"answer {r[0]}-{r[1]}" for r in rows], pa.string()),
        "score": pa.array([r[2] for r in rows], pa.int64()),
    })
    return _write_set(root, name, queries, corpus, qrels)


def _visrag_ids(name: str, rng: random.Random, count: int) -> list[str]:
    if name == "VisRAG_ArxivQA":
        return [f"{rng.randint(1501, 2312)}.{rng.randint(10000, 99999)}_{i % 3}.jpg" for i in range(count)]
    if name == "VisRAG_ChartQA":
        return [f"{rng.randint(10 ** 13, 10 ** 14 - 1)}.png" for _ in range(count)]
    if name == "VisRAG_MP-DocVQA":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return [f"{''.join(rng.choice(letters) for _ in range(4))}{rng.randint(1000, 9999)}_p{i}.jpg"
                for i in range(count)]
    if name == "VisRAG_SlideVQA":  # long deck names: the file name keeps 50 characters of the stem and a hash
        deck = "quarterly-business-review-and-strategic-outlook-for-the-enterprise-segment"
        return [f"{deck}-{i + 1}.jpg" for i in range(count)]
    if name == "VisRAG_InfoVQA":
        return [f"{rng.randint(10000, 99999)}.jpeg" for _ in range(count)]
    return [f"{rng.randint(1000, 99999)}.png" for _ in range(count)]  # PlotQA


def _visrag(root: Path, name: str) -> int:
    rng = random.Random(_seed(name))
    num_pages, num_queries = rng.randint(6, 10), rng.randint(3, 5)
    cids = _visrag_ids(name, rng, num_pages)
    assert len(set(cids)) == num_pages
    fmt = "PNG" if cids[0].endswith(".png") else "JPEG"
    corpus = pa.table({"corpus-id": pa.array(cids, pa.string()),
                       "image": _images(rng, num_pages, fmt, [f"{i + 1}.{fmt.lower()}" for i in range(num_pages)])})
    relevant = rng.sample(cids, num_queries)
    qids = [f"{cid}-{i % 2 + 1}" for i, cid in enumerate(relevant)]
    topic = name.removeprefix("VisRAG_")
    query_columns = {
        "query-id": pa.array(qids, pa.string()),
        "query": pa.array([f"[{topic}] How many more units were sold in year {2000 + i} than in {1999 + i}?"
                           for i in range(num_queries)], pa.string()),
        "answer": pa.array([str(rng.randint(1, 99)) for _ in range(num_queries)], pa.string()),
    }
    if name == "VisRAG_ChartQA":
        query_columns["options"] = pa.array([None] * num_queries, pa.list_(pa.string()))
        query_columns["is_numerical"] = pa.array([1] * num_queries, pa.int64())
    queries = pa.table(query_columns)
    qrels = pa.table({"query-id": pa.array(qids, pa.string()), "corpus-id": pa.array(relevant, pa.string()),
                      "score": pa.array([1] * num_queries, pa.int64())})
    return _write_set(root, name, queries, corpus, qrels)


# OOD layout, the same for the four sets: documents of these page counts, queries on documents with
# their reference pages (page numbers within the document).
OOD_DOCUMENTS = (3, 4, 2)  # pages 0-2, 3-6, 7-8
OOD_QUERIES = ((0, 0, (1,)), (3, 1, (0, 2)), (4, 1, (3,)), (8, 2, (1,)))  # (query-id, document, reference pages)


def _ood(root: Path, name: str) -> int:
    rng = random.Random(_seed(name))
    starts = [sum(OOD_DOCUMENTS[:d]) for d in range(len(OOD_DOCUMENTS))]
    num_pages = sum(OOD_DOCUMENTS)
    fmt = "JPEG" if name.startswith("ViDoSeek") else "PNG"
    with_path = name != "ViDoSeek-doc"
    paths = [f"page_{cid}.{fmt.lower()}" if with_path else None for cid in range(num_pages)]
    corpus = pa.table({"corpus-id": pa.array(range(num_pages), pa.int64()),
                       "image": _images(rng, num_pages, fmt, paths)})
    texts = [f"{name.split('-')[0]}: what does the report state about topic {qid}?" for qid, _, _ in OOD_QUERIES]
    if name.startswith("MMLongBench"):
        texts[1] = TRAILING_NEWLINE_QUERY
    queries = pa.table({
        "query-id": pa.array([q[0] for q in OOD_QUERIES], pa.int64()),
        "query": pa.array(texts, pa.string()),
        "corpus_range": pa.array([list(range(starts[d], starts[d] + OOD_DOCUMENTS[d])) for _, d, _ in OOD_QUERIES],
                                 pa.list_(pa.int64())),
    })
    rows = []
    for qid, doc, refs in OOD_QUERIES:
        pages = range(starts[doc], starts[doc] + OOD_DOCUMENTS[doc])
        if name == "ViDoSeek-doc":
            rows += [(qid, cid, 2) for cid in pages] + [(qid, starts[doc] + r, 3) for r in refs]
        elif name == "MMLongBench-doc":
            rows += [(qid, cid, 1) for cid in pages]
        else:
            rows += [(qid, starts[doc] + r, 1) for r in refs]
    qrels = pa.table({"query-id": pa.array([r[0] for r in rows], pa.int64()),
                      "corpus-id": pa.array([r[1] for r in rows], pa.int64()),
                      "score": pa.array([r[2] for r in rows], pa.int64())})
    return _write_set(root, name, queries, corpus, qrels)


def write(root: Path) -> dict[str, int]:
    """Writes the 24 miniature sets under `root`; returns {set name: number of query rows}."""
    root = Path(root)
    counts = {}
    for name in REPOS:
        if name in VIDORE_V1:
            counts[name] = _vidore_v1(root, name)
        elif name in VIDORE_V2:
            counts[name] = _vidore_v2(root, name)
        elif name in VISRAG:
            counts[name] = _visrag(root, name)
        else:
            counts[name] = _ood(root, name)
    return counts
