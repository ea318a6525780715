"""EmbeddingIndex: exact vs approximate search, persistence, incremental adds and input errors."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("faiss")

import llm2clip4cxr.retrieval.index as index_module  # noqa: E402
from llm2clip4cxr.retrieval.index import EmbeddingIndex  # noqa: E402

DIM = 64


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    vectors = unit(rng.standard_normal((5000, DIM)))
    ids = [f"doc{i}" for i in range(len(vectors))]
    queries = unit(
        vectors[rng.choice(len(vectors), 200, replace=False)] + 0.3 * rng.standard_normal((200, DIM)) / np.sqrt(DIM)
    )
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    return vectors, ids, queries, exact


def recall_at_10(positions: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(positions, exact)]))


def test_flat_matches_brute_force(corpus):
    vectors, ids, queries, exact = corpus
    index = EmbeddingIndex(DIM, kind="flat")
    index.add(vectors * 3.0, ids)  # scaled on purpose: normalisation must undo it
    scores, positions = index.search_raw(queries, 10)
    assert recall_at_10(positions, exact) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, exact, axis=1), rtol=1e-5, atol=1e-6)
    hits = index.search(queries[:1], 3)[0]
    assert [hit[0] for hit in hits] == [ids[j] for j in exact[0, :3]]


def test_hnsw_recall_rises_with_ef_search(corpus):
    vectors, ids, queries, exact = corpus
    index = EmbeddingIndex(DIM, kind="hnsw", hnsw_m=16, ef_construction=64, ef_search=10)
    index.add(vectors, ids)
    low = recall_at_10(index.search_raw(queries, 10)[1], exact)
    index.ef_search = 256
    high = recall_at_10(index.search_raw(queries, 10)[1], exact)
    assert low < 0.95 <= high, (low, high)  # genuinely approximate at ef 10, good at ef 256


def test_ivf_recall_rises_with_nprobe_and_is_exact_when_probing_all(corpus):
    vectors, ids, queries, exact = corpus
    index = EmbeddingIndex(DIM, kind="ivf", nlist=32, nprobe=1)
    assert not index.is_trained
    index.add(vectors, ids)  # trains on this first batch
    assert index.is_trained
    low = recall_at_10(index.search_raw(queries, 10)[1], exact)
    index.nprobe = 32
    assert low < 0.9 and recall_at_10(index.search_raw(queries, 10)[1], exact) == 1.0


def test_pq_recall_rises_with_k_factor_and_its_scores_are_exact(corpus):
    vectors, ids, queries, exact = corpus
    index = EmbeddingIndex(DIM, kind="pq", pq_m=16, k_factor=1)  # 4 dims per 4-bit code: coarse on purpose
    assert not index.is_trained
    index.add(vectors, ids)  # trains on this first batch
    low = recall_at_10(index.search_raw(queries, 10)[1], exact)
    index.k_factor = 100
    scores, positions = index.search_raw(queries, 10)
    high = recall_at_10(positions, exact)
    assert low < 0.9 and high >= 0.97, (low, high)
    # The candidates are re-ranked on the float vectors: the scores are the true inner products.
    np.testing.assert_allclose(
        scores, np.take_along_axis(queries @ vectors.T, positions, axis=1), rtol=1e-5, atol=1e-5
    )


def test_pq_needs_enough_training_vectors_and_a_dividing_pq_m(corpus):
    vectors, ids, _, _ = corpus
    with pytest.raises(ValueError, match="at least 256 training vectors.*got 10"):
        EmbeddingIndex(DIM, kind="pq").add(vectors[:10], ids[:10])
    with pytest.raises(ValueError, match="`pq_m` must divide `dim`=64"):
        EmbeddingIndex(DIM, kind="pq", pq_m=10)
    assert EmbeddingIndex(DIM, kind="pq").pq_m == DIM // 2


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "pq"])
def test_save_load_round_trip(corpus, tmp_path, kind):
    vectors, ids, queries, _ = corpus
    metadata = [{"row": i, "split": "test" if i % 2 else "train"} for i in range(len(ids))]
    index = EmbeddingIndex(DIM, kind=kind, hnsw_m=16, ef_construction=40, ef_search=32, nlist=16, nprobe=4, k_factor=7)
    index.add(vectors, ids, metadata)
    before = index.search_raw(queries, 10)
    index.save(tmp_path)
    loaded = EmbeddingIndex.load(tmp_path)
    assert loaded.get_config_dict() == index.get_config_dict() and loaded.ids == ids
    after = loaded.search_raw(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert loaded.search(queries[:1], 1)[0][0][2] == metadata[before[1][0, 0]]
    stored = loaded.get_vectors()
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16
    np.testing.assert_allclose(stored, vectors, atol=1e-3)


def test_save_is_atomic_and_replaces_previous_files(corpus, tmp_path):
    vectors, ids, _, _ = corpus
    index = EmbeddingIndex(DIM)
    index.add(vectors[:10], ids[:10])
    index.save(tmp_path)
    first = sorted(path.name for path in tmp_path.iterdir())
    index.add(vectors[10:20], ids[10:20])
    index.save(tmp_path)
    second = sorted(path.name for path in tmp_path.iterdir())
    # One generation folder each, swapped by index_config.json; the old one is gone, no temp file is left.
    assert len(first) == len(second) == 3 and set(first) & set(second) == {".lock", "index_config.json"}
    generation = next(name for name in second if name.startswith("generation-"))
    assert sorted(path.name for path in (tmp_path / generation).iterdir()) == [
        "index.faiss",
        "metadata.jsonl",
        "vectors.npy",
    ]
    assert len(EmbeddingIndex.load(tmp_path)) == 20

    config = json.loads((tmp_path / "index_config.json").read_text())
    config["size"] = 21  # what a config from another save would look like next to these files
    (tmp_path / "index_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="inconsistent.*says 21 vectors"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="index_config.json"):
        EmbeddingIndex.load(tmp_path / "missing")


def test_failed_save_keeps_the_previous_index(corpus, tmp_path, monkeypatch):
    vectors, ids, queries, _ = corpus
    index = EmbeddingIndex(DIM)
    index.add(vectors[:10], ids[:10])
    index.save(tmp_path)
    index.add(vectors[10:20], ids[10:20])

    def crash(path):
        path.write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(index, "_write_metadata", crash)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path)
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())
    loaded = EmbeddingIndex.load(tmp_path)
    reference = EmbeddingIndex(DIM)
    reference.add(vectors[:10], ids[:10])
    assert loaded.ids == ids[:10]
    np.testing.assert_array_equal(loaded.search_raw(queries, 5)[1], reference.search_raw(queries, 5)[1])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_incremental_add_matches_single_add(corpus, kind):
    vectors, ids, queries, _ = corpus
    settings = {"hnsw_m": 16, "ef_construction": 40, "ef_search": 64}
    whole = EmbeddingIndex(DIM, kind=kind, **settings)
    whole.add(vectors, ids)
    parts = EmbeddingIndex(DIM, kind=kind, **settings)
    for start, stop in [(0, 1000), (1000, 1001), (1001, 5000)]:
        parts.add(vectors[start:stop], ids[start:stop])
    assert len(parts) == 5000 and parts.ids == ids and "doc1000" in parts
    # HNSW builds are not bit-reproducible (parallel insertion), but these near-duplicate queries find their source.
    np.testing.assert_array_equal(parts.search_raw(queries, 10)[1][:, 0], whole.search_raw(queries, 10)[1][:, 0])
    np.testing.assert_allclose(parts.get_vectors(ids=["doc1000", "doc0"]), vectors[[1000, 0]], atol=1e-3)


def test_duplicate_ids_are_rejected_and_index_unchanged(corpus):
    vectors, ids, _, _ = corpus
    index = EmbeddingIndex(DIM)
    index.add(vectors[:3], ids[:3])
    with pytest.raises(ValueError, match="'doc2' is already in the index"):
        index.add(vectors[3:6], ["doc3", "doc4", "doc2"])
    with pytest.raises(ValueError, match="'x' appears more than once"):
        index.add(vectors[3:5], ["x", "x"])
    with pytest.raises(TypeError, match="strings, got 7 of type int"):
        index.add(vectors[3:4], [7])
    assert len(index) == 3 and index._index.ntotal == 3


def test_dimension_and_value_errors(corpus):
    vectors, ids, _, _ = corpus
    index = EmbeddingIndex(DIM)
    with pytest.raises(ValueError, match="The index is empty"):
        index.search(vectors[:1], 1)
    with pytest.raises(ValueError, match=r"shape \(n, 64\) for this index, got \(2, 32\)"):
        index.add(vectors[:2, :32], ids[:2])
    index.add(vectors[:5], ids[:5])
    with pytest.raises(ValueError, match=r"`queries` must have shape \(n, 64\).*got \(1, 63\)"):
        index.search(np.zeros((1, 63), np.float32), 1)
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        index.add(vectors[5:7], ["a"])
    bad = vectors[5:8].copy()
    bad[1] = 0.0
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        index.add(bad, ["a", "b", "c"])
    bad[1] = np.nan
    with pytest.raises(ValueError, match="row 1 has NaN"):
        index.add(bad, ["a", "b", "c"])
    with pytest.raises(ValueError, match="`k` must be a positive int, got 0"):
        index.search(vectors[:1], 0)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        EmbeddingIndex(DIM, kind="lsh")
    raw = EmbeddingIndex(DIM, normalize=False)
    with pytest.raises(ValueError, match="must fit float16"):
        raw.add(vectors[:1] * 1e6, ["big"])
    assert len(index) == 5 and len(raw) == 0


def test_metadata_is_returned_and_validated(corpus):
    vectors, ids, _, _ = corpus
    index = EmbeddingIndex(DIM)
    index.add(vectors[:2], ids[:2], metadata=[{"study": "s1", "view": "PA"}, {"study": "s2"}])
    index.add(vectors[2:3], ids[2:3])  # no metadata: returned as {}
    hits = index.search(vectors[:3], k=1)
    assert [hit[0] for hit in hits] == [("doc0", pytest.approx(1.0), {"study": "s1", "view": "PA"}),
                                        ("doc1", pytest.approx(1.0), {"study": "s2"}),
                                        ("doc2", pytest.approx(1.0), {})]
    hits[0][0][2]["view"] = "changed"  # callers get copies
    assert index.search(vectors[:1], k=1)[0][0][2]["view"] == "PA"
    assert len(index.search(vectors[:1], k=10)[0]) == 3  # fewer vectors than k
    with pytest.raises(ValueError, match="1 metadata entries for 2 ids"):
        index.add(vectors[3:5], ids[3:5], metadata=[{}])
    with pytest.raises(ValueError, match="metadata\\[0\\] is not JSON-serialisable"):
        index.add(vectors[3:4], ids[3:4], metadata=[{"array": np.zeros(2)}])


def test_ivf_training(corpus):
    vectors, ids, queries, exact = corpus
    index = EmbeddingIndex(DIM, kind="ivf", nlist=64, nprobe=64)
    with pytest.raises(ValueError, match="nlist=64 needs at least 64 training vectors.*got 10"):
        index.add(vectors[:10], ids[:10])
    index.train(vectors)  # explicit training; small adds then work
    index.add(vectors[:10], ids[:10])
    index.add(vectors[10:], ids[10:])
    assert recall_at_10(index.search_raw(queries, 10)[1], exact) == 1.0
    before = index._index
    index.train()  # retrain on the stored vectors: rebuilds from the float16 store, keeps ids
    assert index._index is not before and index.ids == ids
    # float16 rounding may swap near-tied neighbours, nothing more
    assert recall_at_10(index.search_raw(queries, 10)[1], exact) >= 0.99


def test_memmap_input_is_added_in_chunks_and_not_copied(corpus, tmp_path, monkeypatch):
    vectors, ids, queries, _ = corpus
    monkeypatch.setattr(index_module, "_CHUNK_ROWS", 700)  # several chunks, the last one partial
    source = np.lib.format.open_memmap(tmp_path / "embeddings.npy", mode="w+", dtype=np.float32, shape=vectors.shape)
    source[:] = vectors * 2.0
    source.flush()
    source = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    index = EmbeddingIndex(DIM)
    index.add(source, ids)
    assert index._segments[0][0] is source  # referenced, not copied
    in_memory = EmbeddingIndex(DIM)
    in_memory.add(vectors, ids)
    np.testing.assert_array_equal(index.search_raw(queries, 10)[1], in_memory.search_raw(queries, 10)[1])
    index.save(tmp_path / "index")
    np.testing.assert_allclose(EmbeddingIndex.load(tmp_path / "index").get_vectors(), vectors, atol=1e-3)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "llm2clip4cxr\[index\]"'):
        EmbeddingIndex(DIM)
