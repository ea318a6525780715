"""Readers for the chest X-ray image-report corpora as users download them.

Each reader turns a downloaded folder into one record per image (`CorpusRead.records`), with the
same keys whatever the source:

| key | meaning |
|---|---|
| `image_id` | the image's id in the source (MIMIC dicom_id, file name stem otherwise) |
| `study_id`, `patient_id` | the study and patient (IU X-ray has no patient ids: the study id stands in) |
| `view_position` | PA, AP, LATERAL, LL, ... (upper case); FRONTAL where a source tells only frontal; None if unknown |
| `image_source` | the image file, relative to `CorpusRead.image_root` |
| `findings`, `impression` | the report sections, None where the report lacks them |
| `report` | the whole free-text report where the source has one, else None |
| `split` | the official split (train / validation / test) where the source has one, else None |
| `labels` | {label: value} (CheXpert: 1.0 positive, 0.0 negative, -1.0 uncertain, None unmentioned), else None |

Records the reader cannot pair (an image whose report file is missing, ...) are counted and listed in
`CorpusRead.dropped` by reason, never left out silently. Missing or unreadable *image files* are found
later, by `prepare`, which opens every image.

Layouts (`LAYOUTS`), from the datasets' published documentation:

* `mimic-cxr-jpg`: MIMIC-CXR-JPG 2.x (`files/pXX/p<subject>/s<study>/<dicom_id>.jpg` and
  `mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]`) joined with the MIMIC-CXR reports
  (`files/pXX/p<subject>/s<study>.txt`), whose sections are parsed by `sections.parse_report_sections`.
* `chexpert-plus`: CheXpert Plus (`df_chexpert_plus_240401.csv`: `path_to_image`, `frontal_lateral`, `ap_pa`,
  `deid_patient_id`, `report`, `section_findings`, `section_impression`, `split`; images under the folder
  or its `PNG/`; CheXbert labels from `chexbert_labels/impression_fixed.json` when present).
* `iu-xray`: IU X-ray (Open-I) as R2Gen's `annotation.json` + `images/`, or as the Kaggle
  `indiana_reports.csv` + `indiana_projections.csv` (also accepted named `reports.csv` + `projections.csv`)
  with the PNGs anywhere below the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .sections import parse_report_sections

__all__ = ["CHEXPERT_LABELS", "LAYOUTS", "CorpusRead", "detect_layout", "read_corpus"]

# The 14 CheXpert observations, as MIMIC-CXR-JPG's chexpert CSV and CheXbert name them.
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
_SPLIT_NAMES = {"train": "train", "validate": "validation", "validation": "validation", "valid": "validation",
                "val": "validation", "test": "test"}


@dataclass
class CorpusRead:
    """What a reader found in a downloaded folder.

    Attributes:
        layout: the layout name (a key of `LAYOUTS`) and `variant` the sub-layout where one has several.
        image_root: the folder `image_source` paths are relative to.
        records: one dict per image (keys in the module docstring).
        dropped: reason -> ids of the records left out by the reader and why.
        official_split: whether `split` comes from the source.
        has_patient_ids: False where the study id stands in for a patient id.
        source_files: the files read, by role.
    """

    layout: str
    variant: str
    image_root: str
    records: list[dict]
    dropped: dict[str, list[str]] = field(default_factory=dict)
    official_split: bool = False
    has_patient_ids: bool = True
    source_files: dict[str, str] = field(default_factory=dict)


def _record(**values) -> dict:
    keys = ("image_id", "study_id", "patient_id", "view_position", "image_source", "findings", "impression",
            "report", "split", "labels")
    return {key: values.get(key) for key in keys}


def _text(value) -> str | None:
    """A CSV/JSON cell as stripped text; NaN, None and blank become None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = " ".join(str(value).split())
    return text or None


def _split_name(value, where: str) -> str:
    name = _SPLIT_NAMES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"{where}: unknown split {value!r}; expected one of {sorted(_SPLIT_NAMES)}.")
    return name


def _find_csv(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def _read_csv(path: Path, required: tuple[str, ...], **kwargs):
    import pandas as pd

    frame = pd.read_csv(path, **kwargs)  # .gz is decompressed from the suffix
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns are {list(frame.columns)}.")
    return frame


def _labels(row, columns) -> dict:
    return {column: (None if row[column] != row[column] else float(row[column])) for column in columns}


# ---------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG + MIMIC-CXR reports
# ---------------------------------------------------------------------------------------------

_MIMIC_PREFIX = "mimic-cxr-2.0.0-"


def _mimic_reports_dir(root: Path, reports: str | os.PathLike | None) -> Path:
    """The folder holding pXX/p<subject>/s<study>.txt (MIMIC-CXR's `files/`, or its parent)."""
    candidates = [Path(reports), Path(reports) / "files"] if reports is not None else [root / "files"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("p[0-9][0-9]/p*/s*.txt")):
            return candidate
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"No MIMIC-CXR report files (pXX/p<subject>/s<study>.txt) in {where}. Pass --reports pointing at the "
        "`files/` folder of MIMIC-CXR (the reports, e.g. from mimic-cxr-reports.zip)."
    )


