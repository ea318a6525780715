"""Retrieval metrics with explicit ground truth, and explicit rules for duplicate report texts.

Ground truth is always a mapping `query id -> set of relevant corpus ids`; nothing here assumes that
query i matches corpus item i (the "diagonal"), because CXR test sets break that assumption: one
study has several images, and many reports are word-for-word identical ("No acute cardiopulmonary
process.").

Rank convention (used by every metric below): the rank of a query is the 1-based rank of its
best-scoring relevant corpus item, with ties broken pessimistically:

    rank = 1 + #{non-relevant corpus items whose score >= the best relevant score}

i.e. within a group of tied scores the non-relevant items are placed first. A model that gives every
item the same score therefore gets the worst possible rank (N - |relevant| + 1), never the best.
Other relevant items tied with the best one are not counted: whichever of them comes first is a hit.
"""

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DUPLICATE_RULES = ("collapse", "count_as_relevant", "none")

# Rows of the score matrix handled at once: bounds the (rows, N) boolean mask to ~64 MiB at N = 64k.
_QUERY_CHUNK = 1024


def first_relevant_ranks(
    scores,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant: Mapping[str, Iterable[str]],
) -> np.ndarray:
    """1-based rank of the best-scoring relevant corpus item for every query (pessimistic ties).

    Args:
        scores: `(num_queries, num_corpus)` similarities, higher is better (numpy array or anything
            `np.asarray` accepts, e.g. a CPU tensor). Row i belongs to `query_ids[i]`, column j to
            `corpus_ids[j]`.
        query_ids: ids of the rows, unique.
        corpus_ids: ids of the columns, unique.
        relevant: query id -> relevant corpus ids. Extra queries are ignored.

    Returns:
        int64 array of shape `(num_queries,)`, see the module docstring for the tie rule.

    Raises:
        ValueError: shape/id mismatch, duplicate ids, NaN scores, a relevant id that is not in
            `corpus_ids`, or a query with no relevant item (the query id is named).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"`scores` must be 2-D (num_queries, num_corpus), got shape {scores.shape}.")
    query_ids, corpus_ids = list(query_ids), list(corpus_ids)
    if scores.shape != (len(query_ids), len(corpus_ids)):
        raise ValueError(
            f"`scores` has shape {scores.shape} but there are {len(query_ids)} query ids and "
            f"{len(corpus_ids)} corpus ids; rows must be queries and columns corpus items."
        )
    _check_unique(query_ids, "query_ids")
    corpus_position = {corpus_id: j for j, corpus_id in enumerate(_check_unique(corpus_ids, "corpus_ids"))}
    relevant_columns = [_relevant_columns(query_id, relevant, corpus_position) for query_id in query_ids]

    ranks = np.empty(len(query_ids), dtype=np.int64)
    for start in range(0, len(query_ids), _QUERY_CHUNK):
        block = scores[start : start + _QUERY_CHUNK].astype(np.float64, copy=False)
        nan_rows = np.flatnonzero(np.isnan(block).any(axis=1))
        if nan_rows.size:
            raise ValueError(
                f"`scores` has NaN for query {query_ids[start + nan_rows[0]]!r}; rank would be undefined."
            )
        mask = np.zeros(block.shape, dtype=bool)
        for row, columns in enumerate(relevant_columns[start : start + len(block)]):
            mask[row, columns] = True
        best_relevant = np.where(mask, block, -np.inf).max(axis=1)
        ranks[start : start + len(block)] = 1 + ((block >= best_relevant[:, None]) & ~mask).sum(axis=1)
    return ranks


def retrieval_metrics(
    scores,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant: Mapping[str, Iterable[str]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K, MRR and mean/median rank from a similarity matrix and explicit ground truth.

    Args:
        scores: `(num_queries, num_corpus)` similarities, higher is better.
        query_ids: ids of the rows of `scores`.
        corpus_ids: ids of the columns of `scores`.
        relevant: query id -> set of relevant corpus ids (every query needs at least one).
        ks: cut-offs for recall@K.

    Returns:
        `{"recall@K": ..., "mrr": ..., "mean_rank": ..., "median_rank": ...}` where, per query, the rank
        is that of the first relevant item (pessimistic ties, see the module docstring) and:

        - `recall@K` is the fraction of queries with at least one relevant item in the top K. This is the
          CLIP-retrieval convention (a "hit rate"), not the IR recall |relevant in top K| / |relevant|.
        - `mrr` is the mean of 1 / rank (no cut-off).
        - `mean_rank` / `median_rank` are the mean / median of the ranks.

    Raises:
        ValueError: see `first_relevant_ranks`, and for non-positive `ks`.
    """
    ks = _check_ks(ks)
    return metrics_from_ranks(first_relevant_ranks(scores, query_ids, corpus_ids, relevant), ks)


