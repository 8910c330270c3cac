"""The 24 MMEB-V2 visual-document readers on miniature copies of the published files (no model, seconds).

Reference strings:
- "vlm2vec": VLM2Vec `src/data/eval_dataset/vidore_dataset.py` / `visrag_dataset.py` (TASK_INST_QRY / TASK_INST_TGT)
  through `src/model/processor.py::process_input_text` (`instruction + " " + text`; image token + " " + prompt;
  Qwen2-VL image token `<|image_pad|>`).
- "btoks": the authors' `src/vlm2emb/data/datasets/mmeb_v2/parsers/{vidore,visrag}.py` (canonical mode), the
  expected candidate text of `tests/evaluate/test_mmeb_visdoc_group_f_audit.py`, and the boundary wrapping of
  `src/vlm2emb/data/processors/qwen2_vl.py` (`wrap_visual_tokens_with_boundaries: true` in the preset).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmeb_fixtures import visdoc as fixture

from btoks_jax.api import item_prompt
from btoks_jax.evaluate.mmeb import MMEB_V2_DATASETS, evaluate_dataset
from btoks_jax.evaluate.published.common import MissingData
from btoks_jax.evaluate.published.visdoc import SOURCES, TASKS, query_text

STYLES = ("vlm2vec", "btoks")
PREFIX = "Find a document image that matches the given query: "
V_PAGE = "<|image_pad|> Understand the content of the provided document image."
B_PAGE = "<|vision_start|><|image_pad|><|vision_end|>\nUnderstand the content of the provided document image.\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("visdoc") / "root"
    return root, fixture.write(root)


@pytest.fixture(scope="module")
def loaded(data, tmp_path_factory):
    """{(name, style): Task}, all read into one media folder."""
    root, _ = data
    media = tmp_path_factory.mktemp("visdoc_media")
    return media, {(name, style): TASKS[name](root, style, media) for name in TASKS for style in STYLES}


def _parquet(root: Path, name: str, config: str) -> list[dict]:
    folder = root / SOURCES[name].repo / config
    return [row for file in sorted(folder.glob("*.parquet")) for row in pq.read_table(file).to_pylist()]


def _expected_file(name: str, cid) -> str:
    if SOURCES[name].naming == "visrag":
        base, ext = os.path.splitext(cid)
        return f"{base[:50]}_{hashlib.md5(cid.encode('utf-8')).hexdigest()[:8]}{ext}"
    return f"{cid}.png"


def _copy_set(data, name: str, tmp_path: Path) -> Path:
    root, _ = data
    shutil.copytree(root / SOURCES[name].repo, tmp_path / "root" / SOURCES[name].repo)
    return tmp_path / "root"


def _rewrite(root: Path, name: str, config: str, table: pa.Table) -> Path:
    file = root / SOURCES[name].repo / config / f"{SOURCES[name].split}-00000-of-00001.parquet"
    pq.write_table(table, file)
    return file


# ===================================== the set list =====================================


def test_the_24_visdoc_sets_have_loaders():
    visdoc = [spec.name for spec in MMEB_V2_DATASETS if spec.modality == "visdoc"]
    assert len(visdoc) == 24
    assert list(TASKS) == visdoc == list(fixture.REPOS)
    assert all(SOURCES[name].repo == fixture.REPOS[name] for name in visdoc)
    assert {name for name in visdoc if SOURCES[name].split == "train"} == set(fixture.VISRAG)
    assert {spec.name: spec.ranking for spec in MMEB_V2_DATASETS if spec.modality == "visdoc"} == dict.fromkeys(
        visdoc, "global")


# ===================================== exact prompt strings =====================================


def test_prompts_are_the_references_character_for_character(loaded):
    _, tasks = loaded
    v, b = tasks["ViDoRe_arxivqa", "vlm2vec"], tasks["ViDoRe_arxivqa", "btoks"]
    assert item_prompt(v.rows[0].query, "vlm2vec") == "Find a document image that matches the given query: " \
                                                      "arxivqa: what does figure 1 report?"
    assert item_prompt(b.rows[0].query, "btoks") == "Find a document image that matches the given query: " \
                                                    "arxivqa: what does figure 1 report?\n"
    assert item_prompt(v.corpus[0], "vlm2vec") == "<|image_pad|> Understand the content of the provided document image."
    assert item_prompt(b.corpus[0], "btoks") == ("<|vision_start|><|image_pad|><|vision_end|>\n"
                                                 "Understand the content of the provided document image.\n")
    # Query surface: VLM2Vec keeps the source text verbatim; the canonical form normalises line ends, strips
    # spaces at line ends and ends with exactly one newline (internal spacing kept).
    assert item_prompt(tasks["ViDoRe_tatdqa", "vlm2vec"].rows[1].query, "vlm2vec") == PREFIX + fixture.MESSY_QUERY
    assert item_prompt(tasks["ViDoRe_tatdqa", "btoks"].rows[1].query, "btoks") == (
        "Find a document image that matches the given query:   What was the 2019 revenue?\nAnswer in millions.\n")
    for name in ("MMLongBench-doc", "MMLongBench-page"):
        assert item_prompt(tasks[name, "vlm2vec"].rows[1].query, "vlm2vec") == (
            "Find a document image that matches the given query: Which pages mention the fuel injector?\n")
        assert item_prompt(tasks[name, "btoks"].rows[1].query, "btoks") == (
            "Find a document image that matches the given query: Which pages mention the fuel injector?\n")
    assert item_prompt(tasks["ViDoRe_tabfquad", "btoks"].rows[0].query, "btoks") == (
        "Find a document image that matches the given query: "
        "Quelles étaient les principales composantes du bénéfice net par action en 2017?\n")
    # VLM2Vec's `if text:` branch: an empty query is the bare instruction.
    assert query_text("", "vlm2vec") == "Find a document image that matches the given query:"


@pytest.mark.parametrize("style", STYLES)
def test_every_set_uses_one_surface_per_style(loaded, data, style):
    root, _ = data
    _, tasks = loaded
    page = V_PAGE if style == "vlm2vec" else B_PAGE
    for name in TASKS:
        task = tasks[name, style]
        raw = {row["query-id"]: row["query"] for row in _parquet(root, name, "queries")}
        assert all(item_prompt(item, style) == page for item in task.corpus)
        for row, query in zip(task.rows, raw.values()):
            assert row.query.image is None and row.query.video is None and row.query.instruction == ""
            text = item_prompt(row.query, style)
            if style == "vlm2vec":
                assert text == PREFIX + query
            else:
                assert text.startswith(PREFIX) and text.endswith("\n") and not text.endswith("\n\n")
                if query != fixture.MESSY_QUERY:  # single-line queries: one final newline
                    assert text == PREFIX + query.rstrip("\n") + "\n"


# ===================================== counts, qrels, corpus =====================================


@pytest.mark.parametrize("name", list(fixture.REPOS))
def test_loader_reads_the_published_shape(loaded, data, name):
    root, counts = data
    media, tasks = loaded
    queries = _parquet(root, name, "queries")
    corpus = _parquet(root, name, "corpus")
    qrels = _parquet(root, name, "qrels")
    expected: dict = {}
    for row in qrels:  # VLM2Vec's load_qrels_mapping: score > 0, the higher score of repeated pairs
        if row["score"] > 0:
            grades = expected.setdefault(row["query-id"], {})
            grades[row["corpus-id"]] = max(row["score"], grades.get(row["corpus-id"], 0))
    for style in STYLES:
        task = tasks[name, style]
        assert task.name == name and task.ranking == "global"
        assert len(task.rows) == counts[name] == len(queries)
        assert len(task.corpus) == len(set(task.corpus)) == len(corpus)
        by_file = {Path(item.image).name: item for item in task.corpus}
        assert sorted(by_file) == sorted(_expected_file(name, row["corpus-id"]) for row in corpus)
        for item, row in zip(task.corpus, corpus):  # the published bytes, in corpus order
            assert Path(item.image) == media / name / _expected_file(name, row["corpus-id"])
            assert Path(item.image).read_bytes() == row["image"]["bytes"]
        for row, query in zip(task.rows, queries):
            want = {_expected_file(name, cid): float(g) for cid, g in expected[query["query-id"]].items()}
            got = {Path(item.image).name: g for item, g in zip(row.candidates, row.relevance)}
            assert got == want and len(row.candidates) == len(want)
            assert all(by_file[Path(item.image).name] == item for item in row.candidates)  # the corpus's own Items


def test_graded_and_duplicate_qrels(loaded, data):
    root, _ = data
    _, tasks = loaded

    def grades(name, index):
        row = tasks[name, "btoks"].rows[index]
        return {int(Path(item.image).stem): g for item, g in zip(row.candidates, row.relevance)}

    # Document-level ViDoSeek: every page of the document 2, reference pages listed again with 3 -> 3.
    assert grades("ViDoSeek-doc", 1) == {3: 3.0, 4: 2.0, 5: 3.0, 6: 2.0}
    assert grades("ViDoSeek-doc", 0) == {0: 2.0, 1: 3.0, 2: 2.0}
    assert grades("MMLongBench-doc", 3) == {7: 1.0, 8: 1.0}
    assert grades("ViDoSeek-page", 1) == grades("MMLongBench-page", 1) == {3: 1.0, 5: 1.0}
    # A score-0 judgement is not a relevant page.
    for name in ("ViDoRe_arxivqa", "ViDoRe_shiftproject"):
        zero = [row for row in _parquet(root, name, "qrels") if row["score"] == 0]
        assert len(zero) == 1 and zero[0]["query-id"] == 0
        row = tasks[name, "btoks"].rows[0]
        assert len(row.candidates) == 1 and row.relevance == (1.0,)
        assert Path(row.candidates[0].image).name != f"{zero[0]['corpus-id']}.png"
    # tabfquad's int64 scores read as the float64 ones do.
    assert {g for row in tasks["ViDoRe_tabfquad", "btoks"].rows for g in row.relevance} == {1.0}
    # ViDoRe v2 grades (int64 scores 2 and 1) survive as grades.
    assert {g for row in tasks["ViDoRe_esg_reports_v2_multilingual", "btoks"].rows for g in row.relevance} == {1.0,
                                                                                                              2.0}


def test_repeated_pairs_keep_the_highest_score_in_any_order(data, tmp_path):
    name = "ViDoSeek-doc"
    root = _copy_set(data, name, tmp_path)
    qrels = pq.read_table(next((root / SOURCES[name].repo / "qrels").glob("*.parquet")))
    _rewrite(root, name, "qrels", pa.Table.from_pylist(qrels.to_pylist()[::-1], schema=qrels.schema))
    row = TASKS[name](root, "vlm2vec", tmp_path / "media").rows[1]
    assert {int(Path(i.image).stem): g for i, g in zip(row.candidates, row.relevance)} == {3: 3.0, 4: 2.0, 5: 3.0,
                                                                                           6: 2.0}


def test_one_page_is_one_item(loaded):
    _, tasks = loaded
    task = tasks["MMLongBench-doc", "vlm2vec"]
    shared = [item for row in task.rows for item in row.candidates]
    assert len(shared) > len(set(shared))  # queries on one document list the same pages
    assert set(shared) <= set(task.corpus)


# ===================================== media files =====================================


def test_images_are_written_once_and_named_stably(data, tmp_path):
    root, _ = data
    media = tmp_path / "media"
    first = {name: TASKS[name](root, "vlm2vec", media) for name in TASKS}
    files = sorted(p for p in media.rglob("*") if p.is_file())
    assert len(files) == sum(len(task.corpus) for task in first.values())
    assert not [p for p in files if p.name.startswith(".")]  # no temporary files left behind
    old = 1_000_000_000_000_000_000
    for path in files:
        os.utime(path, ns=(old, old))
    for style in STYLES:  # a second read, in either style, rewrites nothing and names the same files
        again = {name: TASKS[name](root, style, media) for name in TASKS}
        assert sorted(p for p in media.rglob("*") if p.is_file()) == files
        assert all(p.stat().st_mtime_ns == old for p in files)
        for name in TASKS:
            assert [i.image for i in again[name].corpus] == [i.image for i in first[name].corpus]
    # A fresh folder gets the same names and bytes.
    other = tmp_path / "other"
    TASKS["VisRAG_SlideVQA"](root, "btoks", other)
    a, b = media / "VisRAG_SlideVQA", other / "VisRAG_SlideVQA"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert all((a / p.name).read_bytes() == p.read_bytes() for p in b.iterdir())
    assert all(len(os.path.splitext(p.name)[0]) == 50 + 9 for p in b.iterdir())  # stem[:50] + "_" + md5[:8]


# ===================================== errors =====================================


def test_missing_sets_are_reported_missing(data, tmp_path):
    for load in TASKS.values():
        with pytest.raises(MissingData):
            load(tmp_path / "empty", "vlm2vec", tmp_path / "media")
    root = _copy_set(data, "ViDoRe_docvqa", tmp_path)
    shutil.rmtree(root / SOURCES["ViDoRe_docvqa"].repo / "qrels")
    with pytest.raises(MissingData, match="qrels"):
        TASKS["ViDoRe_docvqa"](root, "btoks", tmp_path / "media")
    assert not (tmp_path / "media").exists()


def test_unknown_style(data, tmp_path):
    root, _ = data
    with pytest.raises(ValueError, match="prompt style"):
        TASKS["ViDoRe_docvqa"](root, "origin", tmp_path)


@pytest.mark.parametrize("name", ["ViDoRe_infovqa", "VisRAG_ChartQA"])
def test_a_query_without_relevant_pages_is_an_error(data, tmp_path, name):
    root = _copy_set(data, name, tmp_path)
    qrels = pq.read_table(next((root / SOURCES[name].repo / "qrels").glob("*.parquet")))
    lost = qrels.column("query-id")[0].as_py()
    keep = [row for row in qrels.to_pylist() if row["query-id"] != lost]
    file = _rewrite(root, name, "qrels", pa.Table.from_pylist(keep, schema=qrels.schema))
    with pytest.raises(ValueError) as err:
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    assert repr(lost) in str(err.value) and str(file) in str(err.value) and "query-id" in str(err.value)
    # The same when its only judgement has score 0.
    zero = [dict(row, score=0 * row["score"]) if row["query-id"] == lost else row for row in qrels.to_pylist()]
    _rewrite(root, name, "qrels", pa.Table.from_pylist(zero, schema=qrels.schema))
    with pytest.raises(ValueError, match="no relevant page"):
        TASKS[name](root, "btoks", tmp_path / "media")
    assert not (tmp_path / "media").exists()  # nothing written before the tables check out


def test_wrongly_typed_ids_are_errors(data, tmp_path):
    name = "ViDoRe_docvqa"
    root = _copy_set(data, name, tmp_path)
    folder = root / SOURCES[name].repo
    qrels = pq.read_table(next((folder / "qrels").glob("*.parquet")))
    queries_file = next((folder / "queries").glob("*.parquet"))
    # string query ids in qrels, int64 in queries: both files and the field are named
    as_strings = qrels.set_column(0, "query-id", pa.array([str(v) for v in qrels.column("query-id").to_pylist()]))
    qrels_file = _rewrite(root, name, "qrels", as_strings)
    with pytest.raises(ValueError) as err:
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    message = str(err.value)
    assert str(qrels_file) in message and str(queries_file) in message and "'query-id'" in message
    _rewrite(root, name, "qrels", qrels)
    # float ids are neither integers nor strings
    corpus = pq.read_table(next((folder / "corpus").glob("*.parquet")))
    floats = corpus.set_column(0, "corpus-id", corpus.column("corpus-id").cast(pa.float64()))
    corpus_file = _rewrite(root, name, "corpus", floats)
    with pytest.raises(ValueError, match=rf"{corpus_file}: field 'corpus-id': ids must be integers or strings"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    # a null id: the file, the row and the field
    ids = corpus.column("corpus-id").to_pylist()
    ids[1] = None
    _rewrite(root, name, "corpus", corpus.set_column(0, "corpus-id", pa.array(ids, pa.int64())))
    with pytest.raises(ValueError, match=rf"{corpus_file}: row 2: field 'corpus-id': expected int, got NoneType"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    # a duplicate page id
    ids[1] = ids[0]
    _rewrite(root, name, "corpus", corpus.set_column(0, "corpus-id", pa.array(ids, pa.int64())))
    with pytest.raises(ValueError, match=rf"{corpus_file}: row 2: field 'corpus-id': duplicate corpus id"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    _rewrite(root, name, "corpus", corpus)
    # a relevant page that is not in the corpus
    rows = qrels.to_pylist()
    rows[-1]["corpus-id"] = 999
    _rewrite(root, name, "qrels", pa.Table.from_pylist(rows, schema=qrels.schema))
    with pytest.raises(ValueError, match=rf"{qrels_file}: row {len(rows)}: field 'corpus-id': page 999"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    _rewrite(root, name, "qrels", qrels)
    # an image cell without bytes
    images = corpus.column("image").to_pylist()
    images[2] = {"bytes": None, "path": "x.png"}
    _rewrite(root, name, "corpus", corpus.set_column(1, "image", pa.array(images, fixture.IMAGE_TYPE)))
    with pytest.raises(ValueError, match=rf"{corpus_file}: row 3: field 'image'"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")
    # a missing column
    _rewrite(root, name, "corpus", corpus.drop_columns(["image"]))
    with pytest.raises(ValueError, match=rf"{corpus_file}: missing column 'image'"):
        TASKS[name](root, "vlm2vec", tmp_path / "media")


def test_blank_query_in_the_canonical_style_is_an_error(data, tmp_path):
    name = "ViDoSeek-page"
    root = _copy_set(data, name, tmp_path)
    queries = pq.read_table(next((root / SOURCES[name].repo / "queries").glob("*.parquet")))
    texts = queries.column("query").to_pylist()
    texts[2] = " \n"
    file = _rewrite(root, name, "queries", queries.set_column(1, "query", pa.array(texts)))
    with pytest.raises(ValueError, match=rf"{file}: row 3: field 'query': empty query"):
        TASKS[name](root, "btoks", tmp_path / "media")
    task = TASKS[name](root, "vlm2vec", tmp_path / "media")  # VLM2Vec embeds whatever the text is
    assert item_prompt(task.rows[2].query, "vlm2vec") == PREFIX + " \n"


# ===================================== end to end =====================================


def _hash_embed(items):
    out = []
    for item in items:
        seed = int.from_bytes(hashlib.sha256(repr(item).encode("utf-8")).digest()[:8], "little")
        out.append(np.random.default_rng(seed).standard_normal(16))
    return np.stack(out).astype(np.float32)


@pytest.mark.parametrize("style", STYLES)
def test_evaluate_end_to_end(loaded, style):
    _, tasks = loaded
    for name in TASKS:
        task = tasks[name, style]
        calls = []

        def counting(items):
            calls.extend(items)
            return _hash_embed(items)

        scores = evaluate_dataset(task.rows, counting, "global", corpus=task.corpus, progress=False, name=name)
        assert scores["num_data"] == scores["num_pred"] == len(task.rows)
        assert all(0.0 <= scores[k] <= 1.0 for k in scores if "@" in k)
        assert len(calls) == len(set(calls)) == len(set(task.corpus)) + len({row.query for row in task.rows})
        assert scores == evaluate_dataset(task.rows, _hash_embed, "global", corpus=task.corpus, progress=False)

        # An oracle: each page a one-hot vector, each query the grades of its relevant pages -> ideal ranking.
        index = {item: i for i, item in enumerate(task.corpus)}
        queries = {row.query: row for row in task.rows}

        def oracle(items):
            out = np.zeros((len(items), len(index)), np.float32)
            for n, item in enumerate(items):
                if item in index:
                    out[n, index[item]] = 1.0
                else:
                    for page, grade in zip(queries[item].candidates, queries[item].relevance):
                        out[n, index[page]] = grade
            return out

        best = evaluate_dataset(task.rows, oracle, "global", corpus=task.corpus, progress=False)
        assert best["ndcg_linear@5"] == pytest.approx(1.0) and best["hit@1"] == 1.0, name
        assert best["ndcg_exponential@5"] == pytest.approx(1.0), name