def read_mimic_cxr_jpg(root, reports=None, split_source: str = "official") -> CorpusRead:
    """MIMIC-CXR-JPG images and metadata joined with the MIMIC-CXR free-text reports.

    Args:
        root: the MIMIC-CXR-JPG folder (holding `files/` and the mimic-cxr-2.0.0-*.csv[.gz] files).
        reports: the MIMIC-CXR `files/` folder with the `s<study>.txt` reports (default: `root/files`).
        split_source: "official" needs mimic-cxr-2.0.0-split.csv[.gz]; "patient" does without it.
    """
    root = Path(root)
    metadata_path = _find_csv(root, _MIMIC_PREFIX + "metadata.csv")
    if metadata_path is None:
        raise FileNotFoundError(
            f"{root} is not a MIMIC-CXR-JPG folder: it has no {_MIMIC_PREFIX}metadata.csv(.gz) "
            "(expected beside files/ in the MIMIC-CXR-JPG download)."
        )
    metadata = _read_csv(
        metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"), dtype={"dicom_id": str}
    )
    sources = {"metadata": str(metadata_path)}
    split_of = {}
    if split_source == "official":
        split_path = _find_csv(root, _MIMIC_PREFIX + "split.csv")
        if split_path is None:
            raise FileNotFoundError(
                f"{root} has no {_MIMIC_PREFIX}split.csv(.gz), which holds the official split; put it beside the "
                "metadata CSV, or use --split patient for a seeded patient-level split."
            )
        split_frame = _read_csv(split_path, ("dicom_id", "split"), dtype={"dicom_id": str})
        split_of = {row.dicom_id: _split_name(row.split, str(split_path)) for row in split_frame.itertuples()}
        sources["split"] = str(split_path)
    labels_of = {}
    chexpert_path = _find_csv(root, _MIMIC_PREFIX + "chexpert.csv")
    if chexpert_path is not None:
        chexpert = _read_csv(chexpert_path, ("subject_id", "study_id", *CHEXPERT_LABELS))
        for _, row in chexpert.iterrows():
            labels_of[int(row["study_id"])] = _labels(row, CHEXPERT_LABELS)
        sources["chexpert"] = str(chexpert_path)
    reports_dir = _mimic_reports_dir(root, reports)
    sources["reports"] = str(reports_dir)

    records, dropped, sections_of = [], {}, {}
    for row in metadata.itertuples():
        subject, study = int(row.subject_id), int(row.study_id)
        prefix = f"p{str(subject)[:2]}/p{subject}"
        if split_source == "official" and row.dicom_id not in split_of:
            dropped.setdefault("not_in_split_csv", []).append(row.dicom_id)
            continue
        if study not in sections_of:
            report_path = reports_dir / prefix / f"s{study}.txt"
            sections_of[study] = report_path.read_text(encoding="utf-8") if report_path.is_file() else None
        report = sections_of[study]
        if report is None:
            dropped.setdefault("report_missing", []).append(
                f"{row.dicom_id} ({reports_dir / prefix / f's{study}.txt'})"
            )
            continue
        sections = parse_report_sections(report)
        records.append(_record(
            image_id=row.dicom_id, study_id=str(study), patient_id=str(subject),
            view_position=_text(row.ViewPosition) and _text(row.ViewPosition).upper(),
            image_source=f"files/{prefix}/s{study}/{row.dicom_id}.jpg",
            findings=sections.findings, impression=sections.impression, report=_text(report) and report.strip(),
            split=split_of.get(row.dicom_id), labels=labels_of.get(study),
        ))
    return CorpusRead("mimic-cxr-jpg", "mimic-cxr-jpg", str(root), records, dropped,
                      official_split=split_source == "official", source_files=sources)


# ---------------------------------------------------------------------------------------------
# CheXpert Plus
# ---------------------------------------------------------------------------------------------

CHEXPERT_PLUS_CSV = "df_chexpert_plus_240401.csv"
_CHEXPERT_PLUS_COLUMNS = ("path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id", "section_findings",
                          "section_impression", "split")


