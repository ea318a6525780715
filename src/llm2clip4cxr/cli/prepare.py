"""`llm2clip4cxr prepare LAYOUT SOURCE --output DIR`: a downloaded corpus folder -> a prepared dataset."""

import json

from ..data.corpora import LAYOUTS
from ..data.prepare import SECTION_REQUIREMENTS
from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "prepare", help="turn a downloaded MIMIC-CXR-JPG / CheXpert Plus / IU X-ray folder into a training dataset",
        description="Read a downloaded corpus folder, parse report sections, filter, split (official split, else "
        "by patient), check every image (optionally resizing it once) and write parquet shards plus "
        "summary.json to --output. Rerunning the same command after an interruption resumes it. "
        "Load the result with llm2clip4cxr.data.load_prepared or pass it as --data to the training recipes.",
        parents=[common.NO_WAIT, common.JSON],
    )
    parser.add_argument("layout", choices=(*sorted(LAYOUTS), "auto"), help="the corpus layout (auto: detect it)")
    parser.add_argument("source", help="the downloaded dataset folder")
    parser.add_argument("--output", required=True, help="the prepared folder to write (or resume)")
    parser.add_argument(
        "--reports", help="mimic-cxr-jpg: the MIMIC-CXR reports `files/` folder (default: SOURCE/files)"
    )
    parser.add_argument("--images", help="chexpert-plus: the folder path_to_image is relative to (default: found)")
    parser.add_argument("--unit", choices=("image", "study"), default="image",
                        help="one row per image (default) or per study with its images in lists")
    parser.add_argument("--frontal-only", action="store_true", help="keep only frontal (PA/AP) images")
    parser.add_argument("--require-section", choices=SECTION_REQUIREMENTS, default="any",
                        help="drop rows without this report section (any: findings or impression; default)")
    parser.add_argument("--split", choices=("auto", "official", "patient"), default="auto",
                        help="official split, seeded patient-level split, or auto (official where the source has one)")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1, help="patient split: share of patients (0.1)"
    )
    parser.add_argument("--test-fraction", type=float, default=0.1, help="patient split: share of patients (0.1)")
    parser.add_argument("--seed", type=int, default=0, help="patient split seed (0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images once so the longer side is this many pixels (aspect kept); "
                        "default: keep the source files in place (still checked)")
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="format of resized images")
    parser.add_argument("--text-only", action="store_true",
                        help="reports only (for text-encoder training): one row per study, images not read")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per parquet shard (the unit of resuming)")
    parser.add_argument("--num-workers", type=int, default=None, help="image worker processes (default: all cores)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..data.prepare import PrepareOptions, format_summary, prepare

    if args.text_only and args.unit == "image":
        args.unit = "study"  # text-only rows are studies; --unit image is the default, not a request here
    options = PrepareOptions(
        layout=args.layout, reports=args.reports, images=args.images, unit=args.unit, frontal_only=args.frontal_only,
        require_section=args.require_section, split=args.split, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, seed=args.seed, image_size=args.image_size, image_format=args.image_format,
        text_only=args.text_only, shard_size=args.shard_size,
    )
    if args.num_workers is not None and args.num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {args.num_workers}.")
    summary = prepare(args.source, args.output, options, num_workers=args.num_workers, progress=not args.json,
                      wait=not args.no_wait, on_wait=common.waiting_message(args))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary, args.output))
    return common.EXIT_OK
