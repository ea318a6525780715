import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm2clip4cxr import LLM2Vec4CXRModel

from ..conftest import INSTRUCTION
from ..shared_data import needs_openi

REPORTS = ["No acute cardiopulmonary process.", "Small right pleural effusion.", "No pneumothorax."]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llm2clip4cxr", *args], capture_output=True, text=True, cwd=cwd)


def test_similarity_json_matches_the_model(make_encoder, tmp_path):
    model = make_encoder()
    model.save_pretrained(tmp_path / "model")
    result = run_cli(
        "similarity", *REPORTS, "--model", str(tmp_path / "model"), "--instruction", INSTRUCTION, "--json"
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    embeddings = F.normalize(model.encode(REPORTS, instruction=INSTRUCTION), dim=-1)
    torch.testing.assert_close(
        torch.tensor(payload["cosine_similarity"]), embeddings @ embeddings.T, rtol=1e-5, atol=1e-5
    )
    assert payload["reports"] == REPORTS


def test_similarity_uses_the_default_model_and_writes_output(tmp_path):
    from llm2clip4cxr.defaults import load_default_text_encoder

    (tmp_path / "reports.txt").write_text("\n".join(REPORTS[1:]) + "\n")
    result = run_cli(
        "similarity", REPORTS[0], "--file", str(tmp_path / "reports.txt"), "--output", str(tmp_path / "out.txt")
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out.txt").read_text()
    assert all(report in table for report in REPORTS)
    embeddings = F.normalize(load_default_text_encoder().encode(REPORTS), dim=-1)
    expected = embeddings @ embeddings.T
    printed = [[float(value) for value in line.split()[1:]] for line in table.splitlines()[-len(REPORTS):]]
    torch.testing.assert_close(torch.tensor(printed), expected, rtol=0, atol=6e-4)  # printed with 3 decimals


def test_bad_input_exits_non_zero_with_a_message(tmp_path):
    missing = run_cli("similarity", *REPORTS, "--model", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert "no such directory" in missing.stderr
    single = run_cli("similarity", "only one")
    assert single.returncode == 1
    assert "at least two reports" in single.stderr
    assert run_cli("--help").returncode == 0
    assert run_cli("similarity", "--help").returncode == 0
    assert run_cli("frobnicate").returncode == 2


CSV_ROWS = [
    ("s1", "Small right pleural effusion.", "PA"),
    ("s2", "No acute cardiopulmonary process.", "AP"),
    ("s3", "", "PA"),  # empty report: skipped
    ("s4", "Heart size is enlarged.", "PA"),
]


def write_csv(path, rows=CSV_ROWS, header=("uid", "findings", "view")):
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


def saved_model(make_encoder, tmp_path):
    model = make_encoder()
    model.save_pretrained(tmp_path / "model")
    return model, str(tmp_path / "model")


def test_encode_npy_equals_model_encode_and_other_formats(make_encoder, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    model, path = saved_model(make_encoder, tmp_path)
    csv_path = write_csv(tmp_path / "reports.csv")
    result = run_cli(
        "encode",
        "--csv",
        str(csv_path),
        "--column",
        "findings",
        "--model",
        path,
        "--instruction",
        INSTRUCTION,
        "--output",
        str(tmp_path / "emb.npy"),
        "--json",
        "--chunk-size",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "emb.npy.chunks").exists()  # the resumable chunk files are removed once joined
    texts = [row[1] for row in CSV_ROWS if row[1]]
    expected = model.encode(texts, instruction=INSTRUCTION, convert_to_numpy=True)
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected, rtol=1e-5, atol=1e-5)
    assert json.loads(result.stdout)["num_texts"] == 3
    result = run_cli("encode", *REPORTS, "--model", path, "--output", str(tmp_path / "emb.safetensors"))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(load_file(tmp_path / "emb.safetensors")["embeddings"],
                               model.encode(REPORTS, convert_to_numpy=True), rtol=1e-5, atol=1e-5)
    bad_suffix = run_cli("encode", *REPORTS, "--model", path, "--output", str(tmp_path / "emb.txt"))
    assert bad_suffix.returncode == 1 and ".npy" in bad_suffix.stderr


def test_similar_ranks_the_csv_column(make_encoder, tmp_path):
    _, path = saved_model(make_encoder, tmp_path)
    csv_path = write_csv(tmp_path / "reports.csv")
    result = run_cli("similar", "Small right pleural effusion.", "--csv", str(csv_path), "--id-column", "uid",
                     "--model", path, "--top-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["results"]
    assert [hit["rank"] for hit in hits] == [1, 2]
    assert hits[0]["id"] == "s1" and abs(hits[0]["score"] - 1.0) < 1e-4  # the query itself is in the column
    assert hits[0]["score"] >= hits[1]["score"]


def test_index_build_then_search(make_encoder, tmp_path):
    _, path = saved_model(make_encoder, tmp_path)
    csv_path = write_csv(tmp_path / "reports.csv")
    build = run_cli("index", "build", "--csv", str(csv_path), "--column", "findings", "--id-column", "uid",
                    "--metadata-column", "view", "--model", path, "--output", str(tmp_path / "index"))
    assert build.returncode == 0, build.stderr
    # The model and instruction are read back from the index folder.
    search = run_cli("index", "search", str(tmp_path / "index"), "Heart size is enlarged.", "--top-k", "3", "--json")
    assert search.returncode == 0, search.stderr
    hits = json.loads(search.stdout)["results"][0]["hits"]
    assert [hit["id"] for hit in hits][0] == "s4" and {hit["id"] for hit in hits} == {"s1", "s2", "s4"}
    assert hits[0]["metadata"] == {"text": "Heart size is enlarged.", "view": "PA"}
    # --hybrid fuses the same dense ranking with the BM25 statistics saved in the index.
    hybrid = run_cli("index", "search", str(tmp_path / "index"), "Heart size is enlarged.", "--top-k", "3", "--json",
                     "--hybrid")
    assert hybrid.returncode == 0, hybrid.stderr
    from llm2clip4cxr.retrieval.index import EmbeddingIndex

    index = EmbeddingIndex.load(tmp_path / "index")
    query = F.normalize(LLM2Vec4CXRModel.from_pretrained(path).encode(["Heart size is enlarged."]), dim=-1).numpy()
    expected = index.search_hybrid(query, ["Heart size is enlarged."], k=3)[0]
    assert [hit["id"] for hit in json.loads(hybrid.stdout)["results"][0]["hits"]] == [hit[0] for hit in expected]
    # --fusion and --fusion-weights reach the fusion: BM25 alone (dense weight 0) gives its min-max scores.
    lexical_only = run_cli("index", "search", str(tmp_path / "index"), "Heart size is enlarged.", "--top-k", "3",
                           "--json", "--hybrid", "--fusion", "normalized", "--fusion-weights", "0", "1")
    assert lexical_only.returncode == 0, lexical_only.stderr
    expected = index.search_hybrid(query, ["Heart size is enlarged."], k=3, method="normalized", weights=(0.0, 1.0))[0]
    got = json.loads(lexical_only.stdout)["results"][0]["hits"]
    assert [hit["id"] for hit in got] == [hit[0] for hit in expected]
    assert [hit["score"] for hit in got] == pytest.approx([hit[1] for hit in expected], abs=1e-6)
    assert max(hit["score"] for hit in got) == pytest.approx(1.0)  # min-max normalised lexical, weight 1
    similar = run_cli("similar", "Heart size is enlarged.", "--csv", str(csv_path), "--id-column", "uid", "--model",
                      path, "--top-k", "3", "--json", "--hybrid", "--fusion", "normalized")
    assert similar.returncode == 0, similar.stderr
    assert json.loads(similar.stdout)["results"][0]["id"] == "s4"
    not_an_index = run_cli("index", "search", str(tmp_path), "query")
    assert not_an_index.returncode == 1 and "not an index folder" in not_an_index.stderr


@needs_openi
def test_eval_on_openi_writes_results(tmp_path):
    result = run_cli("eval", "--limit", "40", "--baseline", "tfidf", "--output-dir", str(tmp_path / "eval"), "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results["num_studies"] == 40 and set(results["models"]) == {"llm2vec4cxr-tiny (default)", "tfidf"}
    for name in ("results.json", "results.md", "recall.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["models"] == results["models"]
    assert "| tfidf |" in (tmp_path / "eval" / "results.md").read_text()


def test_new_subcommands_report_bad_input(tmp_path, capsys):
    # In-process: every error here is raised before a model loads, so no subprocess start-up is needed.
    from llm2clip4cxr.cli import main

    def run(*args):
        code = main(list(args))
        return code, capsys.readouterr().err

    csv_path = write_csv(tmp_path / "reports.csv")
    code, err = run("encode", "--csv", str(csv_path), "--column", "impression", "--output", str(tmp_path / "e.npy"))
    assert code == 1 and "impression" in err and str(csv_path) in err
    code, err = run("similar", "query", "--csv", str(tmp_path / "nope.csv"))
    assert code == 1 and "nope.csv" in err
    empty = write_csv(tmp_path / "empty.csv", rows=[("s1", " ", "PA")])
    code, err = run("index", "build", "--csv", str(empty), "--output", str(tmp_path / "index"))
    assert code == 1 and "no non-empty text" in err
    code, err = run("encode", "--output", str(tmp_path / "e.npy"))
    assert code == 1 and "no input text" in err
    code, err = run("eval", "--csv", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "out"))
    assert code == 1 and "nope.csv" in err
    code, err = run("eval", "--limit", "0", "--output-dir", str(tmp_path / "out"))
    assert code == 1 and "--limit" in err
    for command, expected in (
        (["encode", "--help"], 0), (["similar", "--help"], 0), (["index", "build", "--help"], 0),
        (["index", "search", "--help"], 0), (["eval", "--help"], 0),
        (["eval", "--output-dir", str(tmp_path), "--baseline", "nope"], 2), (["index"], 2),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == expected, command
    for weights, message in ((["0", "0"], "cannot both be 0"), (["-1", "1"], "expected a number >= 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["similar", "query", "--csv", str(csv_path), "--hybrid", "--fusion-weights", *weights])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
