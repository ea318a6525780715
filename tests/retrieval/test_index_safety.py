"""EmbeddingIndex folders under faults: kills at every write step, concurrent writers, tampered files.

A kill is simulated faithfully without killing: `fileio.write_step_hook` copies the whole folder at every
step of a save, which is exactly what a SIGKILL at that instant would leave on disk; each copy must then
load as the old index or the new one. One real SIGKILL of a subprocess checks the same end to end.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("faiss")

from llm2clip4cxr import fileio  # noqa: E402
from llm2clip4cxr.errors import CorruptFileError  # noqa: E402
from llm2clip4cxr.retrieval.index import CONFIG_NAME, EmbeddingIndex  # noqa: E402

from ..shared_data import ROOT  # noqa: E402

DIM = 16


def make_index(seed: int, size: int, kind: str = "flat", info=None) -> tuple[EmbeddingIndex, dict]:
    rng = np.random.default_rng(seed)
    index = EmbeddingIndex(DIM, kind=kind, nlist=4)
    ids = [f"s{seed}-{i}" for i in range(size)]
    index.add(
        rng.standard_normal((size, DIM)).astype(np.float32), ids, [{"row": i, "seed": seed} for i in range(size)]
    )
    return index, {"ids": ids, "info": info or {}, "vectors": np.asarray(index.get_vectors()).copy()}


def state_of(folder: Path) -> dict:
    loaded = EmbeddingIndex.load(folder)
    return {"ids": loaded.ids, "info": loaded.info, "vectors": np.asarray(loaded.get_vectors())}


def same(a: dict, b: dict) -> bool:
    return a["ids"] == b["ids"] and a["info"] == b["info"] and np.array_equal(a["vectors"], b["vectors"])


def snapshots_of_save(index: EmbeddingIndex, folder: Path, tmp_path: Path, monkeypatch, **save_kwargs) -> list:
    """Save `index` into `folder`, copying the folder at every write step (what a kill there would leave)."""
    copies = []

    def snapshot(step: str) -> None:
        copy = tmp_path / f"kill-{len(copies):02d}-{step.replace(':', '-')}"
        shutil.copytree(folder, copy, symlinks=True)
        copies.append(copy)

    monkeypatch.setattr(fileio, "write_step_hook", snapshot)
    index.save(folder, **save_kwargs)
    monkeypatch.setattr(fileio, "write_step_hook", None)
    return copies


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_kill_at_every_write_step_leaves_the_old_or_the_new_index(tmp_path, monkeypatch, kind):
    folder = tmp_path / "index"
    old, old_state = make_index(0, 40, kind, info={"encoder": {"instruction": "old"}})
    old.save(folder, info=old_state["info"])
    new, new_state = make_index(1, 60, kind, info={"encoder": {"instruction": "new"}})

    copies = snapshots_of_save(new, folder, tmp_path, monkeypatch, info=new_state["info"])
    steps = [copy.name.split("-", 2)[2] for copy in copies]
    # Every stage of the commit was visited: each data file, the pointer's temp file, the switch, the cleanup.
    for step in ("index-generation-created", "index-faiss-written", "index-vectors-written", "index-metadata-written",
                 "temp-written", "replaced", "index-committed", "index-cleaned"):
        assert step in steps, steps
    outcomes = []
    for copy in copies:
        state = state_of(copy)
        assert same(state, old_state) or same(state, new_state), copy.name  # never a mix (e.g. new vectors, old info)
        outcomes.append("new" if same(state, new_state) else "old")
    assert outcomes == sorted(outcomes, key=["old", "new"].index) and outcomes[0] == "old" and outcomes[-1] == "new"
    assert same(state_of(folder), new_state)

    # Whatever a kill left behind (an uncommitted generation, the pointer's temp file), the next save removes it.
    leftovers = copies[steps.index("temp-written")]
    assert any(fileio.is_partial_write(path.name) for path in leftovers.iterdir())
    assert len([path for path in leftovers.iterdir() if path.name.startswith("generation-")]) == 2
    again, again_state = make_index(2, 10, kind)
    again.save(leftovers)
    names = sorted(path.name for path in leftovers.iterdir())
    assert len(names) == 3 and names[0] == ".lock" and names[2] == CONFIG_NAME, names
    assert same(state_of(leftovers), again_state)


def test_a_real_sigkill_between_writing_and_committing_keeps_the_old_index(tmp_path):
    folder = tmp_path / "index"
    old, old_state = make_index(0, 30, info={"encoder": {"instruction": "old"}})
    old.save(folder, info=old_state["info"])
    # The child saves a new index and SIGKILLs itself at the step named: no exception handler or cleanup runs.
    script = textwrap.dedent(f"""
        import os, signal
        from llm2clip4cxr import fileio
        from tests.retrieval.test_index_safety import make_index

        def kill(step):
            if step == "index:metadata-written":
                os.kill(os.getpid(), signal.SIGKILL)

        fileio.write_step_hook = kill
        index, state = make_index(1, 50, info={{"encoder": {{"instruction": "new"}}}})
        index.save({str(folder)!r}, info=state["info"])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert len([path for path in folder.iterdir() if path.name.startswith("generation-")]) == 2  # one never committed
    assert same(state_of(folder), old_state)