def ranking_metrics(
    rankings: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Iterable[str]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """The metrics of `retrieval_metrics` from ranked lists of corpus ids (e.g. `EmbeddingIndex.search`).

    Args:
        rankings: query id -> corpus ids, best first. The order is taken as given (no tie handling).
            Lists may be truncated (top-k); they should hold at least `max(ks)` ids unless they cover
            the whole corpus, otherwise recall@K is underestimated (this cannot be checked here).
        relevant: query id -> set of relevant corpus ids.
        ks: cut-offs for recall@K.

    Returns:
        Same keys as `retrieval_metrics`. A query whose list holds no relevant id gets rank infinity:
        a miss for every recall@K, 0 towards `mrr`, and `mean_rank` becomes `inf` (pass complete
        rankings, or use `retrieval_metrics`, for finite rank statistics).

    Raises:
        ValueError: a query without relevant items, an empty `rankings`, or a list with a repeated id.
    """
    ks = _check_ks(ks)
    if not rankings:
        raise ValueError("`rankings` is empty; pass one ranked list of corpus ids per query.")
    ranks = np.empty(len(rankings), dtype=np.float64)
    for i, (query_id, ranked) in enumerate(rankings.items()):
        ranked = list(ranked)
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"The ranking of query {query_id!r} repeats a corpus id; each id may appear once.")
        targets = _relevant_set(query_id, relevant)
        ranks[i] = next((position for position, corpus_id in enumerate(ranked, 1) if corpus_id in targets), np.inf)
    return metrics_from_ranks(ranks, ks)


