"""Hybrid retrieval: BM25 statistics, fusion and the harness row."""

import json

import numpy as np
import pytest

from llm2clip4cxr.evaluation.baselines import bm25_scorer
from llm2clip4cxr.evaluation.tasks import Scorer, findings_to_impression_retrieval
from llm2clip4cxr.retrieval.hybrid import BM25Index, HybridScorer, fuse

from ..evaluation.test_harness import ROWS, bag_of_words_encoder

CORPUS = ["Small left pleural effusion.", "No pneumothorax.", "Large right effusion.", "Heart size normal."]


def test_bm25_index_equals_the_bm25_baseline_and_round_trips(tmp_path):
    queries = ["pleural effusion", "pneumothorax", "unknown words only", "Right effusion"]
    index = BM25Index().index(CORPUS, idf_texts=CORPUS + queries)
    scores = index.scores(queries)
    np.testing.assert_allclose(scores, bm25_scorer().score(queries, CORPUS), rtol=1e-6)
    assert not scores[2].any()
    index.save(tmp_path / "lexical")
    loaded = BM25Index.load(tmp_path / "lexical")
    np.testing.assert_array_equal(loaded.scores(queries), scores)
    assert loaded.idf_documents == len(CORPUS + queries)
    with pytest.raises(FileNotFoundError, match="no BM25 statistics"):
        BM25Index.load(tmp_path)


def _lucene_bm25(queries, corpus, k1=1.5, b=0.75, idf_texts=None):
    """Reference: Lucene BM25 (no (k1 + 1) factor since Lucene 8) over words + bigrams, each distinct query
    term once; document frequencies counted over `idf_texts` (default: the corpus)."""
    import math
    import re

    def terms(text):
        words = re.findall(r"\b\w\w+\b", text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    docs = [terms(text) for text in corpus]
    idf_docs = docs if idf_texts is None else [terms(text) for text in idf_texts]
    average = sum(map(len, docs)) / len(docs)
    out = np.zeros((len(queries), len(corpus)))
    for i, query in enumerate(queries):
        for term in dict.fromkeys(terms(query)):
            frequency = sum(term in doc for doc in idf_docs)
            idf = math.log(1 + (len(idf_docs) - frequency + 0.5) / (frequency + 0.5))
            for j, doc in enumerate(docs):
                tf = doc.count(term)
                out[i, j] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / average)) if tf else 0.0
    return out


def test_bm25_scores_equal_a_hand_computed_lucene_bm25_with_bigrams():
    queries = ["No left pleural effusion. Pleural effusion, pleural thickening.", "left effusion", "no"]
    np.testing.assert_allclose(BM25Index().index(CORPUS).scores(queries), _lucene_bm25(queries, CORPUS), rtol=1e-5)
    # The bigram "left pleural" ranks the left effusion above the right one; unigrams alone tie on "effusion".
    scores = BM25Index().index(CORPUS).scores(["left pleural effusion"])[0]
    assert scores[0] > scores[2] > 0


def test_bm25_idf_counted_over_other_texts_equals_the_hand_computed_reference():
    queries = ["No left pleural effusion. Pleural effusion, pleural thickening.", "left effusion", "heart size"]
    # "effusion" is in half the corpus but rare among the background texts, so its IDF (and score) rises.
    background = CORPUS + ["Heart size normal. Lungs clear.", "No acute disease.", "Normal heart size.",
                           "Clear lungs, no pneumothorax."]
    index = BM25Index().index(CORPUS, idf_texts=background)
    np.testing.assert_allclose(index.scores(queries), _lucene_bm25(queries, CORPUS, idf_texts=background), rtol=1e-5)
    assert index.scores(["effusion"])[0, 0] > BM25Index().index(CORPUS).scores(["effusion"])[0, 0]
    with pytest.raises(ValueError, match="idf_texts"):
        BM25Index().index(CORPUS, idf_texts=[])


def test_bm25_statistics_saved_before_bigrams_load_as_unigram_ones(tmp_path):
    BM25Index(ngrams=1).index(CORPUS).save(tmp_path)
    settings = json.loads((tmp_path / "bm25_settings.json").read_text())
    del settings["ngrams"]
    (tmp_path / "bm25_settings.json").write_text(json.dumps(settings))
    loaded = BM25Index.load(tmp_path)
    assert loaded.ngrams == 1
    np.testing.assert_array_equal(
        loaded.scores(["left effusion"]), BM25Index(ngrams=1).index(CORPUS).scores(["left effusion"])
    )


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


