"""`llm2clip4cxr eval`: the report tasks for the default model (or --model) and baselines on a report CSV;
writes results.json, results.md and recall.png."""

import json
from pathlib import Path

from ..evaluation.harness import TASKS
from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate encoders and baselines on a report CSV",
        description="Run the report tasks (findings->impression and paraphrase retrieval, error discrimination, "
        "zero-shot Problems labels) for the default model (or --model) and baselines; writes results.json, "
        "results.md and recall.png into --output-dir. Data format: see llm2clip4cxr.evaluation.tasks.",
        parents=[common.model_options(), common.HYBRID, common.JSON],  # --hybrid adds the model fused with BM25
    )
    parser.add_argument(
        "--csv", help="report CSV with uid, findings, impression[, Problems] (default: the Open-I reports)"
    )
    parser.add_argument("--output-dir", required=True, help="folder for results.json, results.md, recall.png")
    parser.add_argument("--no-model", action="store_true", help="evaluate only the baselines / --st-model models")
    parser.add_argument(
        "--baseline", nargs="*", choices=("tfidf", "bm25", "minilm"), default=[], help="baselines to add"
    )
    parser.add_argument(
        "--st-model", action="append", default=[], help="a sentence-transformers model folder (repeatable)"
    )
    parser.add_argument(
        "--clip-baseline", action="append", default=[],
        help="a local transformers CLIP/SigLIP folder or open_clip BiomedCLIP folder (has open_clip_config.json); "
        "its text tower is evaluated (repeatable)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run (default: all)")
    parser.add_argument("--limit", type=int, help="use only the first N studies of the CSV (quick runs)")
    parser.add_argument(
        "--held-out", action="store_true",
        help="only the 10%% of studies held out by study id (seed 0): on Open-I, those the default model never saw",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the paraphrases and error triplets (default: 0)")
    parser.add_argument("--triplets", help="a JSONL of anchor/positive/negative triplets for error discrimination")
    parser.add_argument("--label-prompts", help="a JSON object {Problems label: prompt} for zero-shot labels")
    parser.add_argument(
        "--ordering-suite", help="a JSONL clinical ordering suite (category, query, equivalent, different) to use "
        "instead of the one shipped in the package"
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..augment.triplets import load_triplets_jsonl
    from ..evaluation import harness, tasks

    csv_path, rows = _rows(args)
    label_prompts = None
    if args.label_prompts:
        label_prompts = json.loads(Path(args.label_prompts).read_text(encoding="utf-8"))
        if not isinstance(label_prompts, dict) or not all(isinstance(v, str) for v in label_prompts.values()):
            raise ValueError(f"--label-prompts {args.label_prompts}: expected a JSON object {{label: prompt}}.")
    triplets = load_triplets_jsonl(args.triplets) if args.triplets else None
    encoders = _encoders(args, rows)
    ordering_suite = tasks.load_clinical_ordering_suite(args.ordering_suite) if args.ordering_suite else None
    results = harness.run_evaluation(
        encoders, rows, tasks=args.tasks, seed=args.seed, triplets=triplets, label_prompts=label_prompts,
        ordering_suite=ordering_suite,
    )
    results["data"] = str(csv_path)
    paths = harness.write_results(results, args.output_dir)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(harness.results_markdown(results))
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    return common.EXIT_OK


def _rows(args) -> tuple[Path, list[dict]]:
    """The report CSV (--csv, else the Open-I reports) and its studies to evaluate (--held-out, --limit)."""
    from ..data.reports import read_reports_csv, split_by_study
    from ..defaults import shared_data_dir

    if args.limit is not None and args.limit < 1:  # before looking for the data: a usage mistake comes first
        raise ValueError(f"--limit must be a positive number of studies, got {args.limit}.")
    csv_path = Path(args.csv) if args.csv else shared_data_dir() / "openi" / "reports.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"--csv {csv_path}: no such file.")
    rows = read_reports_csv(csv_path)
    if args.held_out:
        rows = split_by_study(rows)[1]
    rows = rows[: args.limit]  # the first N studies, in file order
    if not rows:
        raise ValueError(f"{csv_path} has no study with findings or impression text.")
    return csv_path, rows


def _encoders(args, rows: list[dict]) -> dict:
    """{name: Encoder or Scorer} of the model (unless --no-model) and every baseline asked for."""
    from ..evaluation import baselines, harness

    encoders = {}
    if not args.no_model:
        model = common.load_text_encoder(args.model, getattr(args, "trust_remote_code", False))
        name = Path(args.model).name if args.model else "llm2vec4cxr-tiny (default)"
        # instruction None: the one the checkpoint was trained with (config.default_instruction).
        encoders[name] = common.text_encoder(model, args.instruction, args.batch_size)
        if args.hybrid:
            from ..retrieval.hybrid import HybridScorer, hybrid_name

            encoders[hybrid_name(name, args.fusion, args.fusion_weights)] = HybridScorer(
                encoders[name], method=args.fusion, weights=args.fusion_weights
            )
    for baseline in args.baseline:
        if baseline == "tfidf":  # fitted on the evaluated reports themselves (unsupervised, no labels)
            encoders["tfidf"] = baselines.tfidf_encoder([harness.report_text(row) for row in rows])
        elif baseline == "bm25":
            encoders["bm25"] = baselines.bm25_scorer()
        else:
            encoders["all-MiniLM-L6-v2"] = baselines.minilm_encoder(batch_size=args.batch_size)
    for path in args.st_model:
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"--st-model {path}: no such directory (give a saved sentence-transformers model)."
            )
        encoders[Path(path).name] = baselines.sentence_transformer_encoder(path, batch_size=args.batch_size)
    for path in args.clip_baseline:  # the text tower of a CLIP/SigLIP or open_clip (BiomedCLIP) folder
        encoders[Path(path).name] = common.quiet(baselines.load_dual_encoder, path, args.batch_size).encode_texts
    if not encoders:
        raise ValueError(
            "nothing to evaluate: --no-model was given without --baseline, --st-model or --clip-baseline."
        )
    return encoders
