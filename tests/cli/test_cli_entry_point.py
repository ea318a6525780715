"""Every subcommand answers --help; the installed `llm2clip4cxr` console script runs the subcommands whose
other tests call `cli.main` in-process (push, prepare) end to end in a subprocess."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llm2clip4cxr.defaults import default_model_path

SCRIPT = shutil.which("llm2clip4cxr", path=str(Path(sys.executable).parent))
COMMANDS = [
    ["similarity"], ["encode"], ["similar"], ["index", "build"], ["index", "search"], ["retrieve", "image-to-report"],
    ["retrieve", "report-to-image"], ["eval"], ["prepare"], ["convert", "llm2vec4cxr"], ["convert", "llm2clip4cxr"],
    ["push"],
]



@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    # In-process: quicker than a subprocess per command (benchmarks/cli_startup.py times those).
    from llm2clip4cxr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: llm2clip4cxr " + " ".join(command))


def test_building_the_parser_imports_no_heavy_library():
    """What keeps every --help under a second: the subcommands import torch, transformers, datasets and faiss
    only when they run."""
    script = ("import json, sys\nfrom llm2clip4cxr.cli import build_parser\nbuild_parser()\n"
              "print(json.dumps([m for m in ('torch', 'transformers', 'datasets', 'faiss') if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def run(*args):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(SCRIPT is None, reason="the llm2clip4cxr console script is not installed")
def test_push_dry_run_and_prepare_through_the_script(tmp_path):
    result = run("push", str(default_model_path("text")), "--repo-id", "me/llm2vec4cxr-tiny", "--dry-run",
                 "--no-verify", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and "model.safetensors" in json.dumps(plan)

    reports = tmp_path / "iu"
    reports.mkdir()
    (reports / "reports.csv").write_text(
        "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
        "1,normal,normal,Xray Chest PA and Lateral,,,The lungs are clear.,No acute disease.\n"
        "2,normal,normal,Xray Chest PA and Lateral,,,,\n"
    )
    (reports / "projections.csv").write_text("uid,filename,projection\n1,1_IM-0001-1001.dcm.png,Frontal\n"
                                             "2,2_IM-0002-1001.dcm.png,Frontal\n")
    result = run("prepare", "iu-xray", str(reports), "--output", str(tmp_path / "prepared"), "--text-only", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert sum(summary["rows"].values()) == 1 and summary["dropped_counts"] == {"no_findings_or_impression": 1}
    missing = run("prepare", "iu-xray", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert missing.returncode == 1 and "nowhere" in missing.stderr
