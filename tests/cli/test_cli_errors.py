"""The CLI under bad input, damaged files, concurrent writers and untrusted folders: every failure is one
line (or one JSON object with --json) naming the file or argument, and nothing is overwritten or run."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import llm2clip4cxr.cli.common as cli_common
from llm2clip4cxr import fileio
from llm2clip4cxr.cli import main

from ..conftest import INSTRUCTION
from ..shared_data import ROOT, XRV, needs_samples
from .test_cli import REPORTS, saved_model, write_csv

SAMPLE_IMAGE = XRV / "00000001_000.png"


def run(capsys, *args):
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The one line an error printed (progress bars of the test's own setup, which capsys also sees, aside)."""
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith(f"llm2clip4cxr {command}: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ error reporting


def test_json_errors_are_one_object_on_stdout(tmp_path, capsys):
    code, out, err = run(capsys, "similar", "query", "--csv", tmp_path / "missing.csv", "--json")
    assert code == 1 and err == ""
    assert json.loads(out) == {"error": f"--csv {tmp_path / 'missing.csv'}: no such file.", "kind": "not-found"}
    with pytest.raises(SystemExit) as exit_info:  # a usage error is JSON too, with argparse's exit code 2
        main(["similar", "query", "--csv", "r.csv", "--top-k", "zero", "--json"])
    assert exit_info.value.code == 2
    usage = json.loads(capsys.readouterr().out)
    assert usage["kind"] == "usage" and "--top-k" in usage["error"]


def test_unexpected_errors_are_one_line_with_a_debug_hint(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(cli_common, "read_texts", broken)
    csv_path = write_csv(tmp_path / "reports.csv")
    code, _, err = run(capsys, "similar", "query", "--csv", csv_path)
    assert code == 1
    assert one_error_line(err, "similar").endswith(
        "unexpected KeyError: 'boom' (rerun with --debug for the traceback)"
    )
    code, out, _ = run(capsys, "similar", "query", "--csv", csv_path, "--json")
    assert code == 1 and json.loads(out)["kind"] == "internal"
    code, _, err = run(capsys, "similar", "query", "--csv", csv_path, "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and "KeyError: 'boom'" in err


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("command", ["encode", "similar"])
def test_an_output_equal_to_an_input_is_refused_and_the_input_kept(tmp_path, capsys, command):
    import datasets

    if command == "encode":
        data = tmp_path / "d.parquet"
        datasets.Dataset.from_dict({"findings": ["Small effusion.", "Clear lungs."]}).to_parquet(data)
        args = ["encode", "--csv", data, "--output", data]
    else:
        data = write_csv(tmp_path / "r.csv")
        args = ["similar", "Small effusion.", "--csv", data, "--output", data]
    before = data.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 1 and f"--output {data} is the input --csv" in one_error_line(err, command)
    assert data.read_bytes() == before
    os.link(data, tmp_path / f"hard-link{data.suffix}")
    code, _, err = run(capsys, *args[:-1], tmp_path / f"hard-link{data.suffix}")  # the same file by another name
    assert code == 1 and "is the input" in err and data.read_bytes() == before


def test_an_output_inside_the_model_folder_is_refused(make_encoder, tmp_path, capsys):
    _, path = saved_model(make_encoder, tmp_path)
    code, _, err = run(capsys, "encode", "Clear lungs.", "--model", path, "--output", Path(path) / "emb.npy")
    assert code == 1 and "lies inside the input --model" in one_error_line(err, "encode")
    assert not (Path(path) / "emb.npy").exists()


def test_output_folders_are_created_before_any_model_work(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "similarity", *REPORTS, "--output", tmp_path / "new" / "dir" / "table.txt")
    assert code == 0, err
    assert all(report in (tmp_path / "new" / "dir" / "table.txt").read_text() for report in REPORTS)

    def no_model(*args, **kwargs):
        pytest.fail("the model was loaded before the output folder was known to be usable")

    monkeypatch.setattr(cli_common, "load_text_encoder", no_model)
    (tmp_path / "a-file").write_text("x")
    code, _, err = run(capsys, "similarity", *REPORTS, "--output", tmp_path / "a-file" / "table.txt")
    assert code == 1 and "a-file" in one_error_line(err, "similarity")


def test_outputs_honour_the_umask(tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        code, _, err = run(capsys, "encode", *REPORTS, "--output", tmp_path / "emb.safetensors")
        assert code == 0, err
        code, _, err = run(capsys, "similarity", *REPORTS, "--output", tmp_path / "table.txt")
        assert code == 0, err
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "emb.safetensors").stat().st_mode) == 0o640  # safetensors alone writes 0600
    assert stat.S_IMODE((tmp_path / "table.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize("top_k", ["-2", "0"])
def test_similar_refuses_a_top_k_below_one(tmp_path, capsys, top_k):
    csv_path = write_csv(tmp_path / "reports.csv")
    with pytest.raises(SystemExit) as exit_info:
        main(["similar", "Small right pleural effusion.", "--csv", str(csv_path), "--top-k", top_k])
    assert exit_info.value.code == 2
    assert f"argument --top-k: expected a positive integer, got {int(top_k)}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad input files


def test_a_csv_with_a_bom_is_read(tmp_path, capsys):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffuid,findings\nr1,Small right pleural effusion.\nr2,Clear lungs.\n".encode())
    code, out, err = run(
        capsys, "similar", "Small right pleural effusion.", "--csv", path, "--id-column", "uid", "--json"
    )
    assert code == 0, err
    assert [hit["id"] for hit in json.loads(out)["results"]] == ["r1", "r2"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"uid,findings\nr1,Clear lungs.\nr2,Small, right effusion.\n", "line 3: 3 cells, but the header has 2"),
        (b'uid,findings\nr1,"Clear lungs.\nr2,Effusion.\n', "line 2: a quoted cell starting here is never closed"),
        (
            b"uid,findings\n" + b"r,Clear lungs.\n" * 1000 + b"r1001,Caf\xe9 lungs.\n",
            "line 1002: not UTF-8 text (byte 0xe9",
        ),
        (b"uid,findings\n", "has a header row but no data rows"),
        (b"", "is empty: expected a header row"),
    ],
)
def test_csv_problems_name_the_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "reports.csv"
    path.write_bytes(content)
    code, _, err = run(capsys, "encode", "--csv", path, "--output", tmp_path / "e.npy")
    line = one_error_line(err, "encode")
    assert code == 1 and f"{path}" in line and message in line


def test_a_text_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "reports.txt"
    path.write_bytes(b"Clear lungs.\nSmall effusion \xff.\n")
    code, _, err = run(capsys, "similarity", "--file", path)
    assert code == 1 and f"{path}, line 2: not UTF-8 text (byte 0xff" in one_error_line(err, "similarity")


def test_a_config_json_that_is_not_utf8_is_named(make_encoder, tmp_path, capsys):
    _, path = saved_model(make_encoder, tmp_path)
    config = Path(path) / "config.json"
    config.write_bytes(config.read_bytes().replace(b'"model_type"', b'"model_\xe9type"', 1))
    code, _, err = run(capsys, "encode", "Clear lungs.", "--model", path, "--output", tmp_path / "e.npy")
    assert code == 1 and f"{config}, line" in one_error_line(err, "encode") and "not UTF-8" in err


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "truncated"),
    (lambda path: path.write_bytes(b""), "empty (0 bytes)"),
    (lambda path: __import__("torch").save({"weight": __import__("torch").zeros(2)}, path), "PyTorch pickle"),
])
def test_damaged_safetensors_weights_are_one_line_naming_the_file(make_encoder, tmp_path, capsys, damage, message):
    _, path = saved_model(make_encoder, tmp_path)
    damage(Path(path) / "model.safetensors")
    code, out, err = run(capsys, "encode", "Clear lungs.", "--model", path, "--output", tmp_path / "e.npy", "--json")
    error = json.loads(out)
    assert code == 1 and error["kind"] == "corrupt" and err == ""
    assert f"{Path(path) / 'model.safetensors'}: unreadable weights" in error["error"] and message in error["error"]


