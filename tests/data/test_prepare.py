"""The prepare step on FABRICATED layouts (tests/data/test_corpora.py) and the real Open-I files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llm2clip4cxr.cli import main
from llm2clip4cxr.data import load_prepared
from llm2clip4cxr.data.imaging import load_image
from llm2clip4cxr.data.prepare import PrepareOptions, prepare, split_by_patient
from llm2clip4cxr.fileio import is_partial_write

from ..shared_data import import_recipe, needs_openi, needs_samples
from .test_corpora import DICOM, JPEG, MIMIC_STUDIES, OPENI, PNG, make_chexpert_plus, make_mimic

pytestmark = needs_samples


def test_split_by_patient_is_seeded_and_keeps_patients_whole():
    patients = [f"p{i}" for i in range(200)] * 3  # repeated ids: a patient's rows
    split = split_by_patient(patients, 0.1, 0.2, seed=3)
    assert set(split) == set(patients)
    counts = {name: sum(1 for value in split.values() if value == name) for name in ("train", "validation", "test")}
    assert counts == {"train": 140, "validation": 20, "test": 40}
    assert split == split_by_patient(list(reversed(patients)), 0.1, 0.2, seed=3)  # order does not matter
    assert split != split_by_patient(patients, 0.1, 0.2, seed=4)


def test_prepare_mimic_resizes_checks_and_summarises(tmp_path):
    jpg, reports = make_mimic(tmp_path)
    # One image file missing, one truncated (a corrupt JPEG): listed, not a crash.
    missing = jpg / "files/p10/p10000764/s57375967/b79e55c3-735ce5ac.jpg"
    missing.unlink()
    corrupt = jpg / "files/p10/p10001217/s52067803/ea030e7a-2e3b1346.jpg"
    corrupt.write_bytes(JPEG.read_bytes()[:3000])
    output = tmp_path / "prepared"
    options = PrepareOptions(reports=str(reports), image_size=64, shard_size=2)
    summary = prepare(jpg, output, options, num_workers=2, progress=False)
    assert summary["rows"] == {"train": 3, "validation": 1, "test": 0}
    assert summary["dropped_counts"] == {"image_missing": 1, "image_unreadable": 1, "report_missing": 1}
    assert str(missing) in summary["dropped"]["image_missing"][0]
    assert str(corrupt) in summary["dropped"]["image_unreadable"][0]
    assert json.loads((output / "summary.json").read_text()) == summary

    # The folder can move: image paths are relative to it.
    moved = tmp_path / "moved"
    output.rename(moved)
    train = load_prepared(moved, split="train")
    assert [row["image_id"] for row in train] == ["02aa804e-bde0afdd", "174413ec-4ec4c1f7", "2a2277a9-b0ded155"]
    for row in train:
        source = jpg / row["source_image"]
        with Image.open(row["image"]) as image:
            assert row["image"].startswith(str(moved)) and max(image.size) == 64 and image.mode == "L"
            original = load_image(source).shape  # (H, W)
            assert (row["width"], row["height"]) == image.size
            assert abs(image.size[0] / image.size[1] - original[1] / original[0]) < 0.05  # aspect kept
    assert train[0]["findings"] == "The lungs are clear. No pleural effusion or pneumothorax."
    assert train[2]["findings"] is None and train[2]["impression"] == "Right IJ line tip in the SVC."
    assert train[0]["labels"]["No Finding"] == 1.0 and train[2]["labels"] is None
    with pytest.raises(ValueError, match=r"no rows in split 'test'"):
        load_prepared(moved, split="test")


def test_prepare_frontal_only_per_study_with_a_section_required(tmp_path):
    jpg, reports = make_mimic(tmp_path)
    options = PrepareOptions(reports=str(reports), unit="study", frontal_only=True, require_section="findings")
    summary = prepare(jpg, tmp_path / "out", options, num_workers=1, progress=False)
    # Expected from the fabricated table: frontal images only, studies without FINDINGS dropped.
    expected = {}
    for by_study in MIMIC_STUDIES.values():
        for study, (report, images) in by_study.items():
            frontal = [dicom for dicom, view, _, _ in images if view in ("PA", "AP")]
            if report is not None and "FINDINGS:" in report and frontal:
                expected[str(study)] = frontal
    rows = [row for split in ("train", "validation", "test") if summary["rows"][split]
            for row in load_prepared(tmp_path / "out", split=split)]
    assert {row["study_id"]: row["image_ids"] for row in rows} == expected
    assert summary["dropped_counts"] == {"no_findings": 1, "not_frontal": 2, "report_missing": 1}
    assert all(Path(path).is_file() and path.startswith(str(jpg)) for row in rows for path in row["images"])


def test_prepare_refuses_other_options_and_foreign_folders(tmp_path):
    folder = make_chexpert_plus(tmp_path)
    prepare(folder, tmp_path / "out", PrepareOptions(image_size=32), num_workers=1, progress=False)
    with pytest.raises(ValueError, match=r"prepared with other options \(image_size: 32 -> 48\)"):
        prepare(folder, tmp_path / "out", PrepareOptions(image_size=48), num_workers=1, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prepared folder"):
        prepare(folder, tmp_path / "busy", PrepareOptions(), num_workers=1, progress=False)
    with pytest.raises(ValueError, match="needs view positions"):  # R2Gen-like sources record no views
        from llm2clip4cxr.data.corpora import CorpusRead
        from llm2clip4cxr.data.prepare import plan_rows

        plan_rows(CorpusRead("iu-xray", "r2gen-annotation", ".", [{"image_id": "a", "view_position": None}]),
                  PrepareOptions(frontal_only=True))
    with pytest.raises(ValueError, match="`unit` must be one of"):
        PrepareOptions(unit="series")


@needs_openi
def test_cli_prepare_text_only_on_real_openi(tmp_path, capsys):
    assert main(["prepare", "iu-xray", str(OPENI), "--output", str(tmp_path / "iu"), "--text-only", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    splits = {split: load_prepared(tmp_path / "iu", split=split) for split in ("train", "validation", "test")}
    assert {split: len(ds) for split, ds in splits.items()} == summary["rows"]
    patients = {split: set(ds["patient_id"]) for split, ds in splits.items()}
    assert not (patients["train"] & patients["validation"] or patients["train"] & patients["test"]
                or patients["validation"] & patients["test"])
    studies = sum(len(ds) for ds in splits.values()) + summary["dropped_counts"]["no_findings_or_impression"]
    import csv

    with open(OPENI / "projections.csv", newline="") as handle:
        assert studies == len({row["uid"] for row in csv.DictReader(handle)})
    assert all(row["findings"] or row["impression"] for ds in splits.values() for row in ds)


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "padchest", str(tmp_path), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    (tmp_path / "source").mkdir()
    assert main(["prepare", "auto", str(tmp_path / "source"), "--output", str(tmp_path / "o")]) == 1
    assert "matches no known layout" in capsys.readouterr().err
    # Output inside the source would change the source (its files are planned and hashed): refused first.
    assert main(["prepare", "auto", str(tmp_path / "source"), "--output", str(tmp_path / "source" / "o")]) == 1
    assert "lies inside) the source folder" in capsys.readouterr().err
    assert not (tmp_path / "source" / "o").exists()


def _iu_r2gen_layout(root: Path, studies: int) -> Path:
    """R2Gen-style IU X-ray of `studies` made-up studies, images copied from the samples (one a DICOM's bytes)."""
    samples = [JPEG, PNG, DICOM]
    annotation = {"train": [], "val": [], "test": []}
    for index in range(studies):
        split = ("train", "val", "test")[index % 3]
        study = f"CXR{index}_IM-{index:04d}"
        (root / "images" / study).mkdir(parents=True)
        shutil.copy(samples[index % 3], root / "images" / study / "0.png")
        annotation[split].append(
            {
                "id": study,
                "report": f"Made-up findings number {index}.",
                "image_path": [f"{study}/0.png"],
                "split": split,
            }
        )
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


def finished_shards(output: Path) -> list[Path]:
    """The shard records a run has committed: `shards/*.json` minus the hidden temp file of one being written
    (pathlib's glob matches hidden names, so `*.json` alone also picks up `.<name>.<hex>.tmp.json`)."""
    return [path for path in (output / "shards").glob("*.json") if not is_partial_write(path.name)]


def test_prepare_resumes_after_sigkill_without_redoing_finished_shards(tmp_path):
    source = _iu_r2gen_layout(tmp_path / "iu", 36)
    command = [sys.executable, "-m", "llm2clip4cxr", "prepare", "iu-xray", str(source), "--image-size", "48",
               "--shard-size", "2", "--num-workers", "1", "--json"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--output", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(finished_shards(killed)) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {
        path.stem: os.stat(killed / "data" / f"{path.stem}.parquet").st_mtime_ns for path in finished_shards(killed)
    }
    assert 2 <= len(done) < 18 and not (killed / "summary.json").exists()  # killed mid-run

    rerun = subprocess.run([*command, "--output", str(killed)], capture_output=True, text=True, check=True)
    assert json.loads(rerun.stdout)["shards_reused"] >= len(done)
    for name, mtime in done.items():  # finished shards were not rewritten
        assert os.stat(killed / "data" / f"{name}.parquet").st_mtime_ns == mtime
    assert not list(killed.rglob("*.tmp*"))

    fresh = tmp_path / "fresh"
    subprocess.run([*command, "--output", str(fresh)], capture_output=True, check=True)
    for split in ("train", "validation", "test"):
        a, b = load_prepared(killed, split=split), load_prepared(fresh, split=split)
        strip = lambda rows, root: [{**row, "image": os.path.relpath(row["image"], root)} for row in rows]  # noqa: E731
        assert strip(a.to_list(), killed) == strip(b.to_list(), fresh)
        for row in a.to_list():
            assert Path(row["image"]).read_bytes() == (fresh / os.path.relpath(row["image"], killed)).read_bytes()


def test_training_recipes_take_a_prepared_folder(make_encoder, tmp_path):
    """FABRICATED PAIRING (smoke test): both recipes train a couple of steps on a prepared CheXpert Plus layout."""
    from transformers import AutoModel

    from ..training.test_clip import TINY_VISION

    folder = make_chexpert_plus(tmp_path)
    prepare(folder, tmp_path / "prepared", PrepareOptions(image_size=40, split="patient", validation_fraction=0.3,
                                                         test_fraction=0.0), num_workers=1, progress=False)
    make_encoder().save_pretrained(tmp_path / "text")
    (tmp_path / "vision.json").write_text(json.dumps({"model_type": "clip_vision_model", **TINY_VISION}))
    common = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "true",
              "--max_steps", "1", "--per_device_train_batch_size", "2"]
    rows = import_recipe("train_clip").read_rows(str(tmp_path / "prepared"))
    assert rows == [
        {**row, "index": i} for i, row in enumerate(load_prepared(tmp_path / "prepared", "train").to_list())
    ]
    final = import_recipe("train_clip").main([
        "--text_model_name_or_path", str(tmp_path / "text"), "--vision", str(tmp_path / "vision.json"),
        "--projection_dim", "16", "--image_size", "32", "--data", str(tmp_path / "prepared"),
        "--freeze_text", "true", "--output_dir", str(tmp_path / "clip"), *common,
    ])
    assert AutoModel.from_pretrained(final) is not None
    text = import_recipe("train_text_encoder")
    train_rows, validation_rows = text.prepared_report_rows(str(tmp_path / "prepared"), ["findings", "impression"])
    studies = {split: {row["study_id"]: row for row in load_prepared(tmp_path / "prepared", split)}
               for split in ("train", "validation")}
    assert [r["impression"] for r in train_rows] == [r["impression"] or "" for r in studies["train"].values()]
    assert len(validation_rows) == len(studies["validation"])
    final = text.main(["--stage", "simcse", "--model_name_or_path", str(tmp_path / "text"), "--data",
                       str(tmp_path / "prepared"), "--output_dir", str(tmp_path / "simcse"), *common])
    assert Path(final, "config.json").is_file()
