"""The Qdrant backend (`llm2clip4cxr.retrieval.qdrant_backend`) in qdrant-client's embedded local mode (`path=`), and
against a stub HTTP server where a server's behaviour (a failed upsert, no server at all) is the point."""

import http.server
import json
import socket
import threading

import numpy as np
import pytest

from llm2clip4cxr.errors import InputError, OutputLockedError, ServiceUnavailableError
from llm2clip4cxr.retrieval.index import EmbeddingIndex
from llm2clip4cxr.retrieval.qdrant_backend import QdrantIndex, collection_settings, point_id

pytest.importorskip("qdrant_client")

INFO = {"encoder": {"model": None, "instruction": "Find reports"}}
VIEWS = ("PA", "AP", "LATERAL")


def vectors(count, dim=64, seed=0):
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    embeddings = vectors(2000)
    ids = [f"study-{i}" for i in range(len(embeddings))]
    metadata = [{"view": VIEWS[i % 3], "split": "test" if i % 5 == 0 else "train"} for i in range(len(ids))]
    return embeddings, ids, metadata


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """An embedded collection holding the corpus, closed again (reopened, not changed, by each test)."""
    embeddings, ids, metadata = corpus
    path = tmp_path_factory.mktemp("qdrant") / "store"
    with QdrantIndex.connect("reports", path=path) as index:
        assert index.ensure(64, INFO, hnsw_m=8, ef_construct=50, quantization="int8", payload_keys=["view"])
        index.add(embeddings, ids, metadata, batch_size=300)
    return path


def test_top_10_equals_the_exact_faiss_index_on_the_same_vectors(corpus, built):
    embeddings, ids, metadata = corpus
    faiss_index = EmbeddingIndex(dim=64, kind="flat")
    faiss_index.add(embeddings, ids=ids, metadata=metadata)
    queries = vectors(25, seed=1)
    expected = faiss_index.search(queries, k=10)
    with QdrantIndex.connect("reports", path=built) as index:
        assert len(index) == 2000 and index.dim == 64
        found = index.search(queries, k=10)
    assert [[hit[0] for hit in hits] for hits in found] == [[hit[0] for hit in hits] for hits in expected]
    np.testing.assert_allclose([[hit[1] for hit in hits] for hits in found],
                               [[hit[1] for hit in hits] for hits in expected], atol=1e-5)
    assert found[0][0][2] == dict(expected[0][0][2])  # the payload is the metadata, without the id


def test_a_reopened_collection_keeps_its_info_and_filters_by_payload(corpus, built):
    embeddings, ids, metadata = corpus
    queries = vectors(5, seed=2)
    with QdrantIndex.connect("reports", path=built, must_exist=True) as index:
        assert index.info == INFO
        pa_only = index.search(queries, k=10, filter={"view": "PA"})
        either = index.search(queries, k=10, filter={"view": ["PA", "AP"], "split": "test"})
    # The filtered top 10 is the exact top 10 of the matching rows.
    for wanted, results in (({"PA"}, {"train", "test"}), pa_only), (({"PA", "AP"}, {"test"}), either):
        views, splits = wanted
        keep = np.array([m["view"] in views and m["split"] in splits for m in metadata])
        normalized = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ normalized[keep].T
        kept_ids = np.array(ids)[keep]
        for row, hits in zip(scores, results):
            assert [hit[0] for hit in hits] == list(kept_ids[np.argsort(-row)[:10]])
            assert all(hit[2]["view"] in views and hit[2]["split"] in splits for hit in hits)


def test_adding_an_id_again_overwrites_its_point(tmp_path):
    embeddings, ids = vectors(100), [f"study-{i}" for i in range(100)]
    with QdrantIndex.connect("reports", path=tmp_path / "qdrant") as index:
        index.ensure(64, INFO)
        index.add(embeddings, ids, [{"split": "old"}] * 100)
        index.add(-embeddings[:10], ids[:10], [{"split": "new"}] * 10)
        assert len(index) == 100
        best = index.search(-embeddings[3], k=1)[0][0]
    assert best[0] == ids[3] and best[2]["split"] == "new" and best[1] == pytest.approx(1.0, abs=1e-5)
    assert point_id("study-3") == point_id("study-3") != point_id("study-4")


