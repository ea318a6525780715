"""Readers on miniature FABRICATED layouts of each corpus (made-up ids and report text in the real section
style, real sample X-ray files as the images) and the IU reader on the real Open-I files."""

import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest

from llm2clip4cxr.data.corpora import CHEXPERT_LABELS, detect_layout, read_corpus

from ..shared_data import OPENI, SAMPLES, needs_openi, needs_samples

# Real files: 512x512 PNGs, a non-square RGB JPEG (1036x885), an 8-bit JPEG-baseline DICOM (MONOCHROME1).
PNG = SAMPLES / "torchxrayvision" / "00000001_000.png"
PNG2 = SAMPLES / "torchxrayvision" / "00027426_000.png"
JPEG = SAMPLES / "torchxrayvision" / "16747_3_1.jpg"
DICOM = SAMPLES / "torchxrayvision" / "Fake_MONOHR1.dcm"
pytestmark = needs_samples

# subject -> studies -> (report or None for a missing report file, [(dicom_id, view, sample file, split)])
MIMIC_STUDIES = {
    10000032: {
        50414267: (
            " FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n INDICATION:  ___F with cough\n\n FINDINGS:\n"
            "  The lungs are clear.  No pleural effusion\n  or pneumothorax.\n\n IMPRESSION:  No acute process.\n",
            [("02aa804e-bde0afdd", "PA", JPEG, "train"), ("174413ec-4ec4c1f7", "LATERAL", PNG, "train")],
        ),
        53189527: (
            " FINAL REPORT\n INDICATION:  Line placement.\n\n IMPRESSION:  Right IJ line tip in the SVC.\n",
            [("2a2277a9-b0ded155", "AP", DICOM, "train")],
        ),
    },
    10000764: {
        57375967: (
            " FINAL REPORT\n COMPARISON:  None.\n\n FINDINGS:  Mild cardiomegaly.\n\n IMPRESSION:  Cardiomegaly.\n",
            [("096052b7-d256dc40", "PA", PNG2, "validate"), ("b79e55c3-735ce5ac", "LL", PNG, "validate")],
        ),
    },
    10001217: {
        58913004: (None, [("5e54fc9c-37c49834", "AP", PNG, "test")]),  # its report file is missing
        52067803: (
            " FINAL REPORT\n FINDINGS:  Small left effusion.\n IMPRESSION:  Effusion.\n",
            [("ea030e7a-2e3b1346", "PA", JPEG, "test")],
        ),
    },
}
MIMIC_LABELS = {50414267: {"No Finding": 1.0}, 57375967: {"Cardiomegaly": 1.0, "Edema": -1.0, "No Finding": 0.0}}


def write_csv(path: Path, header: list[str], rows: list[list], gz: bool = False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_mimic(root: Path, studies=MIMIC_STUDIES) -> tuple[Path, Path]:
    """(MIMIC-CXR-JPG folder, MIMIC-CXR reports `files/` folder), gzipped metadata and labels, plain split CSV."""
    jpg, reports = root / "mimic-cxr-jpg", root / "mimic-cxr" / "files"
    metadata, split, labels = [], [], []
    for subject, by_study in studies.items():
        for study, (report, images) in by_study.items():
            folder = f"p{str(subject)[:2]}/p{subject}"
            if report is not None:
                (reports / folder).mkdir(parents=True, exist_ok=True)
                (reports / folder / f"s{study}.txt").write_text(report)
            for dicom_id, view, sample, split_name in images:
                (jpg / "files" / folder / f"s{study}").mkdir(parents=True, exist_ok=True)
                shutil.copy(sample, jpg / "files" / folder / f"s{study}" / f"{dicom_id}.jpg")
                metadata.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, 2544, 3056, 21800506])
                split.append([dicom_id, study, subject, split_name])
            if study in MIMIC_LABELS:
                labels.append([subject, study, *[MIMIC_LABELS[study].get(name, "") for name in CHEXPERT_LABELS]])
    write_csv(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id",
              "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns", "StudyDate"], metadata, gz=True)
    write_csv(jpg / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split)
    write_csv(jpg / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS], labels, gz=True)
    return jpg, reports


CHEXPERT_PLUS_ROWS = [  # path_to_image, frontal_lateral, ap_pa, patient, findings, impression, split, sample
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", "00001", "Lines and tubes in place.",
     "No pneumothorax.", "train", PNG),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "00001", "Lines and tubes in place.",
     "No pneumothorax.", "train", PNG2),
    ("train/patient00002/study3/view1_frontal.jpg", "Frontal", "PA", "00002", "", "Clear lungs.", "train", JPEG),
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "PA", "64541", "Heart is enlarged.", "",
     "valid", DICOM),
]


