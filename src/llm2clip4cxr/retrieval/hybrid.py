"""Hybrid report retrieval: dense embeddings fused with BM25 (bm25s).

Dense encoders and lexical scoring fail differently: a small encoder misses rare words (a drug, a
device name, a measurement) that BM25 matches exactly, while BM25 cannot tell "no effusion" from
"effusion". Fusing the two rankings keeps both signals.

Fusion methods (`fuse`):
    "zscore" (the default of the CLI, `fuse`, `HybridScorer` and `EmbeddingIndex.search_hybrid`): standardise each
        model's scores per query over the candidates (minus their mean, over their standard deviation), then
        w_dense * dense + w_lexical * lexical (the "ZMUV" normalisation of Montague and Aslam 2001). A side with one
        clear match (a rare word that one report shares) stands far above its field and outvotes the other; a
        side whose scores are all alike adds little.
    "normalized": min-max normalise each model's scores per query over the candidates, then the same weighted sum.
        Every query's best match scores 1 on each side, however weak its lead.
    "rrf": reciprocal-rank fusion, score = w_dense / (k + rank_dense) + w_lexical / (k + rank_lexical), with ranks
        over the scored candidates and k = 60 (Cormack et al. 2009); needs no score calibration.
Default: "zscore" with weights dense 4 : lexical 1 (`defaults.DEFAULT_FUSION_WEIGHTS`), chosen by
`training/tune_fusion.py` on 269 development studies that neither the model it tuned with nor the reported
held-out split contains: a twin of the default, trained by the same recipe on 80% of the studies, was fused
with BM25 over a grid (the three methods, dense weight 0-6 against lexical 1), and the mean of
findings->impression strict and unique-impression R@1 picked the setting (docs/results/fusion_tuning.json).
There, zscore 4:1 scored strict 0.476 / unique 0.487 against normalized 3:1 (the earlier default) 0.487 / 0.454,
the twin alone 0.502 / 0.345, BM25 0.212 / 0.471 and TF-IDF 0.201 / 0.445; rrf scored lower at every dense
weight above 0.

`BM25Index` keeps the lexical statistics of a corpus and saves them beside an `EmbeddingIndex`;
`HybridScorer` is the harness's `Scorer` for evaluating an encoder + BM25 pair as one model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..defaults import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHTS, FUSION_METHODS

RRF_K = 60
DEFAULT_WEIGHTS = DEFAULT_FUSION_WEIGHTS
_PARAMS_FILE = "bm25_settings.json"


def _bm25s():
    try:
        import bm25s
    except ImportError as error:
        raise ImportError('Hybrid retrieval needs bm25s: pip install "llm2clip4cxr[index]"') from error
    return bm25s


def _check_ngrams(ngrams: int) -> None:
    if ngrams not in (1, 2):
        raise ValueError(f"`ngrams` must be 1 or 2, got {ngrams}.")


def bm25_tokens(texts: Sequence[str], ngrams: int = 2) -> list[list[str]]:
    """Lower-cased word tokens, plus word bigrams ("no effusion", "left pleural") when `ngrams` is 2.

    No stop words are removed: "no" and "without" carry the negations reports hinge on. Bigrams let BM25 tell
    "no effusion" from "left effusion"; on findings->impression over 4 random 310-study draws of the
    *training* studies they raised BM25's unique-impression R@1 from 0.320 to 0.361 (with unique query terms).
    """
    _check_ngrams(ngrams)
    words = _bm25s().tokenize(list(texts), stopwords=None, return_ids=False, show_progress=False)
    if ngrams == 1:
        return words
    return [tokens + [f"{first} {second}" for first, second in zip(tokens, tokens[1:])] for tokens in words]


class BM25Index:
    """BM25 (Lucene variant) statistics of a corpus; `scores` gives every document's score for each query.

    Each distinct query term counts once: a long query (a findings section) that repeats "pleural" five times
    would otherwise outweigh its rarer, more specific words (measured: unique-impression R@1 0.280 -> 0.320 on
    the training draws above, unigrams).
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75, ngrams: int = 2):
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}.")
        _check_ngrams(ngrams)
        self.k1, self.b, self.ngrams = k1, b, ngrams
        self._retriever = None
        self.size = 0
        self.idf_documents = 0

    def index(self, corpus: Sequence[str], idf_texts: Sequence[str] | None = None) -> BM25Index:
        """Index `corpus`. `idf_texts`: count the document frequencies of the IDF over these texts instead of
        the corpus (they should include it). A small corpus of short texts gives a noisy IDF: scoring 166
        impressions, IDF counted over the findings and impressions of the same studies raised findings->impression
        R@1 from 0.158 to 0.188 (unique impressions 0.347 -> 0.408) on 4 random 310-study draws of the
        *training* studies, level with TF-IDF fitted on the whole reports (0.188 / 0.406)."""
        corpus = list(corpus)
        if not corpus:
            raise ValueError("BM25Index.index: the corpus is empty.")
        corpus_tokens = bm25_tokens(corpus, self.ngrams)
        self._retriever = _bm25s().BM25(k1=self.k1, b=self.b)
        self._retriever.index(corpus_tokens, show_progress=False)
        self.size = len(corpus)
        self.idf_documents = self.size
        if idf_texts is not None:
            idf_texts = list(idf_texts)
            if not idf_texts:
                raise ValueError("BM25Index.index: `idf_texts` is empty; pass None to count over the corpus.")
            self._reweight_idf(corpus_tokens, bm25_tokens(idf_texts, self.ngrams))
            self.idf_documents = len(idf_texts)
        return self

    def _reweight_idf(self, corpus_tokens: list[list[str]], idf_tokens: list[list[str]]) -> None:
        # bm25s has no option for outside document frequencies, so its (document x term) score matrix, whose
        # column of term t is idf(t) * tf-part, is rescaled column by column by idf_outside(t) / idf_corpus(t).
        def lucene_idf(documents):
            frequencies = Counter(term for tokens in documents for term in set(tokens))
            count = len(documents)
            return lambda term: math.log(1 + (count - frequencies[term] + 0.5) / (frequencies[term] + 0.5))

        corpus_idf, outside_idf = lucene_idf(corpus_tokens), lucene_idf(idf_tokens)
        scores = self._retriever.scores
        data, pointers = scores["data"], scores["indptr"]
        for term, column in self._retriever.vocab_dict.items():
            if column + 1 >= len(pointers):  # bm25s' empty placeholder token has no column
                continue
            start, end = pointers[column], pointers[column + 1]
            if end > start:
                data[start:end] *= outside_idf(term) / corpus_idf(term)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """`(len(queries), size)` float32 BM25 scores; a query without word tokens scores 0 everywhere."""
        if self._retriever is None:
            raise ValueError("BM25Index has no corpus: call `index(texts)` or `BM25Index.load(folder)` first.")
        out = np.zeros((len(queries), self.size), dtype=np.float32)
        vocabulary = self._retriever.vocab_dict
        for i, tokens in enumerate(bm25_tokens(queries, self.ngrams)):
            known = [token for token in dict.fromkeys(tokens) if token in vocabulary]
            if known:  # bm25s rejects tokens it never saw
                out[i] = self._retriever.get_scores(known)
        return out

    def save(self, folder) -> None:
        """Write the statistics into `folder` (bm25s' own numpy/JSON files, no pickle)."""
        if self._retriever is None:
            raise ValueError("BM25Index.save: nothing indexed.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(folder), show_progress=False)
        settings = {"k1": self.k1, "b": self.b, "ngrams": self.ngrams, "size": self.size,
                    "idf_documents": self.idf_documents}
        (folder / _PARAMS_FILE).write_text(json.dumps(settings) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder) -> BM25Index:
        folder = Path(folder)
        settings_file = folder / _PARAMS_FILE
        if not settings_file.is_file():
            raise FileNotFoundError(f"{folder}: no BM25 statistics ({_PARAMS_FILE} is missing).")
        try:
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            # Statistics saved before bigrams existed were unigram ones.
            index = cls(settings["k1"], settings["b"], settings.get("ngrams", 1))
            index._retriever = _bm25s().BM25.load(str(folder), show_progress=False)
            index.size = int(settings["size"])
            index.idf_documents = int(settings.get("idf_documents", index.size))
        except (ValueError, KeyError, OSError) as error:
            raise ValueError(f"{folder}: unreadable BM25 statistics ({error}); rebuild the index.") from None
        return index


def bm25_scores(queries: Sequence[str], corpus: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """`(len(queries), len(corpus))` BM25 scores with the IDF counted over the corpus and the queries together, as
    the TF-IDF baseline is fitted on every text of an evaluation (see `BM25Index.index`)."""
    queries, corpus = list(queries), list(corpus)
    return BM25Index(k1, b).index(corpus, idf_texts=corpus + queries).scores(queries)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks of every column per row (ties share the best rank), float64."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    # Tied scores get the best rank of their group, so fusion does not depend on column order.
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    first_of_group = np.concatenate([np.ones((scores.shape[0], 1), bool), np.diff(sorted_scores, axis=1) != 0], axis=1)
    group_rank = np.maximum.accumulate(np.where(first_of_group, np.arange(1, scores.shape[1] + 1)[None, :], 0), axis=1)
    ranks[rows, order] = group_rank
    return ranks.astype(np.float64)


def _check_fusion_method(method: str) -> None:
    if method not in FUSION_METHODS:
        raise ValueError(f"`method` must be one of {FUSION_METHODS}, got {method!r}.")


def fuse(
    dense: np.ndarray,
    lexical: np.ndarray,
    method: str = DEFAULT_FUSION,
    weights: tuple[float, float] = DEFAULT_WEIGHTS,
    rrf_k: int = RRF_K,
) -> np.ndarray:
    """Fused `(num_queries, num_candidates)` scores of two score matrices over the same candidates (higher is
    better). See the module docstring for the methods."""
    dense, lexical = np.asarray(dense, dtype=np.float64), np.asarray(lexical, dtype=np.float64)
    if dense.shape != lexical.shape or dense.ndim != 2:
        raise ValueError(
            f"dense and lexical scores must be 2-D and of one shape, got {dense.shape} and {lexical.shape}."
        )
    _check_fusion_method(method)
    w_dense, w_lexical = weights
    if w_dense < 0 or w_lexical < 0 or w_dense + w_lexical == 0:
        raise ValueError(f"`weights` must be non-negative and not both 0, got {weights}.")
    if method == "rrf":
        return w_dense / (rrf_k + _ranks(dense)) + w_lexical / (rrf_k + _ranks(lexical))
    standardize = _min_max if method == "normalized" else _z_scores
    return w_dense * standardize(dense) + w_lexical * standardize(lexical)


def _min_max(scores: np.ndarray) -> np.ndarray:
    low, high = scores.min(axis=1, keepdims=True), scores.max(axis=1, keepdims=True)
    return (scores - low) / np.where(high > low, high - low, 1.0)


def _z_scores(scores: np.ndarray) -> np.ndarray:
    # A row without spread (a query with no word in the corpus) carries no ranking: all zeros. Equal scores are
    # tested as such, since their float mean can differ from them by a rounding error.
    flat = scores.min(axis=1, keepdims=True) == scores.max(axis=1, keepdims=True)
    deviation = np.where(flat, 1.0, scores.std(axis=1, keepdims=True))
    return np.where(flat, 0.0, (scores - scores.mean(axis=1, keepdims=True)) / deviation)


def hybrid_name(model_name: str, method: str = DEFAULT_FUSION, weights: tuple[float, float] = DEFAULT_WEIGHTS) -> str:
    """The harness row name of a hybrid, e.g. "hybrid (default + bm25, normalized 0.5:1)"."""
    dense, lexical = (f"{weight:g}" for weight in weights)
    return f"hybrid ({model_name} + bm25, {method} {dense}:{lexical})"


class HybridScorer:
    """An Encoder (texts -> L2-normalised embeddings) and BM25 fused into one `Scorer` for the harness.

    The lexical side is `bm25_scores` (IDF counted over the corpus and the queries together).
    """

    def __init__(
        self,
        encoder: Callable[[Sequence[str]], np.ndarray],
        method: str = DEFAULT_FUSION,
        weights: tuple[float, float] = DEFAULT_WEIGHTS,
        k1: float = 1.5,
        b: float = 0.75,
    ):
        _check_fusion_method(method)
        self.encoder, self.method, self.weights, self.k1, self.b = encoder, method, weights, k1, b

    def score(self, queries: Sequence[str], corpus: Sequence[str]) -> np.ndarray:
        queries, corpus = list(queries), list(corpus)
        dense = self.encoder(queries) @ self.encoder(corpus).T
        lexical = bm25_scores(queries, corpus, self.k1, self.b)
        return fuse(dense, lexical, self.method, self.weights).astype(np.float32)


__all__ = [
    "BM25Index", "DEFAULT_FUSION", "DEFAULT_WEIGHTS", "FUSION_METHODS", "HybridScorer", "RRF_K", "bm25_scores",
    "bm25_tokens", "fuse", "hybrid_name",
]