def test_concurrent_saves_to_one_folder_end_with_one_whole_index(tmp_path):
    folder = tmp_path / "index"
    indexes = [make_index(seed, 20 + seed) for seed in range(4)]
    barrier = threading.Barrier(len(indexes))
    errors = []

    def save(index):
        barrier.wait()
        try:
            index.save(folder)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(index,)) for index, _ in indexes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    final = state_of(folder)
    assert sum(same(final, state) for _, state in indexes) == 1
    assert len([path for path in folder.iterdir() if path.name.startswith("generation-")]) == 1


def test_a_failed_write_such_as_a_full_disk_keeps_the_old_index(tmp_path, monkeypatch):
    folder = tmp_path / "index"
    old, old_state = make_index(0, 10)
    old.save(folder)
    new, _ = make_index(1, 10)

    def full_disk(index, path):
        raise RuntimeError("Error in faiss::FileIOWriter: fwrite failed: No space left on device")

    monkeypatch.setattr(new._faiss, "write_index", full_disk)
    with pytest.raises(OSError, match="could not write .*index.faiss: .*No space left on device"):
        new.save(folder)
    assert same(state_of(folder), old_state)
    assert len([path for path in folder.iterdir() if path.name.startswith("generation-")]) == 1


def committed_file(folder: Path, role: str) -> Path:
    return folder / json.loads((folder / CONFIG_NAME).read_text())["files"][role]["path"]


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_reordered_metadata_lines_are_refused(tmp_path):
    index, _ = make_index(0, 5)
    index.save(tmp_path)
    path = committed_file(tmp_path, "metadata")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[1], lines[0], *lines[2:]]))  # same counts, no repeats: only the order differs
    with pytest.raises(CorruptFileError, match="metadata.jsonl does not match the content hash"):
        EmbeddingIndex.load(tmp_path)


@pytest.mark.parametrize("tamper, message", [
    (lambda folder: committed_file(folder, "faiss").write_bytes(committed_file(folder, "faiss").read_bytes()[:50]),
     "index.faiss does not match the content hash"),
    (lambda folder: edit_config(folder, lambda config: config["config"].update(kind="hnsw")),
     "holds a IndexFlatIP, but index_config.json says kind 'hnsw'"),
    (lambda folder: edit_config(folder, lambda config: config.pop("files")), r"lacks the key\(s\) \['files'\]"),
    (lambda folder: edit_config(folder, lambda config: config["config"].update(dim="x")), "invalid index settings"),
    (lambda folder: edit_config(folder, lambda config: config["files"]["faiss"].update(path="../elsewhere.faiss")),
     "must be a path inside the index folder"),
    (lambda folder: (folder / CONFIG_NAME).write_text("{not json"), "not valid UTF-8 JSON"),
    (lambda folder: committed_file(folder, "vectors").unlink(), "vectors.npy: missing"),
])
def test_tampered_index_files_get_one_clear_error(tmp_path, tamper, message):
    index, _ = make_index(0, 5)
    index.save(tmp_path)
    tamper(tmp_path)
    with pytest.raises(CorruptFileError, match=message):
        EmbeddingIndex.load(tmp_path)


def test_without_hash_checks_a_metadata_line_without_id_is_named(tmp_path):
    index, _ = make_index(0, 5)
    index.save(tmp_path)
    path = committed_file(tmp_path, "metadata")
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = json.dumps({"metadata": {"row": 2}}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(CorruptFileError, match=r"metadata.jsonl, line 3: expected an object with a string \"id\""):
        EmbeddingIndex.load(tmp_path, verify=False)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(st.tuples(st.text(max_size=12), st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
                     min_size=1, max_size=8, unique_by=lambda entry: entry[0]),
    edit=st.tuples(st.integers(0, 10_000), st.binary(min_size=0, max_size=4), st.integers(0, 4)),
)
def test_index_metadata_round_trips_and_any_edit_is_caught(tmp_path_factory, entries, edit):
    folder = tmp_path_factory.mktemp("index")
    ids = [id_ for id_, _ in entries]
    metadata = [entry for _, entry in entries]
    index = EmbeddingIndex(DIM)
    index.add(np.random.default_rng(len(ids)).standard_normal((len(ids), DIM)), ids, metadata)
    index.save(folder)
    loaded = EmbeddingIndex.load(folder)
    assert loaded.ids == ids
    # Each vector finds itself (random vectors), with its own metadata.
    assert [hits[0][2] for hits in loaded.search(loaded.get_vectors().astype(np.float32), 1)] == \
        metadata

    # Replace a few bytes anywhere in the metadata file: either nothing changed, or load refuses the file;
    # without hash checks the structural checks still give a result or one CorruptFileError.
    path = committed_file(folder, "metadata")
    data = path.read_bytes()
    at, insert, remove = edit[0] % (len(data) + 1), edit[1], edit[2]
    edited = data[:at] + insert + data[at + remove:]
    path.write_bytes(edited)
    if edited == data:
        assert EmbeddingIndex.load(folder).ids == ids
        return
    with pytest.raises(CorruptFileError, match="metadata.jsonl"):
        EmbeddingIndex.load(folder)
    try:  # structural checks only: a result, or one CorruptFileError naming the folder's file
        EmbeddingIndex.load(folder, verify=False)
    except CorruptFileError as error:
        assert str(folder) in str(error)