def metrics_from_ranks(ranks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`recall@K`, `mrr`, `mean_rank`, `median_rank` from 1-based first-relevant ranks (inf = not found)."""
    ks = _check_ks(ks)
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"`ranks` must be a non-empty 1-D array, got shape {ranks.shape}.")
    if (ranks < 1).any() or np.isnan(ranks).any():
        raise ValueError(f"Ranks are 1-based; got {ranks[(ranks < 1) | np.isnan(ranks)][0]}.")
    metrics = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    metrics["mrr"] = float((1.0 / ranks).mean())
    metrics["mean_rank"] = float(ranks.mean())
    metrics["median_rank"] = float(np.median(ranks))
    return metrics


@dataclass(frozen=True)
class DuplicateResolution:
    """Ground truth after a duplicate-text rule; evaluate with `retrieval_metrics(resolution.select(scores), ...)`.

    Attributes:
        rule: the rule applied ("collapse", "count_as_relevant" or "none").
        corpus_ids: the corpus after the rule, in the original column order. Only "collapse" drops ids
            (all but the first of each group of identical texts).
        corpus_columns: `(len(corpus_ids),)` int64 positions of `corpus_ids` in the original corpus, so
            `scores[:, corpus_columns]` (or `embeddings[corpus_columns]`) is the matching score matrix.
        relevant: query id -> relevant corpus ids, expressed in `corpus_ids`.
        representative: every original corpus id -> the id that stands for it (itself unless collapsed).
    """

    rule: str
    corpus_ids: list[str]
    corpus_columns: np.ndarray
    relevant: dict[str, set[str]]
    representative: dict[str, str]

    def select(self, scores) -> np.ndarray:
        """The columns of a `(num_queries, original_num_corpus)` score matrix that `corpus_ids` keeps."""
        scores = np.asarray(scores)
        if scores.ndim != 2 or scores.shape[1] != len(self.representative):
            raise ValueError(
                f"Expected scores of shape (num_queries, {len(self.representative)}) over the original corpus, "
                f"got {scores.shape}."
            )
        return scores[:, self.corpus_columns]


def normalize_report_text(text: str) -> str:
    """The key under which two report texts count as identical: stripped, whitespace collapsed, casefolded."""
    return " ".join(str(text).split()).casefold()


def _checked_relevance(relevant: Mapping[str, Iterable[str]], corpus_texts: Mapping[str, str]) -> dict[str, set]:
    """`relevant` as sets, every id checked against the corpus."""
    resolved = {}
    for query_id, items in relevant.items():
        items = set(items)
        unknown = items - corpus_texts.keys()
        if unknown:
            raise ValueError(f"relevant[{query_id!r}] names corpus ids not in `corpus_texts`: {sorted(unknown)[:5]}.")
        resolved[query_id] = items
    return resolved


def _shared_by_text_twins(resolved: dict[str, set], query_texts: Mapping[str, str]) -> dict[str, set]:
    """Queries with identical (normalised) text get identical rankings, so each gets the union of its twins'
    relevant items."""
    missing = [query_id for query_id in resolved if query_id not in query_texts]
    if missing:
        raise ValueError(f"Queries {missing[:5]} are in `relevant` but not in `query_texts`.")
    twins: dict[str, set[str]] = {}
    for query_id, items in resolved.items():
        twins.setdefault(normalize_report_text(query_texts[query_id]), set()).update(items)
    return {q: set(twins[normalize_report_text(query_texts[q])]) for q in resolved}


def relevant_with_duplicates(
    query_texts: Mapping[str, str] | None,
    corpus_texts: Mapping[str, str],
    relevant: Mapping[str, Iterable[str]],
    rule: str,
) -> DuplicateResolution:
    """Make the ground truth explicit about corpus items whose (normalised) texts are identical.

    A text encoder cannot tell identical texts apart, so without a rule a perfect model loses a hit
    whenever the "wrong" copy of a duplicated report ranks first. Texts are compared after
    `normalize_report_text` (strip, collapse whitespace, casefold).

    Rules:
        - "count_as_relevant": every corpus item whose text equals that of a relevant item is also
          relevant; the corpus is unchanged. This is what the LLM2Vec4CXR authors' evaluation script
          does (it matches on whitespace-collapsed text, without casefolding).
        - "collapse": identical corpus texts are merged into one corpus entry, the first in
          `corpus_texts` order; relevance is remapped to it. The corpus shrinks, so recall@K is over
          the unique texts. This is what CXR-CLIP does for image-to-text retrieval (it matches on the
          raw string).
        - "none": duplicates are ordinary distinct items; only the given relevance counts. Texts are
          not read. Use it to reproduce diagonal-style numbers or when texts are known to be unique.

    Args:
        query_texts: query id -> text, when the queries are texts (report-to-report, report-to-image).
            Queries with identical text get identical rankings, so under "count_as_relevant" and
            "collapse" each gets the union of the relevant items of all its text twins. Pass None when
            the queries are images.
        corpus_texts: corpus id -> text, in the column order of the score matrix. For an image corpus,
            pass the report paired with each image.
        relevant: query id -> relevant corpus ids.
        rule: one of `DUPLICATE_RULES`.

    Returns:
        A `DuplicateResolution`; the query set and order never change.

    Raises:
        ValueError: unknown `rule`, a relevant id missing from `corpus_texts`, or a query of `relevant`
            missing from `query_texts`.
    """
    if rule not in DUPLICATE_RULES:
        raise ValueError(f"`rule` must be one of {DUPLICATE_RULES}, got {rule!r}.")
    corpus_ids = list(corpus_texts)
    resolved = _checked_relevance(relevant, corpus_texts)
    identity = {corpus_id: corpus_id for corpus_id in corpus_ids}
    if rule == "none":
        return DuplicateResolution(rule, corpus_ids, np.arange(len(corpus_ids), dtype=np.int64), resolved, identity)

    key = {corpus_id: normalize_report_text(text) for corpus_id, text in corpus_texts.items()}
    groups: dict[str, list[str]] = {}
    for corpus_id in corpus_ids:
        groups.setdefault(key[corpus_id], []).append(corpus_id)

    if rule == "count_as_relevant":
        representative = identity
        kept = list(range(len(corpus_ids)))
        resolved = {q: {twin for c in items for twin in groups[key[c]]} for q, items in resolved.items()}
    else:  # collapse
        representative = {corpus_id: groups[key[corpus_id]][0] for corpus_id in corpus_ids}
        kept = [j for j, corpus_id in enumerate(corpus_ids) if representative[corpus_id] == corpus_id]
        resolved = {q: {representative[c] for c in items} for q, items in resolved.items()}

    if query_texts is not None:
        resolved = _shared_by_text_twins(resolved, query_texts)
    return DuplicateResolution(
        rule,
        [corpus_ids[j] for j in kept],
        np.asarray(kept, dtype=np.int64),
        resolved,
        representative,
    )


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"`ks` must be a non-empty sequence of positive ints, got {ks!r}.")
    return ks


def _check_unique(ids: list[str], name: str) -> list[str]:
    if len(set(ids)) != len(ids):
        duplicate = next(i for i, count in Counter(ids).items() if count > 1)
        raise ValueError(f"`{name}` must be unique; {duplicate!r} appears more than once.")
    return ids


def _relevant_set(query_id: str, relevant: Mapping[str, Iterable[str]]) -> set[str]:
    items = set(relevant.get(query_id, ()))
    if not items:
        raise ValueError(
            f"Query {query_id!r} has no relevant corpus item; give it at least one in `relevant` or drop the query."
        )
    return items


def _relevant_columns(query_id: str, relevant: Mapping[str, Iterable[str]], corpus_position: dict) -> list[int]:
    items = _relevant_set(query_id, relevant)
    unknown = [corpus_id for corpus_id in items if corpus_id not in corpus_position]
    if unknown:
        raise ValueError(
            f"relevant[{query_id!r}] names corpus ids that are not in `corpus_ids`: {sorted(unknown)[:5]}. "
            "Evaluate on a corpus that contains them, or remove them from the ground truth."
        )
    return [corpus_position[corpus_id] for corpus_id in items]
