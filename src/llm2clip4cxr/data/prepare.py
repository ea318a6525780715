"""`prepare`: a downloaded corpus folder -> a split, filtered, checked image-report dataset on disk.

The prepared folder holds::

    prepare.json              what made it: layout, source folder, options, the planned shards
    data/<split>-NNNNN-of-MMMMM.parquet   the rows (one per image, or per study with --unit study)
    shards/<shard>.json       per shard: rows written, rows dropped and why (the commit mark of the shard)
    images/...                the images resized once (with an image size); paths in the rows are relative
                              to the prepared folder, so it can be moved
    summary.json              rows per split, dropped rows by reason, missing/unreadable image files

Every image is opened (`imaging.load_image`, so PNG, JPEG and DICOM), in parallel worker processes: a
missing or corrupt file is listed in the summary and its row dropped, never a crash halfway through.
Each shard is written to a temporary file and renamed, and its `shards/*.json` mark is written last, so
a killed run resumes with the shards it had not finished; a folder prepared with other options is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write, atomic_write_json, output_lock, remove_partial_writes, start_or_resume
from .corpora import CorpusRead, read_corpus
from .tables import datasets_progress_bars_off

__all__ = [
    "PrepareOptions",
    "SECTION_REQUIREMENTS",
    "format_summary",
    "load_prepared",
    "plan_rows",
    "prepare",
    "split_by_patient",
]

MANIFEST = "prepare.json"
SUMMARY = "summary.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
FRONTAL_VIEWS = ("PA", "AP", "FRONTAL")  # FRONTAL: sources that record only frontal vs lateral (IU, CheXpert)
SECTION_REQUIREMENTS = ("findings", "impression", "any", "both", "none")
_DROP_REASON = {"findings": "no_findings", "impression": "no_impression", "any": "no_findings_or_impression",
                "both": "no_findings_and_impression"}


@dataclass(frozen=True)
class PrepareOptions:
    """The options a prepared folder is made with (recorded in prepare.json; a resume must repeat them).

    Args:
        layout: a `corpora.LAYOUTS` name or "auto".
        reports: MIMIC-CXR reports folder (mimic-cxr-jpg only).
        images: image folder override (chexpert-plus only).
        unit: "image" (one row per image) or "study" (one row per study, its images in lists).
        frontal_only: keep only PA/AP (or FRONTAL) images.
        require_section: "findings", "impression", "any" (either), "both" or "none": rows without it are dropped.
        split: "auto" (the official split where the source has one, else by patient), "official" or "patient".
        validation_fraction, test_fraction: shares of patients held out by the patient-level split.
        seed: seed of the patient-level split.
        image_size: longer side of the stored images in pixels (aspect kept, never enlarged); None keeps the
            source files in place (each is still opened to check it).
        image_format: "png" (lossless 8-bit) or "jpeg" (quality 95) for resized images.
        text_only: no images at all (for text training): one row per study, images neither read nor listed.
        shard_size: rows per parquet shard (the unit of resuming).
    """

    layout: str = "auto"
    reports: str | None = None
    images: str | None = None
    unit: str = "image"
    frontal_only: bool = False
    require_section: str = "any"
    split: str = "auto"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    image_size: int | None = None
    image_format: str = "png"
    text_only: bool = False
    shard_size: int = 1000

    def __post_init__(self):
        choices = {"unit": ("image", "study"), "require_section": SECTION_REQUIREMENTS,
                   "split": ("auto", "official", "patient"), "image_format": ("png", "jpeg")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("`validation_fraction` + `test_fraction` must leave some patients for training.")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"`image_size` must be at least 8 pixels, got {self.image_size}.")
        if self.shard_size < 1:
            raise ValueError(f"`shard_size` must be at least 1, got {self.shard_size}.")
        if self.text_only and (self.unit == "image" or self.image_size is not None or self.frontal_only):
            raise ValueError("`text_only` makes one row per study without images: use it with unit='study' and "
                             "without image_size / frontal_only.")


def split_by_patient(patient_ids, validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0) -> dict:
    """{patient id: "train" | "validation" | "test"}: whole patients go to one split, drawn with `seed`.

    The fractions are shares of patients (rounded), not of rows; the assignment depends only on the set
    of ids and the seed, not on their order.
    """
    patients = sorted(set(patient_ids))
    random.Random(seed).shuffle(patients)
    n_test = round(test_fraction * len(patients))
    n_validation = round(validation_fraction * len(patients))
    split_of = {patient: "test" for patient in patients[:n_test]}
    split_of.update({patient: "validation" for patient in patients[n_test : n_test + n_validation]})
    split_of.update({patient: "train" for patient in patients[n_test + n_validation :]})
    return split_of


def _has_section(row: dict, requirement: str) -> bool:
    findings, impression = bool(row["findings"]), bool(row["impression"])
    return {"findings": findings, "impression": impression, "any": findings or impression,
            "both": findings and impression, "none": True}[requirement]


def plan_rows(read: CorpusRead, options: PrepareOptions) -> tuple[dict[str, list[dict]], dict[str, list[str]], str]:
    """(rows by split, dropped ids by reason, split source): the reader's records filtered, split and
    (with unit="study") grouped by study, in the reader's order."""
    dropped = {reason: list(items) for reason, items in read.dropped.items()}
    records = read.records
    if options.frontal_only:
        unknown = [record["image_id"] for record in records if record["view_position"] is None]
        if unknown:
            raise ValueError(
                f"--frontal-only needs view positions, but the {read.variant} layout records none for "
                f"{len(unknown)} image(s) (e.g. {unknown[0]}); prepare without --frontal-only."
            )
        kept = []
        for record in records:
            if record["view_position"] in FRONTAL_VIEWS:
                kept.append(record)
            else:
                dropped.setdefault("not_frontal", []).append(f"{record['image_id']} ({record['view_position']})")
        records = kept

    split_source = options.split
    if split_source == "auto":
        split_source = "official" if read.official_split else "patient"
    if split_source == "official" and not read.official_split:
        raise ValueError(f"The {read.variant} layout has no official split; use split 'patient' (or 'auto').")
    if split_source == "patient":
        split_of = split_by_patient((r["patient_id"] for r in records), options.validation_fraction,
                                    options.test_fraction, options.seed)
        records = [{**record, "split": split_of[record["patient_id"]]} for record in records]

    if options.unit == "study":
        studies: dict[str, dict] = {}
        for record in records:
            study = studies.get(record["study_id"])
            if study is None:
                study = studies[record["study_id"]] = {
                    key: record[key]
                    for key in ("study_id", "patient_id", "findings", "impression", "report", "split", "labels")
                }
                study.update(image_ids=[], view_positions=[], image_sources=[])
            study["image_ids"].append(record["image_id"])
            study["view_positions"].append(record["view_position"])
            study["image_sources"].append(record["image_source"])
        records = list(studies.values())
        if options.text_only:
            for study in records:
                del study["image_ids"], study["image_sources"]

    by_split = {split: [] for split in SPLITS}
    reason = _DROP_REASON.get(options.require_section)
    for record in records:
        if not _has_section(record, options.require_section):
            dropped.setdefault(reason, []).append(record.get("image_id") or record["study_id"])
            continue
        by_split[record["split"]].append(record)
    return by_split, dropped, split_source