def make_chexpert_plus(root: Path) -> Path:
    """CheXpert Plus: the report CSV names .jpg files; the download holds PNGs under PNG/ (one is a DICOM's bytes)."""
    folder = root / "chexpert-plus"
    for path, *_, sample in CHEXPERT_PLUS_ROWS:
        target = (folder / "PNG" / path).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample, target)
    header = [
        "path_to_image",
        "path_to_dcm",
        "frontal_lateral",
        "ap_pa",
        "deid_patient_id",
        "patient_report_date_order",
        "report",
        "section_findings",
        "section_impression",
        "split",
    ]
    rows = [[path, path.replace(".jpg", ".dcm"), fl, ap, patient, 1, f"FINDINGS: {f} IMPRESSION: {i}", f, i, split]
            for path, fl, ap, patient, f, i, split, _ in CHEXPERT_PLUS_ROWS]
    write_csv(folder / "df_chexpert_plus_240401.csv", header, rows)
    (folder / "chexbert_labels").mkdir()
    with open(folder / "chexbert_labels" / "impression_fixed.json", "w") as handle:
        handle.write(
            json.dumps({"path_to_image": CHEXPERT_PLUS_ROWS[0][0], "Pneumothorax": 0.0, "Support Devices": 1.0}) + "\n"
        )
    return folder


R2GEN = {
    "train": [
        {
            "id": "CXR2384_IM-0942",
            "report": "The heart is normal in size. The lungs are clear.",
            "image_path": ["CXR2384_IM-0942/0.png", "CXR2384_IM-0942/1.png"],
            "split": "train",
        }
    ],
    "val": [
        {
            "id": "CXR1000_IM-0003",
            "report": "Mild cardiomegaly.",
            "image_path": ["CXR1000_IM-0003/0.png"],
            "split": "val",
        }
    ],
    "test": [
        {"id": "CXR2000_IM-0652", "report": "No effusion.", "image_path": ["CXR2000_IM-0652/0.png"], "split": "test"}
    ],
}


