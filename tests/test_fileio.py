from pathlib import Path

import numpy as np
import pytest

from llm2clip4cxr.fileio import atomic_write, remove_partial_writes


def test_atomic_write_replaces_whole_files_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "embeddings.npy"
    atomic_write(target, lambda temp: np.save(temp, np.arange(3)))  # np.save would append .npy to other names
    np.testing.assert_array_equal(np.load(target), np.arange(3))
    assert [path.name for path in tmp_path.iterdir()] == ["embeddings.npy"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def fail(temp):
        temp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [path.name for path in tmp_path.iterdir()] == ["summary.json"]


def test_remove_partial_writes_deletes_only_temp_files_of_atomic_write(tmp_path):
    (tmp_path / "images").mkdir()
    killed = tmp_path / "images" / ".0.337c05c4370c4cfba4a66937552e7a63.tmp.png"  # what a SIGKILL leaves
    killed.write_bytes(b"half an image")
    kept = [tmp_path / ".notes.tmp.txt", tmp_path / "report.tmp", tmp_path / "images" / "0.png"]
    for path in kept:
        path.write_text("mine")
    assert remove_partial_writes(tmp_path) == 1
    assert not killed.exists() and all(path.exists() for path in kept)


def test_atomic_write_folder_replaces_the_old_folder_or_leaves_it_untouched(tmp_path):
    from llm2clip4cxr.fileio import atomic_write_folder

    target = tmp_path / "model"
    atomic_write_folder(target, lambda folder: (folder.mkdir(), (folder / "config.json").write_text("v1")))
    atomic_write_folder(target, lambda folder: (folder.mkdir(), (folder / "weights.safetensors").write_text("v2")))
    assert sorted(path.name for path in target.iterdir()) == ["weights.safetensors"]  # nothing of v1 is left

    def fail(folder):
        folder.mkdir()
        (folder / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_folder(target, fail)
    # Only the folder and its (empty, reusable) lock file beside it: the temp folder is gone.
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.lock", "model"]
    assert (target / "weights.safetensors").read_text() == "v2"


@pytest.mark.parametrize("name", ["index_config.json", "vectors.npy", "model.safetensors", "a.tmp.b.npy", "noext",
                                  ".hidden.json", "archive.tar.gz"])
def test_every_temp_name_atomic_write_uses_is_recognised_and_cleaned(tmp_path, name):
    from llm2clip4cxr.fileio import is_partial_write, temp_path_for

    temp = temp_path_for(tmp_path / name)
    # Hidden, beside the target, and ending in the target's suffix (writers pick the format from it).
    assert temp.parent == tmp_path and temp.name.startswith(".") and temp.name.endswith(".tmp" + Path(name).suffix)
    assert is_partial_write(temp.name) and not is_partial_write(name)
    temp.write_text("what a SIGKILL mid-write leaves")
    assert remove_partial_writes(tmp_path) == 1 and not temp.exists()


def test_output_lock_is_reentrant_whatever_the_path_is_called(tmp_path, monkeypatch):
    from llm2clip4cxr.fileio import output_lock

    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    # Held under one name, taken again under others in the same thread: no deadlock, one lock file.
    with (
        output_lock("out", inside=True, wait=False),
        output_lock(tmp_path / "out", inside=True, wait=False),
        output_lock("alias", inside=True, wait=False),
    ):
        pass
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [".lock"]