# ---------------------------------------------------------------------------------------------
# Images (in worker processes)
# ---------------------------------------------------------------------------------------------


def _process_image(task: tuple) -> tuple:
    """(source, destination or None, size, format) -> ("ok", width, height) or (reason, message)."""
    import numpy as np
    from PIL import Image

    from .imaging import load_image

    source, destination, size, image_format = task
    try:
        pixels = load_image(source)
    except FileNotFoundError:
        return ("image_missing", f"{source}: no such file")
    except (OSError, ValueError) as error:  # ImageLoadError is both; the message names the file and the cause
        return ("image_unreadable", str(error))
    if destination is None:
        return ("ok", pixels.shape[1], pixels.shape[0])
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="L")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)  # longer side -> size, aspect kept, never enlarged
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    save_options = {"format": "PNG"} if image_format == "png" else {"format": "JPEG", "quality": 95}
    atomic_write(destination, lambda temp: image.save(temp, **save_options))
    return ("ok", image.width, image.height)


def _prepared_image_path(source_relative: str, image_format: str) -> str:
    stem = source_relative[: -len(Path(source_relative).suffix)] if Path(source_relative).suffix else source_relative
    return f"images/{Path(stem).as_posix().lstrip('./')}.{'png' if image_format == 'png' else 'jpg'}"


# ---------------------------------------------------------------------------------------------
# The prepare step
# ---------------------------------------------------------------------------------------------


