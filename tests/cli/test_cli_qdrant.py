"""`index build/search --backend qdrant` on Qdrant's embedded local mode (`--qdrant-path`)."""

import json

import numpy as np
import pytest

from llm2clip4cxr.cli import main

from ..retrieval.test_qdrant_backend import closed_port

pytest.importorskip("qdrant_client")

ROWS = [("r0", "Small right pleural effusion.", "PA"), ("r1", "No pneumothorax.", "AP"),
        ("r2", "Heart size is normal.", "PA"), ("r3", "Left basilar opacity or atelectasis.", "AP"),
        ("r4", "Stable cardiomegaly.", "PA"), ("r5", "Moderate left pleural effusion.", "LATERAL")]
QUERY = "Pleural effusion on the right."


@pytest.fixture()
def setup(make_encoder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a Qdrant build keeps its chunks by default
    make_encoder().save_pretrained(tmp_path / "model")
    csv_path = tmp_path / "reports.csv"
    csv_path.write_text("uid,findings,view\n" + "".join(f"{u},{t},{v}\n" for u, t, v in ROWS), encoding="utf-8")
    return tmp_path, ["--csv", str(csv_path), "--id-column", "uid", "--metadata-column", "view",
                      "--model", str(tmp_path / "model"), "--instruction", "Find similar reports"]


def run(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_build_search_and_filter_match_the_faiss_index(setup, capsys):
    tmp_path, build_args = setup
    qdrant = ["--backend", "qdrant", "--qdrant-path", str(tmp_path / "qdrant"), "--collection", "reports"]
    code, out, err = run(capsys, "index", "build", *build_args, *qdrant, "--quantization", "int8", "--json")
    assert code == 0, err
    assert json.loads(out) == {"collection": "reports", "location": f"embedded Qdrant at {tmp_path / 'qdrant'}",
                               "size": 6, "dim": 64}
    assert run(capsys, "index", "build", *build_args, "--output", str(tmp_path / "faiss"))[0] == 0

    code, out, err = run(capsys, "index", "search", *qdrant, QUERY, "--top-k", "6", "--json")
    assert code == 0, err
    found = json.loads(out)["results"][0]["hits"]
    code, out, err = run(capsys, "index", "search", str(tmp_path / "faiss"), QUERY, "--top-k", "6", "--json")
    expected = json.loads(out)["results"][0]["hits"]
    assert [hit["id"] for hit in found] == [hit["id"] for hit in expected]
    np.testing.assert_allclose([hit["score"] for hit in found], [hit["score"] for hit in expected], atol=1e-5)
    assert found[0]["metadata"] == expected[0]["metadata"]  # text and view, as in the FAISS index

    code, out, err = run(capsys, "index", "search", *qdrant, QUERY, "--filter", "view=PA", "--filter", "view=AP",
                         "--json")
    hits = json.loads(out)["results"][0]["hits"]
    assert code == 0 and {hit["id"] for hit in hits} == {"r0", "r1", "r2", "r3", "r4"}
    code, out, err = run(capsys, "index", "search", *qdrant, QUERY, "Heart size normal.", "--filter", "view=LATERAL")
    assert code == 0 and out.count("[r5]") == 2 and "[r0]" not in out  # two queries, one LATERAL report

    # A rebuild with the same encoder overwrites the same points; another encoder is refused before embedding.
    assert run(capsys, "index", "build", *build_args, *qdrant)[0] == 0
    assert run(capsys, "index", "search", *qdrant, QUERY, "--top-k", "10", "--json")[1].count('"id"') == 6
    code, out, err = run(capsys, "index", "build", *build_args[:-1], "Other", *qdrant)
    assert code == 1 and err.count("\n") == 1 and "was built with" in err and "choose another --collection" in err


def test_search_refuses_another_encoder_hybrid_and_a_missing_collection(setup, make_encoder, capsys):
    tmp_path, build_args = setup
    qdrant = ["--backend", "qdrant", "--qdrant-path", str(tmp_path / "qdrant"), "--collection", "reports"]
    assert run(capsys, "index", "build", *build_args, *qdrant)[0] == 0
    make_encoder(seed=1).save_pretrained(tmp_path / "other")
    refusals = [
        (["--model", str(tmp_path / "other")], f"was built with the model {tmp_path / 'model'}, not --model"),
        (["--instruction", "Another"], "was built with the instruction 'Find similar reports', not --instruction"),
        (["--hybrid"], "--hybrid is not supported with --backend qdrant"),
        (["--filter", "view"], "--filter 'view': expected KEY=VALUE"),
    ]
    for extra, message in refusals:
        code, out, err = run(capsys, "index", "search", *qdrant, QUERY, *extra)
        assert code == 1 and err.count("\n") == 1 and message in err, err
    code, out, err = run(capsys, "index", "search", *qdrant[:-1], "nothing", QUERY)
    assert code == 1 and "has no collection 'nothing'" in err
    code, out, err = run(capsys, "index", "search", *qdrant[:3], str(tmp_path / "absent"), *qdrant[4:], QUERY)
    assert code == 1 and "no such folder" in err


def test_an_unreachable_server_fails_at_once_naming_the_url(setup, capsys):
    tmp_path, build_args = setup
    url = f"http://127.0.0.1:{closed_port()}"
    for command in (["index", "build", *build_args], ["index", "search", QUERY]):
        code, out, err = run(capsys, *command, "--backend", "qdrant", "--qdrant-url", url, "--collection", "reports")
        assert code == 1 and err.count("\n") == 1 and f"cannot reach the Qdrant server at {url}" in err, err
    assert not (tmp_path / "qdrant-reports.chunks").exists()  # nothing was embedded


def test_options_of_the_other_backend_are_refused(setup, capsys):
    tmp_path, build_args = setup
    cases = [
        (["index", "build", *build_args, "--output", str(tmp_path / "i"), "--collection", "c"],
         "--collection needs --backend qdrant"),
        (["index", "build", *build_args], "--output (the index folder) is required with --backend faiss"),
        (["index", "build", *build_args, "--backend", "qdrant", "--qdrant-path", "q"],
         "--backend qdrant needs --collection NAME"),
        (["index", "build", *build_args, "--backend", "qdrant", "--collection", "c", "--qdrant-path", "q",
          "--kind", "hnsw"], "--kind is a FAISS setting"),
        (["index", "build", *build_args, "--backend", "qdrant", "--collection", "c"],
         "give a Qdrant server URL (--qdrant-url) or a folder"),
        (["index", "search", str(tmp_path / "i"), QUERY, "--filter", "view=PA"], "--filter needs --backend qdrant"),
    ]
    for args, message in cases:
        code, out, err = run(capsys, *args)
        assert code == 1 and message in err, (args, err)