def _chexpert_plus_image_base(root: Path, images, paths: list[str]) -> tuple[Path, str | None]:
    """(folder, replacement suffix) under which `path_to_image` values exist: the CSV names .jpg files of the
    original CheXpert, while the CheXpert Plus download holds PNGs (in `PNG/`)."""
    bases = [Path(images)] if images is not None else [root, root / "PNG", root / "PNG" / "PNG", root / "images"]
    for path in paths[:200]:
        for base in bases:
            for suffix in (None, ".png", ".jpg"):
                candidate = base / path if suffix is None else (base / path).with_suffix(suffix)
                if candidate.is_file():
                    return base, suffix
    raise FileNotFoundError(
        f"None of the first {min(len(paths), 200)} `path_to_image` files of {CHEXPERT_PLUS_CSV} (e.g. {paths[0]!r}) "
        f"exist under {', '.join(str(b) for b in bases)} (as .jpg or .png). Pass --images with the folder that "
        "holds the train/ and valid/ image folders."
    )


def read_chexpert_plus(root, images=None, split_source: str = "official") -> CorpusRead:
    """CheXpert Plus: `df_chexpert_plus_240401.csv` with its parsed sections and the image files.

    Args:
        root: the CheXpert Plus folder holding the CSV.
        images: the folder `path_to_image` is relative to (default: found among the folder, `PNG/`, `PNG/PNG/`).
        split_source: "official" (the CSV's `split`) or "patient".
    """
    root = Path(root)
    csv_path = root / CHEXPERT_PLUS_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"{root} is not a CheXpert Plus folder: it has no {CHEXPERT_PLUS_CSV}.")
    frame = _read_csv(csv_path, _CHEXPERT_PLUS_COLUMNS, dtype={"deid_patient_id": str}, low_memory=False)
    base, suffix = _chexpert_plus_image_base(root, images, frame["path_to_image"].astype(str).tolist())
    labels_of, sources = {}, {"reports": str(csv_path)}
    labels_path = root / "chexbert_labels" / "impression_fixed.json"
    if labels_path.is_file():  # JSON lines: path_to_image + the 14 labels
        with labels_path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    item = json.loads(line)
                    labels_of[item["path_to_image"]] = {name: item.get(name) for name in CHEXPERT_LABELS}
        sources["labels"] = str(labels_path)
    records = []
    for row in frame.itertuples():
        path = str(row.path_to_image)
        parts = Path(path).parts  # <split>/patient<id>/study<n>/view<k>_<frontal|lateral>.jpg
        study = "/".join(parts[-3:-1]) if len(parts) >= 3 else path
        frontal = str(row.frontal_lateral).strip().lower() == "frontal"
        view = (_text(row.ap_pa) or "FRONTAL").upper() if frontal else "LATERAL"
        image = path if suffix is None else str(Path(path).with_suffix(suffix))
        records.append(_record(
            image_id=path, study_id=study, patient_id=str(row.deid_patient_id), view_position=view,
            image_source=os.path.relpath(base / image, root), findings=_text(row.section_findings),
            impression=_text(row.section_impression), report=_text(getattr(row, "report", None)),
            split=_split_name(row.split, str(csv_path)) if split_source == "official" else None,
            labels=labels_of.get(path),
        ))
    return CorpusRead("chexpert-plus", "chexpert-plus", str(root), records,
                      official_split=split_source == "official", source_files=sources)


# ---------------------------------------------------------------------------------------------
# IU X-ray (Open-I)
# ---------------------------------------------------------------------------------------------

_IU_CSV_NAMES = (("indiana_reports.csv", "indiana_projections.csv"), ("reports.csv", "projections.csv"))


def _iu_csv_layout(root: Path):
    for reports, projections in _IU_CSV_NAMES:
        if (root / reports).is_file() and (root / projections).is_file():
            return root / reports, root / projections
    return None


def _read_iu_r2gen(root: Path, split_source: str) -> CorpusRead:
    path = root / "annotation.json"
    try:
        annotation = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(annotation, dict) or not annotation:
        raise ValueError(f"{path}: expected an object {{'train': [...], 'val': [...], 'test': [...]}}.")
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{root} has annotation.json but no images/ folder beside it (R2Gen IU X-ray layout).")
    records = []
    for split_key, items in annotation.items():
        for item in items:
            missing = [key for key in ("id", "report", "image_path") if key not in item]
            if missing:
                raise ValueError(f"{path}: an entry of {split_key!r} lacks {missing}: {str(item)[:200]}")
            report = _text(item["report"])
            for image_path in item["image_path"]:
                records.append(
                    _record(
                        image_id=str(Path(image_path).with_suffix("")),
                        study_id=str(item["id"]),
                        patient_id=str(item["id"]),
                        view_position=None,
                        image_source=f"images/{image_path}",
                        # R2Gen's IU X-ray `report` is the FINDINGS section (its paper's reference reports).
                        findings=report,
                        impression=None,
                        report=report,
                        split=_split_name(item.get("split", split_key), str(path))
                        if split_source == "official"
                        else None,
                    )
                )
    return CorpusRead("iu-xray", "r2gen-annotation", str(root), records, official_split=split_source == "official",
                      has_patient_ids=False, source_files={"annotation": str(path), "images": str(images)})