def _shard_plan(by_split: dict[str, list[dict]], shard_size: int) -> list[dict]:
    shards = []
    for split, rows in by_split.items():
        count = (len(rows) + shard_size - 1) // shard_size
        for index in range(count):
            shards.append({"name": f"{split}-{index:05d}-of-{count:05d}", "split": split,
                           "start": index * shard_size, "stop": min(len(rows), (index + 1) * shard_size)})
    return shards


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _check_or_start(output: Path, manifest: dict) -> bool:
    """Start a new prepared folder, or check that `output` was started with the same options and plan.
    Returns True when resuming."""

    def same_run(existing: dict) -> None:
        differing = sorted(key for key in set(existing["options"]) | set(manifest["options"])
                           if existing["options"].get(key) != manifest["options"].get(key))
        if existing.get("source") != manifest["source"]:
            differing.insert(0, "source")
        if differing:
            detail = ", ".join(f"{key}: {existing['options'].get(key, existing.get(key))!r} -> "
                               f"{manifest['options'].get(key, manifest.get(key))!r}" for key in differing)
            raise ValueError(f"{output} was prepared with other options ({detail}); use another --output folder, "
                             "or delete it to start over.")
        if existing.get("plan_digest") != manifest["plan_digest"]:
            raise ValueError(f"{output} was prepared from other source files (the planned rows differ: the source "
                             "folder changed since); delete it to start over.")

    return start_or_resume(output, MANIFEST, manifest, same_run, lambda: FileExistsError(
        f"{output} exists, is not empty and holds no {MANIFEST}: it is not a prepared folder to resume; choose an "
        "empty or new --output folder."
    ))


def _label_kind(by_split: dict[str, list[dict]]) -> str | None:
    """"float" (CheXpert values), "string" (IU MeSH/Problems) or None (the source has no labels)."""
    for rows in by_split.values():
        for row in rows:
            if row["labels"]:
                names = sorted(row["labels"])
                kind = "string" if any(isinstance(v, str) for v in row["labels"].values()) else "float"
                return json.dumps([kind, names])
    return None


def _features(options: PrepareOptions, label_kind: str | None):
    """The datasets.Features of the rows: fixed, so every shard has the same schema whatever its values."""
    import datasets

    string, integer = datasets.Value("string"), datasets.Value("int32")
    columns = {}
    image_columns = {"image": string, "image_id": string, "view_position": string, "source_image": string,
                     "width": integer, "height": integer}
    if options.unit == "image":
        columns.update(image_columns)
    elif options.text_only:
        columns["view_positions"] = datasets.List(string)
    else:
        plural = {"image": "images", "image_id": "image_ids", "view_position": "view_positions",
                  "source_image": "source_images", "width": "widths", "height": "heights"}
        columns.update({plural[name]: datasets.List(value) for name, value in image_columns.items()})
    for name in ("study_id", "patient_id", "findings", "impression", "report", "split"):
        columns[name] = string
    if label_kind is not None:
        kind, names = json.loads(label_kind)
        columns["labels"] = {name: datasets.Value("float64" if kind == "float" else "string") for name in names}
    return datasets.Features(columns)


def _write_parquet(rows: list[dict], features, path: Path) -> None:
    import datasets

    rows = [{name: row.get(name) for name in features} for row in rows]
    with datasets_progress_bars_off():  # one bar per shard would bury the image progress bar
        dataset = datasets.Dataset.from_list(rows, features=features)
        atomic_write(path, lambda temp: dataset.to_parquet(str(temp)))


def _shard_rows(rows: list[dict], results: list[tuple], options: PrepareOptions, problems: dict) -> list[dict]:
    """The rows of a shard with their image columns filled in from the image results (in image order)."""
    out, position = [], 0
    for row in rows:
        sources = [row["image_source"]] if options.unit == "image" else row["image_sources"]
        kept = {"image": [], "image_id": [], "view_position": [], "source_image": [], "width": [], "height": []}
        ids = [row["image_id"]] if options.unit == "image" else row["image_ids"]
        views = [row["view_position"]] if options.unit == "image" else row["view_positions"]
        for source, image_id, view in zip(sources, ids, views):
            result = results[position]
            position += 1
            if result[0] != "ok":
                problems.setdefault(result[0], []).append(result[1])
                continue
            prepared = source if options.image_size is None else _prepared_image_path(source, options.image_format)
            for key, value in zip(kept, (prepared, image_id, view, source, result[1], result[2])):
                kept[key].append(value)
        text = {
            key: row[key] for key in ("study_id", "patient_id", "findings", "impression", "report", "split", "labels")
        }
        if options.unit == "image":
            if kept["image"]:
                out.append({**{key: values[0] for key, values in kept.items()}, **text})
        elif kept["image"]:
            plural = {"image": "images", "image_id": "image_ids", "view_position": "view_positions",
                      "source_image": "source_images", "width": "widths", "height": "heights"}
            out.append({**{plural[key]: values for key, values in kept.items()}, **text})
        else:
            problems.setdefault("no_readable_image", []).append(row["study_id"])
    return out