def test_convert_names_a_missing_source_folder(tmp_path, capsys):
    code, _, err = run(capsys, "convert", "llm2vec4cxr", tmp_path / "nope", tmp_path / "out")
    assert code == 1 and "nope: no such directory" in one_error_line(err, "convert llm2vec4cxr")


# ------------------------------------------------------------------------------------------ untrusted code


def untrusted_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder whose config names its own configuration code (an unregistered model_type plus
    auto_map); importing that code writes a marker file."""
    folder, marker = tmp_path / "stranger", tmp_path / "the folder's code ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "stranger", "auto_map": {"AutoConfig": "configuration_stranger.StrangerConfig"},
    }))
    (folder / "configuration_stranger.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n\n"
        "class StrangerConfig(PretrainedConfig):\n    model_type = 'stranger'\n"
    )
    return folder, marker


@needs_samples
def test_retrieve_runs_no_code_from_an_untrusted_folder_and_never_prompts(tmp_path, capsys):
    folder, marker = untrusted_folder(tmp_path)
    code, out, err = run(capsys, "retrieve", "report-to-image", "Clear lungs.", "--images", SAMPLE_IMAGE,
                         "--model", folder, "--json")
    assert code == 1 and not marker.exists() and err == ""
    error = json.loads(out)  # the whole of stdout: no "[y/N]" prompt before it
    assert error["kind"] == "untrusted-code"
    assert "configuration_stranger.py" in error["error"] and "--trust-remote-code" in error["error"]


def test_eval_clip_baseline_runs_no_code_from_an_untrusted_folder(tmp_path, capsys):
    folder, marker = untrusted_folder(tmp_path)
    (tmp_path / "reports.csv").write_text("uid,findings,impression\n1,The lungs are clear.,No acute disease.\n")
    code, _, err = run(capsys, "eval", "--no-model", "--clip-baseline", folder, "--limit", "5",
                       "--csv", tmp_path / "reports.csv", "--output-dir", tmp_path / "eval")
    assert code == 1 and not marker.exists()
    assert "needs Python code it ships (configuration_stranger.py)" in one_error_line(err, "eval")


# ------------------------------------------------------------------------------------------ index folders


def build(capsys, model, csv_path, output, *extra):
    code, _, err = run(capsys, "index", "build", "--csv", csv_path, "--id-column", "uid", "--model", model,
                       "--output", output, *extra)
    assert code == 0, err


def test_a_kill_while_rebuilding_never_pairs_new_vectors_with_the_old_instruction(make_encoder, tmp_path, capsys,
                                                                                 monkeypatch):
    from llm2clip4cxr.retrieval.index import EmbeddingIndex

    _, model = saved_model(make_encoder, tmp_path)
    csv_path, output = write_csv(tmp_path / "reports.csv"), tmp_path / "index"
    build(capsys, model, csv_path, output, "--instruction", "old instruction")
    old = EmbeddingIndex.load(output)
    snapshots = []

    def snapshot(step):  # the folder as a SIGKILL at this step would leave it
        snapshots.append(shutil.copytree(output, tmp_path / f"kill-{len(snapshots)}", symlinks=True))

    monkeypatch.setattr(fileio, "write_step_hook", snapshot)
    build(capsys, model, csv_path, output, "--instruction", INSTRUCTION)
    monkeypatch.setattr(fileio, "write_step_hook", None)
    new = EmbeddingIndex.load(output)
    assert not np.array_equal(old.get_vectors(), new.get_vectors())
    seen = set()
    for folder in snapshots:
        loaded = EmbeddingIndex.load(folder)
        instruction = loaded.info["encoder"]["instruction"]
        expected = {"old instruction": old, INSTRUCTION: new}[instruction]
        np.testing.assert_array_equal(loaded.get_vectors(), expected.get_vectors())  # vectors of that instruction
        seen.add(instruction)
    assert seen == {"old instruction", INSTRUCTION}
    code, out, err = run(capsys, "index", "search", output, "Heart size is enlarged.", "--json")
    assert code == 0, err


@pytest.mark.parametrize("tamper, message", [
    ("reorder", "metadata.jsonl does not match the content hash"),
    ("truncate", "index.faiss does not match the content hash"),
])
def test_index_search_refuses_a_tampered_index(make_encoder, tmp_path, capsys, tamper, message):
    _, model = saved_model(make_encoder, tmp_path)
    build(capsys, model, write_csv(tmp_path / "reports.csv"), tmp_path / "index")
    config = json.loads((tmp_path / "index" / "index_config.json").read_text())
    role = "metadata" if tamper == "reorder" else "faiss"
    path = tmp_path / "index" / config["files"][role]["path"]
    if tamper == "reorder":
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([lines[1], lines[0], *lines[2:]]))
    else:
        path.write_bytes(path.read_bytes()[:-8])
    code, _, err = run(capsys, "index", "search", tmp_path / "index", "Heart size is enlarged.")
    assert code == 1 and message in one_error_line(err, "index search")


def test_a_full_disk_during_build_is_one_line_and_keeps_the_old_index(make_encoder, tmp_path, capsys, monkeypatch):
    import faiss

    from llm2clip4cxr.retrieval.index import EmbeddingIndex

    _, model = saved_model(make_encoder, tmp_path)
    build(capsys, model, write_csv(tmp_path / "reports.csv"), tmp_path / "index")
    before = EmbeddingIndex.load(tmp_path / "index").ids

    def full_disk(*args):
        raise RuntimeError("Error in faiss::FileIOWriter::operator(): fwrite failed: No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    other = write_csv(tmp_path / "other.csv", rows=[("x1", "Clear lungs.", "PA")])
    code, _, err = run(capsys, "index", "build", "--csv", other, "--id-column", "uid", "--model", model,
                       "--output", tmp_path / "index")
    assert code == 1 and "No space left on device" in one_error_line(err, "index build")
    assert EmbeddingIndex.load(tmp_path / "index").ids == before


# ------------------------------------------------------------------------------------------ concurrent writers


def test_four_concurrent_builders_end_with_one_valid_index(make_encoder, tmp_path):
    from llm2clip4cxr.retrieval.index import EmbeddingIndex

    _, model = saved_model(make_encoder, tmp_path)
    output, other, shared_work = tmp_path / "index", tmp_path / "other", tmp_path / "shared-work"
    builds = []
    for i in range(4):
        rows = [(f"b{i}-{j}", text, "PA") for j, text in enumerate(REPORTS[: 2 + i % 2])]
        csv_path = write_csv(tmp_path / f"reports{i}.csv", rows=rows)
        # 0 and 1 share a work folder, 2 uses the default one; 3 writes elsewhere through the same work folder.
        work = [] if i == 2 else ["--work-dir", str(shared_work)]
        command = ["index", "build", "--csv", str(csv_path), "--id-column", "uid", "--model", model,
                   "--output", str(other if i == 3 else output), "--instruction", f"builder {i}", *work]
        builds.append(([row[0] for row in rows], subprocess.Popen(
            [sys.executable, "-m", "llm2clip4cxr", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=tmp_path,
        )))
    for _, process in builds:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr
    final = EmbeddingIndex.load(output)
    winners = [i for i, (ids, _) in enumerate(builds[:3]) if final.ids == ids]
    assert len(winners) == 1 and final.info["encoder"]["instruction"] == f"builder {winners[0]}"
    assert EmbeddingIndex.load(other).ids == builds[3][0]
    assert len([path for path in output.iterdir() if path.name.startswith("generation-")]) == 1
    assert not shared_work.exists() and not (tmp_path / "index.chunks").exists()


HOLDER = """
import sys
from llm2clip4cxr.fileio import output_lock
with output_lock(sys.argv[1], inside=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_fails_with_no_wait_or_waits_with_a_message(tmp_path, capsys, monkeypatch):
    output = tmp_path / "index"
    output.mkdir()
    csv_path = write_csv(tmp_path / "reports.csv")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, out, err = run(capsys, "index", "build", "--csv", csv_path, "--output", output, "--no-wait", "--json")
        assert code == 1 and json.loads(out)["kind"] == "locked" and "being written by another process" in out

        waiting, original = threading.Event(), cli_common.waiting_message

        def tell_then_signal(args):
            tell = original(args)
            return lambda lock_file: (tell(lock_file), waiting.set())

        monkeypatch.setattr(cli_common, "waiting_message", tell_then_signal)
        result = {}
        builder = threading.Thread(target=lambda: result.update(code=main(
            ["index", "build", "--csv", str(csv_path), "--output", str(output), "--json"])))
        builder.start()
        assert waiting.wait(timeout=300), "the second writer neither waited nor finished"
        holder.stdin.close()  # the first writer finishes: the second goes ahead
        builder.join()
    finally:
        holder.kill()
        holder.wait()
    captured = capsys.readouterr()
    assert result["code"] == 0 and "waiting for it to finish" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["size"] == 3