def test_z_score_fusion_by_hand_and_blind_to_each_models_scale_and_offset():
    dense = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2]])
    lexical = np.array([[0.0, 3.0, 6.0], [0.0, 0.0, 9.0]])
    fused = fuse(dense, lexical, "zscore", weights=(2.0, 1.0))
    spread = np.sqrt(np.mean(np.square([0.4, -0.4, 0.0])))  # population standard deviation of row 0
    expected_row0 = 2 * np.array([0.4, -0.4, 0.0]) / spread + np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3)
    np.testing.assert_allclose(fused[0], expected_row0)
    # A row without spread adds nothing (no division by zero): row 1 is the lexical z-scores alone.
    np.testing.assert_allclose(fused[1], [-3 / np.sqrt(18), -3 / np.sqrt(18), 6 / np.sqrt(18)])
    # Each query's scores may come on any scale: a positive scale and an offset per row change nothing.
    rng = np.random.default_rng(0)
    dense, lexical = rng.standard_normal((4, 7)), rng.gamma(2.0, size=(4, 7))
    scale, offset = rng.uniform(0.1, 10, (4, 1)), rng.uniform(-5, 5, (4, 1))
    np.testing.assert_allclose(fuse(dense * scale + offset, lexical * scale[::-1] - offset, "zscore"),
                               fuse(dense, lexical, "zscore"))


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
    # The lexical side counts IDF over the corpus and the queries, as the BM25 baseline does.
    lexical = bm25_scorer().score(["left pleural effusion"], CORPUS)
    dense_scores = dense(["left pleural effusion"]) @ dense(CORPUS).T
    np.testing.assert_allclose(scores, fuse(dense_scores, lexical), rtol=1e-6)
    studies = [{"uid": row["uid"], "findings": row["findings"], "impression": row["impression"]} for row in ROWS]
    result = findings_to_impression_retrieval(HybridScorer(bag_of_words_encoder), studies)
    assert 0 <= result["recall@1"] <= 1 and result["num_queries"] == len(ROWS)


def test_index_hybrid_search_saves_its_statistics_and_equals_a_full_fusion(tmp_path):
    pytest.importorskip("faiss")
    from llm2clip4cxr.errors import CorruptFileError, InputError
    from llm2clip4cxr.retrieval.index import EmbeddingIndex

    texts = [f"{side} {size} pleural effusion, {extra}" for side in ("left", "right") for size in ("small", "large")
             for extra in ("no pneumothorax", "heart normal", "stable", "new", "improved")]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(texts), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = EmbeddingIndex(dim=16)
    index.add(vectors, ids=[f"r{i}" for i in range(len(texts))], metadata=[{"text": t} for t in texts])
    with pytest.raises(InputError, match="no BM25 statistics"):
        index.search_hybrid(vectors[:1], ["left effusion"], k=3)
    index.set_lexical(texts)
    with pytest.raises(InputError, match="add\\(\\) all vectors first"):
        index.add(vectors[:1], ids=["late"])
    queries, query_texts = vectors[[3, 7]], ["small left pleural effusion", "right large effusion improved"]
    hybrid = index.search_hybrid(queries, query_texts, k=5, candidates=len(texts))
    # With every row a candidate, the result is the fusion of the full dense and BM25 score matrices.
    dense = queries @ index.get_vectors().astype(np.float32).T
    full = fuse(dense, BM25Index().index(texts).scores(query_texts))
    for row, hits in enumerate(hybrid):
        expected = np.argsort(-full[row], kind="stable")[:5]
        assert [hit[0] for hit in hits] == [f"r{i}" for i in expected]
        np.testing.assert_allclose([hit[1] for hit in hits], full[row, expected], rtol=1e-6)
        assert hits[0][2] == {"text": texts[expected[0]]}

    index.save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.search_hybrid(queries, query_texts, k=5, candidates=len(texts)) == hybrid
    config = json.loads((tmp_path / "index" / "index_config.json").read_text())
    lexical_files = [entry["path"] for role, entry in config["files"].items() if role.startswith("lexical:")]
    assert lexical_files  # hashed like every other file of the generation
    damaged = tmp_path / "index" / lexical_files[0]
    damaged.write_bytes(damaged.read_bytes()[:-3])
    with pytest.raises(CorruptFileError):
        EmbeddingIndex.load(tmp_path / "index")