def prepare(source, output, options: PrepareOptions | None = None, num_workers: int | None = None,
            progress: bool = True, wait: bool = True, on_wait=None) -> dict:
    """Read the corpus in `source`, filter and split it, check (and optionally resize) every image, and write
    the prepared dataset into `output`; resumes an interrupted run into the same folder.

    Args:
        source: the downloaded dataset folder.
        output: the prepared folder (new, empty, or an interrupted run with the same options).
        options: `PrepareOptions`.
        num_workers: image worker processes (default: all cores; 1 works in this process).
        progress: show a tqdm progress bar.
        wait: if another process is preparing into `output` (it holds `output_lock(output)`), wait for it;
            with False raise `OutputLockedError`.
        on_wait: called with the lock file before waiting.

    Returns:
        The summary (also written to `output/summary.json`).

    Raises:
        FileNotFoundError / ValueError: the folder matches no layout or lacks an expected file or column; the
            output folder was prepared with other options or from other files.
    """
    source_path, output_path = Path(source).resolve(), Path(output)
    target = output_path.resolve()
    if target == source_path or source_path in target.parents:
        raise InputError(f"--output {output} is (or lies inside) the source folder {source}; writing it would change "
                         "the source: choose an output folder outside it.")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(output_path, wait=wait, on_wait=on_wait):
        return _prepare(source, output, options, num_workers, progress)


