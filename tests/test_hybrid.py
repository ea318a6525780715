"""Hybrid retrieval: BM25 statistics, fusion and the harness row."""

import numpy as np
import pytest

from llm2clip4cxr.evaluation.report_tasks import Scorer, bm25_scorer, findings_to_impression_retrieval
from llm2clip4cxr.hybrid import BM25Index, HybridScorer, fuse

from .test_evaluation_harness import ROWS, bag_of_words_encoder

CORPUS = ["Small left pleural effusion.", "No pneumothorax.", "Large right effusion.", "Heart size normal."]


def test_bm25_index_equals_the_bm25_baseline_and_round_trips(tmp_path):
    queries = ["pleural effusion", "pneumothorax", "unknown words only", "Right effusion"]
    index = BM25Index().index(CORPUS)
    scores = index.scores(queries)
    np.testing.assert_allclose(scores, bm25_scorer().score(queries, CORPUS), rtol=1e-6)
    assert not scores[2].any()
    index.save(tmp_path / "lexical")
    np.testing.assert_array_equal(BM25Index.load(tmp_path / "lexical").scores(queries), scores)
    with pytest.raises(FileNotFoundError, match="no BM25 statistics"):
        BM25Index.load(tmp_path)


def test_reciprocal_rank_fusion_by_hand():
    dense = np.array([[0.9, 0.1, 0.5]])  # ranks 1, 3, 2
    lexical = np.array([[0.0, 3.0, 3.0]])  # ranks 3, 1, 1 (a tie shares the best rank)
    fused = fuse(dense, lexical, "rrf", weights=(1.0, 2.0), rrf_k=60)
    expected = [1 / 61 + 2 / 63, 1 / 63 + 2 / 61, 1 / 62 + 2 / 61]
    np.testing.assert_allclose(fused[0], expected)
    normalized = fuse(dense, lexical, "normalized", weights=(1.0, 1.0))
    np.testing.assert_allclose(normalized[0], [1.0, 1.0, 0.5 + 1.0])
    with pytest.raises(ValueError, match="one of"):
        fuse(dense, lexical, "max")
    with pytest.raises(ValueError, match="not both 0"):
        fuse(dense, lexical, weights=(0.0, 0.0))


def test_hybrid_is_a_scorer_that_fixes_what_each_side_misses():
    # A dense model blind to every word but "effusion" cannot rank the left effusion above the right one;
    # BM25 can. Fusion puts the lexical match first.
    def dense(texts):
        vectors = np.array([[1.0, 0.0] if "effusion" in text.lower() else [0.0, 1.0] for text in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    hybrid = HybridScorer(dense)
    assert isinstance(hybrid, Scorer)
    scores = hybrid.score(["left pleural effusion"], CORPUS)
    assert scores[0].argmax() == 0
    studies = [{"uid": row["uid"], "findings": row["findings"], "impression": row["impression"]} for row in ROWS]
    result = findings_to_impression_retrieval(HybridScorer(bag_of_words_encoder), studies)
    assert 0 <= result["recall@1"] <= 1 and result["num_queries"] == len(ROWS)
