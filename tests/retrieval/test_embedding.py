import json
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest

from llm2clip4cxr.data import load_text_dataset
from llm2clip4cxr.retrieval.embedding import EMBEDDINGS_FILE, embed_in_chunks

from ..shared_data import ROOT

DIM = 8


def fake_encode(texts):
    """A deterministic text -> vector map (a hash of each text), standing in for a model."""
    return np.stack([np.random.default_rng(sum(text.encode())).standard_normal(DIM) for text in texts]).astype(
        np.float32
    )


def texts_dataset(count=23):
    return datasets.Dataset.from_dict({"text": [f"report number {i}." for i in range(count)]})


def test_chunks_join_to_the_whole_encoding_and_are_removed(tmp_path):
    dataset = texts_dataset()
    embeddings = embed_in_chunks(dataset, fake_encode, tmp_path / "out", chunk_size=5, progress=False)
    assert isinstance(embeddings, np.memmap) and embeddings.shape == (23, DIM)
    np.testing.assert_array_equal(embeddings, fake_encode(dataset["text"][:]))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [EMBEDDINGS_FILE, "manifest.json"]
    # A finished run is returned as is, without encoding anything.
    again = embed_in_chunks(dataset, lambda texts: pytest.fail("re-encoded"), tmp_path / "out", chunk_size=5)
    np.testing.assert_array_equal(again, embeddings)


def test_an_interrupted_run_resumes_without_recomputing_finished_chunks(tmp_path):
    dataset = texts_dataset()
    calls = []

    def failing_after_two_chunks(texts):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(texts)
        return fake_encode(texts)

    with pytest.raises(KeyboardInterrupt):
        embed_in_chunks(dataset, failing_after_two_chunks, tmp_path / "out", chunk_size=5, progress=False)
    assert len(list((tmp_path / "out" / "chunks").glob("chunk-*.npy"))) == 2
    assert not list((tmp_path / "out" / "chunks").glob(".*"))  # the interrupted write left no temp file

    resumed = []
    embeddings = embed_in_chunks(
        dataset, lambda texts: resumed.append(texts) or fake_encode(texts), tmp_path / "out", chunk_size=5,
        progress=False,
    )
    assert [chunk[0] for chunk in resumed] == ["report number 10.", "report number 15.", "report number 20."]
    np.testing.assert_array_equal(embeddings, fake_encode(dataset["text"][:]))


def test_a_killed_process_resumes(tmp_path):
    # SIGKILL (no exception handlers run) in the middle of a run, then resume in this process.
    script = textwrap.dedent(f"""
        import time, datasets
        from llm2clip4cxr.retrieval.embedding import embed_in_chunks
        from tests.retrieval.test_embedding import fake_encode, texts_dataset

        def slow(texts):
            time.sleep(0.3)
            return fake_encode(texts)

        embed_in_chunks(texts_dataset(), slow, {str(tmp_path / "out")!r}, chunk_size=2, progress=False)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    chunks = tmp_path / "out" / "chunks"
    deadline = time.monotonic() + 120
    while len(list(chunks.glob("chunk-*.npy"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(chunks.glob("chunk-*.npy")))
    assert 3 <= finished < 12, "the run was not killed half-way"

    recomputed = []
    embeddings = embed_in_chunks(
        texts_dataset(), lambda texts: recomputed.append(texts) or fake_encode(texts), tmp_path / "out",
        chunk_size=2, progress=False,
    )
    assert len(recomputed) == 12 - finished
    np.testing.assert_array_equal(embeddings, fake_encode(texts_dataset()["text"][:]))


def test_resuming_with_other_data_or_encoder_is_refused(tmp_path):
    dataset = texts_dataset()
    with pytest.raises(KeyboardInterrupt):
        embed_in_chunks(dataset, lambda texts: (_ for _ in ()).throw(KeyboardInterrupt), tmp_path / "out",
                        chunk_size=5, encoder_name="model-a", progress=False)
    with pytest.raises(ValueError, match="encoder: 'model-a' there, 'model-b' now"):
        embed_in_chunks(dataset, fake_encode, tmp_path / "out", chunk_size=5, encoder_name="model-b")
    edited = datasets.Dataset.from_dict({"text": ["another text"] + dataset["text"][1:]})
    with pytest.raises(ValueError, match="data_fingerprint"):
        embed_in_chunks(edited, fake_encode, tmp_path / "out", chunk_size=5, encoder_name="model-a")
    with pytest.raises(ValueError, match="chunk_size"):
        embed_in_chunks(dataset, fake_encode, tmp_path / "out", chunk_size=7, encoder_name="model-a")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        embed_in_chunks(dataset, fake_encode, tmp_path / "other")


def test_bad_encoder_output_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 8\) for a chunk of 5 rows"):
        embed_in_chunks(texts_dataset(), lambda texts: fake_encode(texts[:2]), tmp_path / "a", chunk_size=5)
    widths = iter([DIM, DIM + 1])
    with pytest.raises(ValueError, match="width 9, earlier chunks have 8"):
        embed_in_chunks(texts_dataset(), lambda texts: np.zeros((len(texts), next(widths))), tmp_path / "b",
                        chunk_size=5)


def test_load_text_dataset_reads_csv_parquet_and_jsonl(tmp_path):
    rows = [{"uid": "007", "findings": "Small effusion.", "view": "PA"},
            {"uid": "008", "findings": "  ", "view": "AP"},
            {"uid": "009", "findings": "Clear lungs.", "view": ""}]
    header = "uid,findings,view\n"
    (tmp_path / "r.csv").write_text(header + "".join(f"{r['uid']},{r['findings']},{r['view']}\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "r.parquet")
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("r.csv", "r.parquet", "r.jsonl"):
        dataset = load_text_dataset(tmp_path / name, "findings", "uid", extra_columns=["view"])
        assert dataset.to_list() == [
            {"id": "007", "text": "Small effusion.", "view": "PA"},  # "007" stays text
            {"id": "009", "text": "Clear lungs.", "view": ""},
        ], name
    positional = load_text_dataset(tmp_path / "r.csv", "findings")
    assert list(positional["id"]) == ["0", "1"]


def test_load_text_dataset_errors_name_the_problem(tmp_path):
    (tmp_path / "r.csv").write_text("uid,findings\na,x\na,y\n")
    with pytest.raises(ValueError, match="repeats the id 'a'"):
        load_text_dataset(tmp_path / "r.csv", "findings", "uid")
    with pytest.raises(ValueError, match=r"no column\(s\) \['impression'\]"):
        load_text_dataset(tmp_path / "r.csv", "impression")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_text_dataset(tmp_path / "nope.csv", "findings")
    (tmp_path / "r.txt").write_text("x")
    with pytest.raises(ValueError, match=".csv, .parquet or .jsonl"):
        load_text_dataset(tmp_path / "r.txt", "findings")
    (tmp_path / "blank.csv").write_text("uid,findings\na, \n")
    with pytest.raises(ValueError, match="no non-empty text"):
        load_text_dataset(tmp_path / "blank.csv", "findings")
