"""Retrieval metrics and the MMEB-V2 evaluation helpers against hand-computed values on tiny fixtures."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import pytrec_eval
from PIL import Image

from btoks_jax.evaluate import metrics, mmeb

VLM2VEC_KEYS = [f"{m}@{k}" for m in ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map",
                                     "mrr") for k in (1, 5, 10)]


# ===================================== metrics =====================================


def test_local_binary_hand_computed():
    # Query 0 scores: positive 0, negative 1, negative -1 -> positive at rank 2. Query 1: positive ranks first.
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    candidates = [np.array([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 3.0]])]
    got = metrics.local_ranking_metrics(queries, candidates)
    assert list(got) == VLM2VEC_KEYS
    expected = {
        "hit@1": 0.5, "hit@5": 1.0,
        "ndcg_linear@1": 0.5, "ndcg_linear@5": (1 / np.log2(3) + 1) / 2,
        "precision@1": 0.5, "precision@5": 0.2, "recall@5": 1.0,
        "f1@5": 2 * 0.2 * 1.0 / 1.2,
        "map@5": (1 / 2 + 1) / 2, "mrr@1": 0.5, "mrr@5": (1 / 2 + 1) / 2,
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_local_relevance_overrides_first_candidate():
    queries = np.array([[1.0, 0.0]])
    candidates = [np.array([[0.0, 1.0], [1.0, 0.0]])]
    got = metrics.local_ranking_metrics(queries, candidates, relevance=[[0.0, 1.0]])
    assert got["hit@1"] == 1.0


def test_global_graded_hand_computed():
    # Scores of the one query against d0..d3: 1, 0.8, 0, -1. Grades: d1 = 2, d2 = 1 -> ranked grades [0, 2, 1, 0].
    query = np.array([[1.0, 0.0]])
    corpus = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    got = metrics.global_ranking_metrics(query, corpus, [{1: 2.0, 2: 1.0}])
    dcg = 2 / np.log2(3) + 1 / np.log2(4)
    ideal = 2 / np.log2(2) + 1 / np.log2(3)
    dcg_exp = 3 / np.log2(3) + 1 / np.log2(4)
    ideal_exp = 3 / np.log2(2) + 1 / np.log2(3)
    assert got["hit@1"] == 0.0 and got["hit@5"] == 1.0
    assert got["ndcg_linear@5"] == pytest.approx(dcg / ideal, abs=1e-12)
    assert got["ndcg_exponential@5"] == pytest.approx(dcg_exp / ideal_exp, abs=1e-12)
    assert got["ndcg_linear@1"] == 0.0
    assert got["precision@5"] == pytest.approx(2 / 5)
    assert got["recall@1"] == 0.0 and got["recall@5"] == 1.0
    assert got["map@5"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["mrr@10"] == pytest.approx(1 / 2)


def test_global_binary_gold_ids_and_lists():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    corpus = np.array([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
    as_ints = metrics.global_ranking_metrics(queries, corpus, [0, 2])
    # Query 1: d1 (score ~1) then d0 (~0.1) then its gold d2 (0) -> rank 3.
    assert as_ints["hit@1"] == 0.5
    assert as_ints["ndcg_linear@5"] == pytest.approx((1 + 1 / np.log2(4)) / 2)
    as_lists = metrics.global_ranking_metrics(queries, corpus, [[0], [2, 1]])
    assert as_lists["hit@1"] == 1.0
    # Query 1 with gold {1, 2}: ranks 1 and 3 of 2 relevant.
    assert as_lists["ndcg_linear@5"] == pytest.approx((1 + (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))) / 2)
    assert as_lists["recall@1"] == pytest.approx((1 + 1 / 2) / 2)


def test_ties_are_pessimistic():
    # A collapsed model (all scores equal) must not get credit for the positive sitting first in the list.
    queries = np.ones((3, 4))
    candidates = [np.ones((5, 4))] * 3
    got = metrics.local_ranking_metrics(queries, candidates)
    assert got["hit@1"] == 0.0 and got["hit@5"] == 1.0
    assert got["mrr@10"] == pytest.approx(1 / 5)
    # Among tied relevant items, the lower grade ranks first.
    order = metrics.rank_top_k(np.zeros((1, 3)), np.array([[2.0, 0.0, 1.0]]), 3)
    assert order.tolist() == [[1, 2, 0]]


def test_short_lists_count_missing_ranks_as_misses():
    queries = np.array([[1.0, 0.0]])
    got = metrics.local_ranking_metrics(queries, [np.array([[1.0, 0.0], [0.0, 1.0]])])
    assert got["precision@10"] == pytest.approx(1 / 10)
    assert got["hit@10"] == 1.0 and got["ndcg_linear@10"] == 1.0


def test_blocked_top_k_equals_the_dense_ranking(tmp_path):
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(23, 6)), rng.normal(size=(37, 6))
    corpus[5] = corpus[30] = corpus[2]  # exact ties across corpus blocks, broken by grade then index
    qrels = [{int(i): float(rng.integers(1, 3)) for i in rng.choice(37, 3, replace=False)} for _ in range(23)]
    qrels[0] = {30: 1.0, 11: 2.0}
    dense = np.zeros((23, 37))
    for q, rels in enumerate(qrels):
        for i, g in rels.items():
            dense[q, i] = g
    want = metrics.rank_top_k(metrics.cosine_scores(queries, corpus), dense, 10)
    got = metrics.blocked_top_k(queries, corpus, qrels, 10, query_block=4, corpus_block=5)
    np.testing.assert_array_equal(got, want)
    whole = metrics.ranking_metrics(metrics.cosine_scores(queries, corpus), dense)
    blocked = metrics.global_ranking_metrics(queries, corpus, qrels, query_block=4, corpus_block=5)
    assert blocked == pytest.approx(whole, abs=1e-12)
    # A memory-mapped corpus is read block by block.
    np.save(tmp_path / "corpus.npy", corpus)
    mapped = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    assert metrics.global_ranking_metrics(queries, mapped, qrels, corpus_block=8) == pytest.approx(whole, abs=1e-12)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="relevant"):
        metrics.local_ranking_metrics(np.ones((1, 2)), [np.ones((2, 2))], relevance=[[0.0, 0.0]])
    with pytest.raises(ValueError, match="outside"):
        metrics.global_ranking_metrics(np.ones((1, 2)), np.ones((2, 2)), [5])
    with pytest.raises(ValueError, match="NaN"):
        metrics.cosine_scores(np.full((1, 2), np.nan), np.ones((2, 2)))


# ===================================== against trec_eval =====================================

TREC_KS = (1, 3, 5, 10, 20)  # 20 is longer than the candidate lists below


def _graded_relevance(rng, num_queries, num_candidates):
    """int[Q, N] grades 0..3, mostly 0, every query with at least one relevant candidate."""
    grades = rng.choice(4, size=(num_queries, num_candidates), p=[0.6, 0.2, 0.1, 0.1])
    rows = np.flatnonzero(grades.max(axis=1) == 0)
    grades[rows, rng.integers(num_candidates, size=len(rows))] = rng.integers(1, 4, size=len(rows))
    return grades


def _trec_eval(scores, grades, ks=TREC_KS):
    """Per query, the project's metric keys computed from trec_eval's measures (pytrec_eval).

    trec_eval orders equal scores by document name, descending; each query's documents are named so that this
    order is the project's (less relevant first, then by index), so tied rankings compare too. Where the
    definitions differ the library's numbers are converted: map@k divides the summed precisions by
    min(#relevant, k) where trec_eval's map_cut divides by #relevant; mrr@k is recip_rank, 0 beyond rank k;
    ndcg_exponential@k is ndcg_cut on the gains 2^g - 1; f1@k the harmonic mean of P and recall.
    """
    cut = ",".join(str(k) for k in ks)
    qrels, qrels_exponential, run = {}, {}, {}
    for q, (row_scores, row_grades) in enumerate(zip(scores, grades)):
        tie_order = np.lexsort((np.arange(len(row_grades)), row_grades))
        names = {int(c): f"d{len(row_grades) - 1 - position:03d}" for position, c in enumerate(tie_order)}
        qrels[f"q{q}"] = {names[c]: int(g) for c, g in enumerate(row_grades)}
        qrels_exponential[f"q{q}"] = {names[c]: 2 ** int(g) - 1 for c, g in enumerate(row_grades)}
        run[f"q{q}"] = {names[c]: float(x) for c, x in enumerate(row_scores)}
    linear = pytrec_eval.RelevanceEvaluator(
        qrels, {f"success.{cut}", f"ndcg_cut.{cut}", f"P.{cut}", f"recall.{cut}", f"map_cut.{cut}", "recip_rank"}
    ).evaluate(run)
    exponential = pytrec_eval.RelevanceEvaluator(qrels_exponential, {f"ndcg_cut.{cut}"}).evaluate(run)
    per_query = []
    for q, row_grades in enumerate(grades):
        lib, num_relevant = linear[f"q{q}"], int((row_grades > 0).sum())
        values = {}
        for k in ks:
            precision, recall = lib[f"P_{k}"], lib[f"recall_{k}"]
            values |= {
                f"hit@{k}": lib[f"success_{k}"],
                f"ndcg_linear@{k}": lib[f"ndcg_cut_{k}"],
                f"ndcg_exponential@{k}": exponential[f"q{q}"][f"ndcg_cut_{k}"],
                f"precision@{k}": precision,
                f"recall@{k}": recall,
                f"f1@{k}": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                f"map@{k}": lib[f"map_cut_{k}"] * num_relevant / min(num_relevant, k),
                f"mrr@{k}": lib["recip_rank"] if lib["recip_rank"] * k >= 1 else 0.0,
            }
        per_query.append(values)
    return per_query


@pytest.mark.parametrize("ties", [False, True], ids=["distinct_scores", "tied_scores"])
def test_ranking_metrics_match_trec_eval(ties):
    rng = np.random.default_rng(1 + ties)
    grades = _graded_relevance(rng, 60, 12)
    # Three score levels make most rankings tie; the float scores of the other case have no ties.
    scores = rng.integers(3, size=grades.shape).astype(float) if ties else rng.normal(size=grades.shape)
    assert ties == any(len(set(row)) < len(row) for row in scores)
    expected = _trec_eval(scores, grades)
    for q in range(len(grades)):
        got = metrics.ranking_metrics(scores[q : q + 1], grades[q : q + 1], TREC_KS)
        assert set(got) == set(expected[q])
        for key, value in expected[q].items():
            assert got[key] == pytest.approx(value, abs=1e-12), (q, key)
    averaged = metrics.ranking_metrics(scores, grades, TREC_KS)
    for key in averaged:
        assert averaged[key] == pytest.approx(np.mean([e[key] for e in expected]), abs=1e-12), key


def test_local_and_global_ranking_match_trec_eval():
    """Embeddings end to end: ragged local lists (trec_eval sees only each query's real candidates) and a
    global corpus with graded qrels. Random float embeddings, so no ties."""
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(25, 8))
    lists = [rng.normal(size=(int(n), 8)) for n in rng.integers(1, 15, size=25)]
    grades = [_graded_relevance(rng, 1, len(c))[0] for c in lists]

    def cosine(a, b):
        return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T

    got = metrics.local_ranking_metrics(queries, lists, grades, TREC_KS)
    expected = [_trec_eval(cosine(queries[q : q + 1], c), g[None])[0] for q, (c, g) in enumerate(zip(lists, grades))]
    assert got == pytest.approx({key: np.mean([e[key] for e in expected]) for key in got}, abs=1e-12)

    corpus = rng.normal(size=(40, 8))
    corpus_grades = _graded_relevance(rng, 25, 40)
    qrels = [{int(i): float(g) for i, g in enumerate(row) if g} for row in corpus_grades]
    got = metrics.global_ranking_metrics(queries, corpus, qrels, TREC_KS)
    expected = _trec_eval(cosine(queries, corpus), corpus_grades)
    assert got == pytest.approx({key: np.mean([e[key] for e in expected]) for key in got}, abs=1e-12)


# ===================================== MMEB-V2 map =====================================


def test_mmeb_v2_map_has_78_datasets():
    specs = mmeb.MMEB_V2_DATASETS
    assert len(specs) == 78 and len({s.name for s in specs}) == 78
    assert Counter(s.modality for s in specs) == {"image": 36, "video": 18, "visdoc": 24}
    assert Counter(s.group for s in specs) == {
        "image/CLS": 10, "image/QA": 10, "image/RET": 12, "image/GD": 4,
        "video/CLS": 5, "video/QA": 5, "video/RET": 5, "video/MRET": 3,
        "visdoc/ViDoRe-V1": 10, "visdoc/ViDoRe-V2": 4, "visdoc/VisRAG": 6, "visdoc/OOD": 4,
    }
    assert {s.metric for s in specs if s.modality != "visdoc"} == {"hit@1"}
    assert {s.metric for s in specs if s.modality == "visdoc"} == {"ndcg_linear@5"}
    assert all(s.ranking == "local" for s in specs if s.modality == "image")
    assert all(s.ranking == "global" for s in specs if s.modality == "visdoc")
    assert {s.name for s in specs if s.modality == "video" and s.ranking == "local"} == {
        "SmthSmthV2", "MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA", "QVHighlight",
        "Charades-STA", "MomentSeeker"}


# ===================================== reader =====================================


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


def _rows():
    return [
        {"qry_inst": "<|image_1|> Represent the image:", "qry_text": "", "qry_img_path": "img/a.png",
         "tgt_inst": "", "tgt_text": ["cat", "dog", "cat"], "tgt_img_path": ["", "", ""]},
        {"qry_inst": "Find the image:", "qry_text": "a cat", "qry_img_path": "",
         "tgt_inst": "<|image_1|> Represent the image.", "tgt_text": ["", ""],
         "tgt_img_path": ["img/a.png", "img/b.png"], "qrels": [0, 2]},
        {"qry_inst": "Find the video:", "qry_text": "running", "qry_img_path": None,
         "tgt_inst": "", "tgt_text": [""], "tgt_img_path": [""], "tgt_video_path": ["frames"]},
    ]


@pytest.fixture
def data_dir(tmp_path):
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    for i in (1, 0):
        _image(tmp_path / "frames" / f"{i:03d}.jpg")
    return tmp_path



def test_read_jsonl_and_parquet(data_dir, write_jsonl):
    from_jsonl = mmeb.read_eval_rows(write_jsonl(data_dir / "set.jsonl", _rows()))
    keys = list(dict.fromkeys(k for row in _rows() for k in row))  # from_pylist takes its columns from row 1
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in _rows()]), data_dir / "set.parquet")
    from_parquet = mmeb.read_eval_rows(data_dir / "set.parquet")
    assert from_jsonl == from_parquet and len(from_jsonl) == 3
    first, second, third = from_jsonl
    assert first.query.image == str(data_dir / "img" / "a.png") and first.query.kind == "image"
    assert first.relevance == (1.0, 0.0, 0.0)
    assert second.relevance == (0.0, 2.0) and second.candidates[1].image == str(data_dir / "img" / "b.png")
    assert third.candidates[0].video == (str(data_dir / "frames" / "000.jpg"), str(data_dir / "frames" / "001.jpg"))


@pytest.mark.parametrize("row_update, field", [
    ({"tgt_img_path": ["", ""]}, "tgt_img_path"),
    ({"qry_img_path": "img/missing.png"}, "qry_img_path"),
    ({"tgt_text": "cat"}, "tgt_text"),
    ({"qrels": [0, 0, 0]}, "qrels"),
    ({"qry_inst": 3}, "qry_inst"),
])
def test_bad_rows_name_file_row_and_field(data_dir, row_update, field, write_jsonl):
    rows = _rows()
    rows[1] = rows[0] | row_update
    path = write_jsonl(data_dir / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"bad\.jsonl: row 2: field '{field}'"):
        mmeb.read_eval_rows(path)
    rows = _rows()
    del rows[0]["tgt_inst"]
    with pytest.raises(ValueError, match=r"row 1: field 'tgt_inst': missing"):
        mmeb.read_eval_rows(write_jsonl(data_dir / "bad.jsonl", rows))


# ===================================== evaluate_dataset =====================================


class TableEmbed:
    """A fake model: looks up a fixed vector per item text or image name, and records every call."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, items):
        self.calls.append(list(items))
        keys = [item.image.rsplit("/", 1)[-1] if item.image else item.text or "video" for item in items]
        return np.array([self.table[k] for k in keys], dtype=np.float32)


def test_evaluate_local_with_cache_and_batches(data_dir, write_jsonl):
    rows = mmeb.read_eval_rows(write_jsonl(data_dir / "set.jsonl", _rows()[:2]))
    embed = TableEmbed({"cat": [0, 1], "dog": [1, 0], "a cat": [0.1, 1], "a.png": [1, 0], "b.png": [1, 0.1]})
    scores = mmeb.evaluate_dataset(rows, embed, "local", batch_size=2, progress=False)
    # Row 1: image a ranks dog over the positive cat. Row 2: "a cat" ranks b (the relevant one) over a.
    assert scores["hit@1"] == 0.5 and scores["num_pred"] == 2 and scores["num_data"] == 2
    embedded = [item for call in embed.calls for item in call]
    assert len(embedded) == len(set(embedded)) == 6  # the repeated "cat" candidate is embedded once
    assert max(len(call) for call in embed.calls) <= 2


def test_evaluate_global_shares_corpus(data_dir):
    rows = [
        mmeb.EvalRow(mmeb.Item("q0"), (mmeb.Item("d0"),), (1.0,)),
        mmeb.EvalRow(mmeb.Item("q1"), (mmeb.Item("d1"), mmeb.Item("d0")), (1.0, 0.0)),
    ]
    embed = TableEmbed({"q0": [1, 0], "q1": [1, 0.2], "d0": [1, 0], "d1": [0, 1], "d2": [1, 0.3]})
    scores = mmeb.evaluate_dataset(rows, embed, "global", corpus=[mmeb.Item("d2")], progress=False)
    # q0: d0 first (hit). q1 (angle ~11 deg): d2 (~5.4 deg off), d0 (~11), d1 (~79) -> gold d1 at rank 3.
    assert scores["hit@1"] == 0.5
    assert scores["mrr@5"] == pytest.approx((1 + 1 / 3) / 2)
    cache = mmeb.EmbeddingCache(embed, batch_size=8, progress=False)
    first = mmeb.evaluate_dataset(rows, cache, "global", progress=False)
    calls = len(embed.calls)
    again = mmeb.evaluate_dataset(rows, cache, "global", progress=False)
    assert first == again and len(embed.calls) == calls  # everything came from the cache


def test_score_files_and_partial_summary(tmp_path):
    mmeb.write_score_file(tmp_path / "image", "ImageNet-1K", {"hit@1": 0.8, "num_pred": 10})
    mmeb.write_score_file(tmp_path / "visdoc", "ViDoSeek-page-fixed", {"ndcg_linear@5": 0.5})
    mmeb.write_score_file(tmp_path, "emoji_i2t", {"hit@1": 0.25})
    scores = mmeb.load_score_files(tmp_path)
    assert json.loads((tmp_path / "image" / "ImageNet-1K_score.json").read_text()) == {"hit@1": 0.8, "num_pred": 10}
    summary = mmeb.summarize(scores)
    assert not summary["complete"]
    assert summary["overall"]["score"] == pytest.approx(0.65) and summary["overall"]["partial"]
    assert summary["overall"]["evaluated"] == 2 and len(summary["overall"]["missing"]) == 76
    assert summary["meta_tasks"]["image/CLS"]["score"] == pytest.approx(0.8)
    assert summary["modalities"]["video"]["score"] is None
    assert summary["extra_datasets"] == {"emoji_i2t": {"metric": "hit@1", "score": 0.25}}
    assert "partial: 2/78" in mmeb.format_summary(summary)
    mmeb.write_summary(tmp_path / "summary.json", summary)
    assert json.loads((tmp_path / "summary.json").read_text())["overall"]["evaluated"] == 2


def test_complete_summary_is_plain_mean_over_78():
    scores = {s.name: {s.metric: i / 100} for i, s in enumerate(mmeb.MMEB_V2_DATASETS)}
    summary = mmeb.summarize(scores)
    assert summary["complete"] and not summary["overall"]["partial"]
    assert summary["overall"]["score"] == pytest.approx(np.mean(np.arange(78)) / 100)
    assert summary["modalities"]["image"]["score"] == pytest.approx(np.mean(np.arange(36)) / 100)