def test_another_dimension_or_encoder_is_refused(built):
    with QdrantIndex.connect("reports", path=built) as index:
        with pytest.raises(InputError, match="holds 64-d vectors, these are 32-d"):
            index.ensure(32, INFO)
        other = {"encoder": {"model": "/models/other", "instruction": "Find reports"}}
        with pytest.raises(InputError, match="was built with .*vectors of two encoders cannot be searched"):
            index.ensure(64, other)
        with pytest.raises(InputError, match="holds 64-d vectors; got queries of shape"):
            index.search(vectors(1, dim=32), k=3)
        with pytest.raises(InputError, match="holds 64-d vectors, got 32-d"):
            index.add(vectors(2, dim=32), ["a", "b"])
        with pytest.raises(InputError, match="may not have an 'id' key"):
            index.add(vectors(1), ["a"], [{"id": "b"}])
    with QdrantIndex.connect("missing", path=built) as index:
        assert not index.exists()
        with pytest.raises(InputError, match="has no collection 'missing'"):
            index.search(vectors(1), k=3)


def test_a_collection_made_by_another_tool_is_refused(tmp_path):
    from qdrant_client import models

    with QdrantIndex.connect("theirs", path=tmp_path / "qdrant") as index:
        index.client.create_collection("theirs", vectors_config=models.VectorParams(size=4, distance="Cosine"))
        with pytest.raises(InputError, match="was not built by llm2clip4cxr"):
            index.ensure(4, INFO)


def test_the_embedded_store_is_one_process_at_a_time(built):
    locked = pytest.raises(OutputLockedError, match="another process has this embedded Qdrant store open")
    with QdrantIndex.connect("reports", path=built), locked:
        QdrantIndex.connect("reports", path=built)


class RecordingClient:
    """Stands in for a server's client where the embedded mode cannot tell: it keeps no HNSW or quantization
    settings (it always searches exactly) and has no payload indexes."""

    def __init__(self):
        self.calls = []

    def create_collection(self, name, **settings):
        self.calls.append(("create_collection", name, settings))

    def create_payload_index(self, name, key, schema):
        self.calls.append(("create_payload_index", name, key, schema))


def test_hnsw_int8_quantization_and_payload_indexes_reach_the_server():
    client = RecordingClient()
    QdrantIndex(client, "reports", "a server", embedded=False).create(
        512, INFO, hnsw_m=32, ef_construct=200, quantization="int8", payload_keys=["view", "split"])
    (_, name, settings), *indexes = client.calls
    assert name == "reports"
    assert (settings["vectors_config"].size, settings["vectors_config"].distance) == (512, "Cosine")
    assert (settings["hnsw_config"].m, settings["hnsw_config"].ef_construct) == (32, 200)
    assert settings["quantization_config"].scalar.type == "int8"
    assert settings["metadata"]["llm2clip4cxr"]["info"] == INFO
    assert [(call[2], call[3]) for call in indexes] == [("id", "keyword"), ("view", "keyword"), ("split", "keyword")]
    assert "quantization_config" not in collection_settings(8, INFO, hnsw_m=16, ef_construct=100, quantization="none")
    with pytest.raises(InputError, match="quantization must be one of"):
        QdrantIndex(client, "reports", "a server", embedded=False).create(8, INFO, quantization="int4")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_one_error_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(ServiceUnavailableError) as caught:
        QdrantIndex.connect("reports", url=url, timeout=5)
    message = str(caught.value)
    assert url in message and "cannot reach" in message and "\n" not in message


class StubQdrant(http.server.BaseHTTPRequestHandler):
    """Answers the few REST calls `add` makes; the first upsert fails with 503 (an overloaded server)."""

    collection_info: dict = {}
    upserts: list = []  # points per upsert request, failed ones included

    def do_GET(self):
        if self.path.startswith("/collections/reports"):
            self.reply(200, self.collection_info)
        else:
            self.reply(200, {"collections": [{"name": "reports"}]})

    def do_PUT(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.upserts.append(len(body["points"]))
        if len(self.upserts) == 1:
            self.reply(503, None, error="overloaded")
        else:
            self.reply(200, {"operation_id": len(self.upserts), "status": "completed"})

    def reply(self, status, result, error=None):
        body = json.dumps({"result": result, "status": {"error": error} if error else "ok", "time": 0.0}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_upserts_go_in_batches_and_a_failed_batch_is_retried(tmp_path):
    # The stub describes the collection exactly as Qdrant does (taken from an embedded one).
    with QdrantIndex.connect("reports", path=tmp_path / "qdrant") as local:
        local.create(8, INFO)
        StubQdrant.collection_info = local.client.get_collection("reports").model_dump(mode="json", exclude_none=True)
    StubQdrant.upserts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubQdrant)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with (
            QdrantIndex.connect("reports", url=f"http://127.0.0.1:{server.server_port}") as index,
            pytest.warns(UserWarning, match="Batch upload failed 1 times"),  # qdrant-client's retry
        ):
            index.add(vectors(25, dim=8), [str(i) for i in range(25)], batch_size=10, max_retries=2)
    finally:
        server.shutdown()
        thread.join()
    assert StubQdrant.upserts == [10, 10, 10, 5]  # the first batch failed once and was sent again
