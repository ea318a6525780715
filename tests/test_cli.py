import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from .conftest import INSTRUCTION

REPORTS = ["No acute cardiopulmonary process.", "Small right pleural effusion.", "No pneumothorax."]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llm2clip4cxr", *args], capture_output=True, text=True, cwd=cwd)


def test_similarity_json_matches_the_model(make_encoder, tmp_path):
    model = make_encoder()
    model.save_pretrained(tmp_path / "model")
    result = run_cli("similarity", *REPORTS, "--model", str(tmp_path / "model"), "--instruction", INSTRUCTION, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    embeddings = F.normalize(model.encode(REPORTS, instruction=INSTRUCTION), dim=-1)
    torch.testing.assert_close(torch.tensor(payload["cosine_similarity"]), embeddings @ embeddings.T, rtol=1e-5, atol=1e-5)
    assert payload["reports"] == REPORTS


def test_similarity_uses_the_default_model_and_writes_output(tmp_path):
    from llm2clip4cxr.defaults import load_default_text_encoder

    (tmp_path / "reports.txt").write_text("\n".join(REPORTS[1:]) + "\n")
    result = run_cli("similarity", REPORTS[0], "--file", str(tmp_path / "reports.txt"), "--output", str(tmp_path / "out.txt"))
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