def make_iu_r2gen(root: Path) -> Path:
    folder = root / "iu_xray"
    for split in R2GEN.values():
        for item in split:
            for image_path in item["image_path"]:
                (folder / "images" / image_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(PNG, folder / "images" / image_path)
    (folder / "annotation.json").write_text(json.dumps(R2GEN))
    return folder


def test_mimic_reader_joins_metadata_split_labels_and_reports(tmp_path):
    jpg, reports = make_mimic(tmp_path)
    read = read_corpus("mimic-cxr-jpg", jpg, reports=reports)
    assert detect_layout(jpg) == "mimic-cxr-jpg" and read.official_split
    expected = {}
    for subject, by_study in MIMIC_STUDIES.items():
        for study, (report, images) in by_study.items():
            for dicom_id, view, _, split in images:
                if report is not None:
                    expected[dicom_id] = (str(subject), str(study), view, {"validate": "validation"}.get(split, split))
    assert {
        r["image_id"]: (r["patient_id"], r["study_id"], r["view_position"], r["split"]) for r in read.records
    } == expected
    assert read.dropped == {"report_missing": [
        f"5e54fc9c-37c49834 ({reports / 'p10/p10001217/s58913004.txt'})"]}
    by_id = {r["image_id"]: r for r in read.records}
    first = by_id["02aa804e-bde0afdd"]
    assert (first["findings"], first["impression"]) == ("The lungs are clear. No pleural effusion or pneumothorax.",
                                                        "No acute process.")
    assert first["image_source"] == "files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg"
    assert (jpg / first["image_source"]).is_file()
    assert by_id["2a2277a9-b0ded155"]["findings"] is None  # impression-only report
    assert by_id["096052b7-d256dc40"]["labels"] == {name: MIMIC_LABELS[57375967].get(name) for name in CHEXPERT_LABELS}
    assert by_id["2a2277a9-b0ded155"]["labels"] is None  # study not in the label CSV


def test_mimic_reader_bad_input_names_what_is_expected(tmp_path):
    jpg, reports = make_mimic(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No MIMIC-CXR report files.*--reports"):
        read_corpus("mimic-cxr-jpg", jpg)  # reports not beside the images and no --reports
    (jpg / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2.0.0-split.csv\(.gz\).*--split patient"):
        read_corpus("mimic-cxr-jpg", jpg, reports=reports)
    assert read_corpus("mimic-cxr-jpg", jpg, reports=reports, split_source="patient").records
    write_csv(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id"], [["a", 1, 2]], gz=True)
    with pytest.raises(ValueError, match=r"has no column\(s\) \['ViewPosition'\]"):
        read_corpus("mimic-cxr-jpg", jpg, reports=reports, split_source="patient")
    (jpg / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"not a MIMIC-CXR-JPG folder.*metadata.csv\(.gz\)"):
        read_corpus("mimic-cxr-jpg", jpg, reports=reports)


def test_chexpert_plus_reader_finds_the_png_folder_and_labels(tmp_path):
    folder = make_chexpert_plus(tmp_path)
    read = read_corpus("auto", folder)
    assert read.layout == "chexpert-plus" and [r["image_id"] for r in read.records] == [
        row[0] for row in CHEXPERT_PLUS_ROWS
    ]
    for record, (path, fl, ap, patient, findings, impression, split, _) in zip(read.records, CHEXPERT_PLUS_ROWS):
        assert (
            record["image_source"] == "PNG/" + path.replace(".jpg", ".png")
            and (folder / record["image_source"]).is_file()
        )
        assert record["view_position"] == ((ap or "FRONTAL") if fl == "Frontal" else "LATERAL")
        assert (record["patient_id"], record["findings"], record["impression"]) == (
            patient,
            findings or None,
            impression or None,
        )
        assert record["split"] == {"valid": "validation"}.get(split, split)
        assert record["study_id"] == "/".join(path.split("/")[1:3])
    assert read.records[0]["labels"]["Support Devices"] == 1.0 and read.records[1]["labels"] is None
    shutil.rmtree(folder / "PNG")
    with pytest.raises(FileNotFoundError, match=r"path_to_image.*--images"):
        read_corpus("chexpert-plus", folder)


def test_iu_r2gen_reader(tmp_path):
    folder = make_iu_r2gen(tmp_path)
    read = read_corpus("iu-xray", folder)
    assert read.variant == "r2gen-annotation" and not read.has_patient_ids
    expected = [(item["id"], f"images/{p}", item["report"], {"val": "validation"}.get(split, split))
                for split, items in R2GEN.items() for item in items for p in item["image_path"]]
    assert [(r["study_id"], r["image_source"], r["findings"], r["split"]) for r in read.records] == expected
    assert all(r["impression"] is None and r["view_position"] is None for r in read.records)


@needs_openi
def test_iu_csv_reader_on_the_real_openi_files(tmp_path):
    read = read_corpus("iu-xray", OPENI)
    with open(OPENI / "reports.csv", newline="", encoding="utf-8") as handle:
        reports = {row["uid"]: row for row in csv.DictReader(handle)}
    with open(OPENI / "projections.csv", newline="", encoding="utf-8") as handle:
        projections = list(csv.DictReader(handle))
    assert read.variant == "indiana-csv" and not read.official_split and len(read.records) == len(projections)
    for record, projection in zip(read.records, projections):
        report = reports[projection["uid"]]
        assert record["study_id"] == projection["uid"] and record["view_position"] == projection["projection"].upper()
        assert record["findings"] == (" ".join(report["findings"].split()) or None)
        assert record["impression"] == (" ".join(report["impression"].split()) or None)
        assert record["labels"] == {"MeSH": report["MeSH"].strip(), "Problems": report["Problems"].strip()}
        assert record["image_source"] == f"images/images_normalized/{projection['filename']}"
    # The Kaggle file names, with the PNGs found wherever they are below the folder.
    for name in ("reports", "projections"):
        shutil.copy(OPENI / f"{name}.csv", tmp_path / f"indiana_{name}.csv")
    (tmp_path / "some" / "where").mkdir(parents=True)
    shutil.copy(PNG, tmp_path / "some" / "where" / projections[0]["filename"])
    kaggle = read_corpus("iu-xray", tmp_path)
    assert kaggle.records[0]["image_source"] == f"some/where/{projections[0]['filename']}"
    assert [r["findings"] for r in kaggle.records] == [r["findings"] for r in read.records]


def test_unknown_layout_and_unmatched_folder(tmp_path):
    with pytest.raises(
        ValueError, match=r"Unknown layout 'padchest'; expected one of \['chexpert-plus', 'iu-xray', 'mimic-cxr-jpg'\]"
    ):
        read_corpus("padchest", tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"matches no known layout.*metadata.csv.*df_chexpert_plus_240401.csv.*annotation.json"
    ):
        read_corpus("auto", tmp_path)
    with pytest.raises(FileNotFoundError, match="not an IU X-ray folder"):
        read_corpus("iu-xray", tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_corpus("iu-xray", tmp_path / "absent")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['reports'\]"):
        read_corpus("iu-xray", tmp_path, reports="x")