def _prepare(source, output, options: PrepareOptions | None, num_workers: int | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    options = options or PrepareOptions()
    source, output = Path(source).resolve(), Path(output)
    read = read_corpus(options.layout, source, reports=options.reports, images=options.images,
                       split_source=None if options.split == "auto" else options.split)
    by_split, dropped, split_source = plan_rows(read, options)
    shards = _shard_plan(by_split, options.shard_size)
    manifest = _manifest(source, read, options, split_source, by_split, shards)
    _check_or_start(output, manifest)
    features = _features(options, _label_kind(by_split))
    remove_partial_writes(output)  # files a killed run was writing (finished ones are kept and reused)
    (output / "data").mkdir(exist_ok=True)
    (output / "shards").mkdir(exist_ok=True)
    todo = [shard for shard in shards if not (output / "shards" / f"{shard['name']}.json").is_file()]
    workers = num_workers or os.cpu_count() or 1
    pool = ProcessPoolExecutor(workers) if workers > 1 and not options.text_only else None
    total_images = sum(
        1 if options.unit == "image" else len(row["image_sources"])
        for shard in todo for row in by_split[shard["split"]][shard["start"] : shard["stop"]]
    ) if not options.text_only else 0
    bar = tqdm(total=total_images, unit="image", disable=not progress or options.text_only, desc="prepare")
    try:
        for shard in todo:
            rows = by_split[shard["split"]][shard["start"] : shard["stop"]]
            _prepare_shard(shard, rows, options, output, Path(read.image_root), features, pool, bar)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    summary = _summarise(output, manifest, shards, dropped, resumed_shards=len(shards) - len(todo))
    atomic_write_json(output / SUMMARY, summary, indent=2, sort_keys=True)
    return summary


def _manifest(source: Path, read: CorpusRead, options: PrepareOptions, split_source: str, by_split, shards) -> dict:
    """What makes the prepared folder (prepare.json): a resumed run must match it."""
    keep_images_in_place = options.image_size is None and not options.text_only
    return {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "layout": read.layout,
        "variant": read.variant,
        "image_root": str(Path(read.image_root).resolve()) if keep_images_in_place else ".",
        "options": asdict(options),
        "split_source": split_source,
        "has_patient_ids": read.has_patient_ids,
        "source_files": read.source_files,
        "shards": [shard["name"] for shard in shards],
        "plan_digest": _digest({"rows": by_split, "shards": shards}),
    }


def _prepare_shard(shard: dict, rows: list[dict], options: PrepareOptions, output: Path, image_root: Path, features,
                   pool, bar) -> None:
    """Check (and resize) the shard's images, then write its parquet file and, last, its commit mark."""
    problems: dict[str, list[str]] = {}
    if options.text_only:
        out = rows
    else:
        tasks = []
        for row in rows:
            for relative in [row["image_source"]] if options.unit == "image" else row["image_sources"]:
                destination = None
                if options.image_size is not None:
                    destination = str(output / _prepared_image_path(relative, options.image_format))
                tasks.append((str(image_root / relative), destination, options.image_size, options.image_format))
        mapped = pool.map(_process_image, tasks, chunksize=4) if pool else map(_process_image, tasks)
        results = []
        for result in mapped:
            results.append(result)
            bar.update(1)
        out = _shard_rows(rows, results, options, problems)
    if out:
        _write_parquet(out, features, output / "data" / f"{shard['name']}.parquet")
    atomic_write_json(output / "shards" / f"{shard['name']}.json",
                      {"rows": len(out), "planned": len(rows), "dropped": problems}, indent=2, sort_keys=True)


def _summarise(output: Path, manifest: dict, shards: list[dict], dropped: dict, resumed_shards: int) -> dict:
    rows = {split: 0 for split in SPLITS}
    dropped = {reason: list(items) for reason, items in dropped.items()}
    for shard in shards:
        record = json.loads((output / "shards" / f"{shard['name']}.json").read_text(encoding="utf-8"))
        rows[shard["split"]] += record["rows"]
        for reason, items in record["dropped"].items():
            dropped.setdefault(reason, []).extend(items)
    options = manifest["options"]
    return {
        "source": manifest["source"], "layout": manifest["layout"], "variant": manifest["variant"],
        "unit": options["unit"] if not options["text_only"] else "study (text only)",
        "split_source": manifest["split_source"], "rows": rows, "total_rows": sum(rows.values()),
        "dropped_counts": {reason: len(items) for reason, items in sorted(dropped.items())},
        "dropped": dict(sorted(dropped.items())),
        "images": ("none (text only)" if options["text_only"] else
                   f"checked in place under {manifest['image_root']}" if options["image_size"] is None else
                   f"resized to {options['image_size']} px ({options['image_format']}) into images/"),
        "shards": len(shards), "shards_reused": resumed_shards,
    }


def format_summary(summary: dict, output, examples: int = 5) -> str:
    """The summary as the text `llm2clip4cxr prepare` prints (the first `examples` items per drop reason)."""
    lines = [f"prepared {summary['layout']} ({summary['variant']}) from {summary['source']} into {output}",
             f"unit: {summary['unit']}; split: {summary['split_source']}; images: {summary['images']}",
             "rows: " + ", ".join(f"{split} {count}" for split, count in summary["rows"].items())
             + f" (total {summary['total_rows']})",
             f"shards: {summary['shards']} ({summary['shards_reused']} already complete, reused)"]
    if not summary["dropped_counts"]:
        lines.append("dropped: nothing")
    for reason, count in summary["dropped_counts"].items():
        lines.append(f"dropped {count} ({reason}):")
        items = summary["dropped"][reason]
        lines += [f"  {item}" for item in items[:examples]]
        if len(items) > examples:
            lines.append(f"  ... {len(items) - examples} more in {Path(output) / SUMMARY}")
    return "\n".join(lines)


def load_prepared(path, split: str = "train", streaming: bool = False, image_root=None):
    """A split of a folder written by `llm2clip4cxr prepare` as a `datasets.Dataset` (or, with
    `streaming=True`, an `IterableDataset` that reads the parquet shards lazily, for large corpora).

    Image paths (`image`, or `images` in per-study datasets) come back absolute: relative to the prepared
    folder for resized images, else to the source folder recorded at prepare time (`image_root` overrides
    it, e.g. after the source folder moved).

    Raises:
        FileNotFoundError: `path` is not a completely prepared folder.
        ValueError: the folder has no rows in `split` (the message lists the splits it has).
    """
    import datasets

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path}: not a prepared dataset folder (no {MANIFEST}); run `llm2clip4cxr prepare`.")
    if not (path / SUMMARY).is_file():
        raise FileNotFoundError(f"{path}: its prepare run did not finish (no {SUMMARY}); rerun the same "
                                "`llm2clip4cxr prepare` command to resume it.")
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    files = sorted(str(file) for file in (path / "data").glob(f"{split}-*.parquet"))
    if not files:
        rows = json.loads((path / SUMMARY).read_text(encoding="utf-8"))["rows"]
        raise ValueError(f"{path} has no rows in split {split!r}; its rows per split: {rows}.")
    dataset = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming)
    base = path.resolve() if manifest["image_root"] == "." else Path(manifest["image_root"])
    base = str(Path(image_root).resolve() if image_root is not None else base)
    if "image" in dataset.column_names:
        return dataset.map(lambda batch: {"image": [os.path.join(base, p) for p in batch["image"]]}, batched=True)
    if "images" in dataset.column_names:
        return dataset.map(
            lambda batch: {"images": [[os.path.join(base, p) for p in ps] for ps in batch["images"]]}, batched=True
        )
    return dataset
