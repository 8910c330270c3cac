"""Retrieval metrics on embeddings (NumPy): cosine scores, local/global ranking, hit@k, NDCG@k and friends.

Shapes: Q queries, N candidates (corpus or padded candidate list), D embedding width, K = max(ks).

Every metric is computed per query and averaged. Relevance is graded: a float per (query, candidate), where
0 means "not relevant" and binary tasks use 1. The keys and definitions follow the MMEB-V2 score files written
by VLM2Vec (`hit@k`, `ndcg_linear@k`, `ndcg_exponential@k`, `precision@k`, `recall@k`, `f1@k`, `map@k`, `mrr@k`):

- hit@k: 1 if a relevant candidate is in the top k.
- ndcg_linear@k: DCG = sum_i rel_i / log2(i + 1) over ranks i = 1..k, divided by the DCG of the relevance
  grades sorted in decreasing order (the ideal ranking). ndcg_exponential@k uses the gain 2^rel - 1.
- precision@k = relevant in top k / k (k, not the list length, even for lists shorter than k);
  recall@k = relevant in top k / all relevant; f1@k their harmonic mean.
- map@k: sum of precision@i at each relevant rank i <= k, divided by min(#relevant, k); mrr@k: 1 / first
  relevant rank, 0 beyond k.

Ties: candidates with equal scores are ordered pessimistically, less relevant first and then by candidate index.
MMEB-V2 local lists always put the positive first, so breaking ties by index alone would hand a collapsed model
(every score equal) a perfect hit@1; with this rule it scores 0, and the result never depends on sort stability.
Difference from VLM2Vec: a candidate listed with grade 0 is not relevant here (VLM2Vec counts every listed
label as a hit); the two agree on every MMEB-V2 set, whose listed grades are positive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """float[..., D] -> float[..., D] with unit L2 norm (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_scores(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosine similarity: float[Q, D] x float[N, D] -> float64[Q, N]."""
    queries, candidates = np.asarray(queries), np.asarray(candidates)
    if queries.ndim != 2 or candidates.ndim != 2 or queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"expected float[Q, D] and float[N, D], got {queries.shape} and {candidates.shape}")
    if not (np.isfinite(queries).all() and np.isfinite(candidates).all()):
        raise ValueError("embeddings contain NaN or Inf")
    return l2_normalize(queries) @ l2_normalize(candidates).T


def rank_top_k(scores: np.ndarray, relevance: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best candidates per query, best first: float[Q, N] x float[Q, N] -> int[Q, min(k, N)].

    Order: score descending; among equal scores, relevance ascending, then index ascending (see module docstring).
    """
    if scores.shape != relevance.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and relevance {relevance.shape} must both be [Q, N]")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    num_candidates = scores.shape[1]
    k = min(k, num_candidates)
    index = np.broadcast_to(np.arange(num_candidates), scores.shape)
    # lexsort's last key is the primary one; it sorts along the last axis, one query per row.
    return np.lexsort((index, relevance, -scores), axis=-1)[:, :k]


def metrics_from_ranking(ranked_relevance: np.ndarray, relevance: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """Averaged metrics from the relevance of the ranked top candidates.

    Args:
      ranked_relevance: float[Q, K'] relevance grade of the candidate at each rank (K' may be < max(ks) when a
        list is short: missing ranks count as non-relevant, as an exhausted candidate list does).
      relevance: float[Q, N] every candidate's grade, for the number of relevant items and the ideal DCG.
      ks: cut-offs.
    Returns:
      {"hit@k", "ndcg_linear@k", "ndcg_exponential@k", "precision@k", "recall@k", "f1@k", "map@k", "mrr@k"}.
    """
    ks = tuple(sorted(ks))
    max_k = ks[-1]
    num_queries = relevance.shape[0]
    ranked = np.zeros((num_queries, max_k))
    ranked[:, : min(max_k, ranked_relevance.shape[1])] = ranked_relevance[:, :max_k]
    ranked = np.maximum(ranked, 0.0)
    is_hit = ranked > 0  # [Q, K]
    num_relevant = (relevance > 0).sum(axis=1)  # [Q]
    if (num_relevant == 0).any():
        bad = np.flatnonzero(num_relevant == 0)[:5].tolist()
        raise ValueError(f"queries without any relevant candidate (first: {bad}); every query needs a positive")
    ideal = -np.sort(-np.maximum(relevance, 0.0), axis=1)[:, :max_k]  # [Q, <=K] grades, best first
    ideal = np.pad(ideal, ((0, 0), (0, max_k - ideal.shape[1])))
    discount = 1.0 / np.log2(np.arange(2, max_k + 2))  # rank i (1-based) -> 1 / log2(i + 1)
    cum_hits = np.cumsum(is_hit, axis=1)  # [Q, K]
    rank = np.arange(1, max_k + 1)
    first_hit = np.where(is_hit.any(axis=1), is_hit.argmax(axis=1) + 1, np.inf)  # [Q] 1-based, inf if none

    def dcg(gains, k):
        return (gains[:, :k] * discount[:k]).sum(axis=1)

    per_metric = {name: {} for name in ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1")}
    per_metric.update(map={}, mrr={})
    for k in ks:
        hits_k = cum_hits[:, k - 1]
        precision = hits_k / k
        recall = hits_k / num_relevant
        per_metric["hit"][k] = (hits_k > 0).astype(float)
        per_metric["ndcg_linear"][k] = dcg(ranked, k) / dcg(ideal, k)
        per_metric["ndcg_exponential"][k] = dcg(2.0**ranked - 1, k) / dcg(2.0**ideal - 1, k)
        per_metric["precision"][k] = precision
        per_metric["recall"][k] = recall
        per_metric["f1"][k] = np.where(hits_k > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-30), 0.0)
        precision_at_hits = (is_hit[:, :k] * cum_hits[:, :k] / rank[:k]).sum(axis=1)
        per_metric["map"][k] = precision_at_hits / np.minimum(num_relevant, k)
        per_metric["mrr"][k] = np.where(first_hit <= k, 1.0 / first_hit, 0.0)
    return {f"{name}@{k}": float(np.mean(values)) for name, by_k in per_metric.items() for k, values in by_k.items()}


def ranking_metrics(scores: np.ndarray, relevance: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """Metrics of a dense score matrix: float[Q, N] scores and float[Q, N] relevance grades (0 = not relevant)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevance = np.asarray(relevance, dtype=np.float64)
    top = rank_top_k(scores, relevance, max(ks))
    return metrics_from_ranking(np.take_along_axis(relevance, top, axis=1), relevance, ks)


def local_ranking_metrics(
    query_embeddings: np.ndarray,
    candidate_embeddings: Sequence[np.ndarray],
    relevance: Sequence[Sequence[float]] | None = None,
    ks=DEFAULT_KS,
) -> dict[str, float]:
    """Each query ranked against its own candidate list.

    Args:
      query_embeddings: float[Q, D].
      candidate_embeddings: Q arrays float[C_q, D]; lists may differ in length.
      relevance: Q sequences of C_q grades; None means the MMEB-V2 convention, the first candidate is the only
        positive (binary).
      ks: cut-offs.
    """
    query_embeddings = np.asarray(query_embeddings)
    num_queries = query_embeddings.shape[0]
    if num_queries == 0:
        raise ValueError("no queries")
    if len(candidate_embeddings) != num_queries:
        raise ValueError(f"{num_queries} queries but {len(candidate_embeddings)} candidate lists")
    if relevance is not None and len(relevance) != num_queries:
        raise ValueError(f"{num_queries} queries but {len(relevance)} relevance lists")
    max_len = max(len(c) for c in candidate_embeddings)
    # Short lists are padded with -inf scores so padding always ranks last and never counts as relevant.
    scores = np.full((num_queries, max_len), -np.inf)
    grades = np.zeros((num_queries, max_len))
    for q, cands in enumerate(candidate_embeddings):
        n = len(cands)
        if n == 0:
            raise ValueError(f"query {q} has an empty candidate list")
        scores[q, :n] = cosine_scores(query_embeddings[q : q + 1], np.asarray(cands))[0]
        if relevance is None:
            grades[q, 0] = 1.0
        else:
            if len(relevance[q]) != n:
                raise ValueError(f"query {q}: {n} candidates but {len(relevance[q])} relevance grades")
            grades[q, :n] = relevance[q]
    return ranking_metrics(scores, grades, ks)


def global_ranking_metrics(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    qrels: Sequence[int | Sequence[int] | Mapping[int, float]],
    ks=DEFAULT_KS,
    *,
    query_block: int = 1024,
    corpus_block: int = 16384,
) -> dict[str, float]:
    """Each query ranked against the whole (deduplicated) corpus, by blocked top-k.

    No [Q, N] matrix exists: queries go in blocks of `query_block` and, for each, the corpus in blocks of
    `corpus_block`; only the best max(ks) candidates of each query survive from one corpus block to the next
    (ordered as `rank_top_k` orders them, ties included), so memory is O(query_block x corpus_block) whatever
    the corpus size, and the result equals a dense ranking exactly.

    Args:
      query_embeddings: float[Q, D].
      corpus_embeddings: float[N, D] (a NumPy array or memmap; read block by block).
      qrels: per query, the relevant corpus rows: one index or a sequence of indices (binary relevance), or a
        mapping index -> grade (graded relevance).
      ks: cut-offs.
      query_block, corpus_block: block sizes (memory only; results do not depend on them).
    """
    query_embeddings = np.asarray(query_embeddings)
    num_queries, num_corpus = query_embeddings.shape[0], corpus_embeddings.shape[0]
    if num_queries == 0 or num_corpus == 0:
        raise ValueError(f"need queries and a corpus, got {num_queries} queries and {num_corpus} candidates")
    if len(qrels) != num_queries:
        raise ValueError(f"{num_queries} queries but {len(qrels)} qrels entries")
    if query_block < 1 or corpus_block < 1:
        raise ValueError(f"block sizes must be >= 1, got {query_block} and {corpus_block}")
    relevance_rows = [_qrels_to_dict(entry, num_corpus, q) for q, entry in enumerate(qrels)]
    top = blocked_top_k(query_embeddings, corpus_embeddings, relevance_rows, max(ks), query_block=query_block,
                        corpus_block=corpus_block)
    ranked = np.array([[rels.get(int(i), 0.0) for i in row] for rels, row in zip(relevance_rows, top)])
    # Only the count of relevant items and their grades matter beyond the top k: a compact [Q, R] table.
    width = max(len(rels) for rels in relevance_rows)
    grades = np.zeros((num_queries, max(width, 1)))
    for q, rels in enumerate(relevance_rows):
        grades[q, : len(rels)] = list(rels.values())
    return metrics_from_ranking(ranked.reshape(num_queries, -1), grades, ks)


def blocked_top_k(query_embeddings: np.ndarray, corpus_embeddings: np.ndarray,
                  relevance: Sequence[Mapping[int, float]], k: int, *, query_block: int = 1024,
                  corpus_block: int = 16384) -> np.ndarray:
    """int[Q, min(k, N)]: the k best corpus rows per query by cosine similarity, best first, without a [Q, N] matrix.

    The order is `rank_top_k`'s (score descending, then relevance ascending, then index ascending), so the result
    is the dense ranking's top k exactly. `relevance[q]` maps corpus rows to grades (absent = 0).
    """
    query_embeddings = np.asarray(query_embeddings)
    num_queries, num_corpus = query_embeddings.shape[0], corpus_embeddings.shape[0]
    k = min(k, num_corpus)
    out = np.zeros((num_queries, k), np.int64)
    for q0 in range(0, num_queries, query_block):
        queries = query_embeddings[q0 : q0 + query_block]
        rows = relevance[q0 : q0 + query_block]
        best_score = np.full((len(queries), 0), -np.inf)
        best_grade = np.zeros((len(queries), 0))
        best_index = np.zeros((len(queries), 0), np.int64)
        for c0 in range(0, num_corpus, corpus_block):
            block = np.asarray(corpus_embeddings[c0 : c0 + corpus_block])
            scores = cosine_scores(queries, block)
            grades = np.zeros_like(scores)
            for r, rels in enumerate(rows):
                for index, grade in rels.items():
                    if c0 <= index < c0 + block.shape[0]:
                        grades[r, index - c0] = grade
            index = np.broadcast_to(np.arange(c0, c0 + block.shape[0]), scores.shape)
            score = np.concatenate([best_score, scores], axis=1)
            grade = np.concatenate([best_grade, grades], axis=1)
            index = np.concatenate([best_index, index], axis=1)
            if np.isnan(score).any():
                raise ValueError("scores contain NaN")
            order = np.lexsort((index, grade, -score), axis=-1)[:, :k]
            best_score = np.take_along_axis(score, order, axis=1)
            best_grade = np.take_along_axis(grade, order, axis=1)
            best_index = np.take_along_axis(index, order, axis=1)
        out[q0 : q0 + len(queries)] = best_index
    return out


def _qrels_to_dict(entry, num_corpus: int, query: int) -> dict[int, float]:
    if isinstance(entry, Mapping):
        rels = {int(i): float(g) for i, g in entry.items()}
    elif isinstance(entry, (int, np.integer)):
        rels = {int(entry): 1.0}
    else:
        rels = {int(i): 1.0 for i in entry}
    for index in rels:
        if not 0 <= index < num_corpus:
            raise ValueError(f"query {query}: qrels index {index} outside the corpus of {num_corpus}")
    return rels