def _read_iu_csv(root: Path, reports_path: Path, projections_path: Path) -> CorpusRead:
    reports = _read_csv(reports_path, ("uid", "findings", "impression"), dtype=str, keep_default_na=False)
    projections = _read_csv(projections_path, ("uid", "filename", "projection"), dtype=str, keep_default_na=False)
    # The Kaggle copy keeps the PNGs in images/images_normalized/; look anywhere below the folder.
    found = {path.name: path for path in root.rglob("*.png")}
    by_uid = {row.uid: row for row in reports.itertuples()}
    optional = [column for column in ("MeSH", "Problems") if column in reports.columns]
    records, dropped = [], {}
    for row in projections.itertuples():
        report = by_uid.get(row.uid)
        if report is None:
            dropped.setdefault("report_missing", []).append(
                f"{row.filename} (uid {row.uid} not in {reports_path.name})"
            )
            continue
        image = found.get(row.filename)
        records.append(_record(
            image_id=row.filename.removesuffix(".png"), study_id=str(row.uid), patient_id=str(row.uid),
            view_position=_text(row.projection) and _text(row.projection).upper(),
            image_source=os.path.relpath(image, root) if image else f"images/images_normalized/{row.filename}",
            findings=_text(report.findings), impression=_text(report.impression),
            labels={column: getattr(report, column).strip() or None for column in optional} or None,
        ))
    return CorpusRead("iu-xray", "indiana-csv", str(root), records, dropped, has_patient_ids=False,
                      source_files={"reports": str(reports_path), "projections": str(projections_path)})


def read_iu_xray(root, split_source: str = "official") -> CorpusRead:
    """IU X-ray in R2Gen's `annotation.json` + `images/` layout or the `indiana_reports.csv` +
    `indiana_projections.csv` layout (which has no official split)."""
    root = Path(root)
    if (root / "annotation.json").is_file():
        return _read_iu_r2gen(root, split_source)
    csvs = _iu_csv_layout(root)
    if csvs is not None:
        return _read_iu_csv(root, *csvs)
    raise FileNotFoundError(
        f"{root} is not an IU X-ray folder: expected annotation.json + images/ (R2Gen layout) or "
        "indiana_reports.csv + indiana_projections.csv (or reports.csv + projections.csv)."
    )


LAYOUTS = {
    "mimic-cxr-jpg": read_mimic_cxr_jpg,
    "chexpert-plus": read_chexpert_plus,
    "iu-xray": read_iu_xray,
}


def detect_layout(root) -> str:
    """The `LAYOUTS` name whose files `root` holds; a FileNotFoundError names what each layout expects."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder.")
    if _find_csv(root, _MIMIC_PREFIX + "metadata.csv"):
        return "mimic-cxr-jpg"
    if (root / CHEXPERT_PLUS_CSV).is_file():
        return "chexpert-plus"
    if (root / "annotation.json").is_file() or _iu_csv_layout(root):
        return "iu-xray"
    raise FileNotFoundError(
        f"{root} matches no known layout. Expected one of: mimic-cxr-jpg ({_MIMIC_PREFIX}metadata.csv[.gz] + "
        f"files/), chexpert-plus ({CHEXPERT_PLUS_CSV}), iu-xray (annotation.json + images/, or "
        "indiana_reports.csv + indiana_projections.csv)."
    )


def read_corpus(layout: str, root, **options) -> CorpusRead:
    """Read a downloaded folder with the reader of `layout` ("auto" detects it).

    Options are passed to the reader: `reports` (mimic-cxr-jpg), `images` (chexpert-plus) and
    `split_source` ("official" or "patient"). A layout that cannot use an option raises a ValueError.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (the downloaded dataset folder).")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; expected one of {sorted(LAYOUTS)} or 'auto'.")
    accepted = {"mimic-cxr-jpg": {"reports", "split_source"}, "chexpert-plus": {"images", "split_source"},
                "iu-xray": {"split_source"}}[layout]
    given = {key: value for key, value in options.items() if value is not None}
    unused = sorted(set(given) - accepted)
    if unused:
        raise ValueError(f"Layout {layout!r} takes no option(s) {unused}; it accepts {sorted(accepted)}.")
    if given.get("split_source", "official") not in ("official", "patient"):
        raise ValueError(f"`split_source` must be 'official' or 'patient', got {given['split_source']!r}.")
    return LAYOUTS[layout](root, **given)
