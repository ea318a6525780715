"""Reproduce the default LLM2Vec4CXR text encoder shipped in the package, in one command:

    python training/make_default_text_encoder.py [--output-dir runs/default-text] [--install]

Steps, all on the Open-I reports in ../shared/data (research-only data, see its README):
  1. split the studies 90/10 by study id (seed 0): the 10% are never trained on;
  2. train a byte-level BPE tokenizer (4096 tokens) on the training reports and on synthetic report text;
  3. build a small Llama-style backbone (hidden 256, 4 layers, ~4.4M parameters) with mean pooling;
  4. MNTP on the training reports (full fine-tuning: the backbone starts from random weights);
  5. supervised contrastive training (sentence-transformers trainer, in-batch negatives, no duplicate
     texts in a batch, the three datasets in turn) on: the findings<->impression pairs of each training study,
     rule-based variant triplets of the training reports (TRAIN families: abbreviations, shuffle,
     boilerplate removal; laterality, negation, severity, size, change-status and finding errors), and
     compositional synthetic triplets (`llm2clip4cxr.augment.synthetic`); with --equivalent-studies also pairs
     of different training studies with identical MeSH label sets (not in the shipped default: see
     docs/evaluation.md);
  6. evaluate on the held-out studies with the evaluation harness (held-out variant families, the
     hand-written clinical ordering suite) next to TF-IDF, BM25, all-MiniLM-L6-v2 and the hybrid, and write
     `results.json` and the model card.
`--install` copies the model into src/llm2clip4cxr/pretrained/text (what `default_model_path("text")`
returns). On 2 CPU cores the defaults take a few hours; `--mntp-steps`/`--contrastive-steps` shorten it.
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_text_encoder  # noqa: E402

from llm2clip4cxr import LLM2Vec4CXRModel  # noqa: E402
from llm2clip4cxr.augment.synthetic import FAMILY as SYNTHETIC_FAMILY  # noqa: E402
from llm2clip4cxr.augment.synthetic import build_synthetic_triplets  # noqa: E402
from llm2clip4cxr.augment.variants import NEGATIVE_GENERATORS, POSITIVE_GENERATORS  # noqa: E402
from llm2clip4cxr.checkpoints import store_weights_in_half_precision  # noqa: E402
from llm2clip4cxr.data import read_reports_csv, split_by_study  # noqa: E402
from llm2clip4cxr.defaults import shared_data_dir  # noqa: E402
from llm2clip4cxr.evaluation import baselines, harness  # noqa: E402
from llm2clip4cxr.fileio import atomic_write_json  # noqa: E402
from llm2clip4cxr.retrieval.encoders import llm2vec_encoder  # noqa: E402
from llm2clip4cxr.retrieval.hybrid import HybridScorer, hybrid_name  # noqa: E402
from llm2clip4cxr.training.factory import build_text_encoder  # noqa: E402
from llm2clip4cxr.training.tokenization import train_report_tokenizer  # noqa: E402

INSTRUCTION = "Retrieve reports with the same clinical findings"
INSTRUCTION_NAME = "retrieval"
MODEL_NAME = "LLM2Vec4CXR-tiny (default)"
EQUIVALENT_STUDIES_MODEL_NAME = "LLM2Vec4CXR-tiny (+ equivalent studies)"
SEED = 0
VALIDATION_FRACTION = 0.1
PACKAGE_TARGET = HERE.parent / "src" / "llm2clip4cxr" / "pretrained" / "text"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/default-text")
    parser.add_argument("--mntp-steps", type=int, default=1000)
    parser.add_argument("--mntp-batch-size", type=int, default=32, help="MNTP reports per step")
    parser.add_argument("--contrastive-steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128, help="contrastive rows per step")
    parser.add_argument("--mntp-minutes", type=float, default=None,
                        help="train MNTP for this wall-clock time (the rate decays with the time spent; "
                        "--mntp-steps only caps it): for a machine of unknown speed, such as a shared GPU")
    parser.add_argument("--contrastive-minutes", type=float, default=None,
                        help="the same for the contrastive stage (--contrastive-steps caps it)")
    parser.add_argument("--bucket-rows", type=int, default=32,
                        help="contrastive rows per length-sorted forward pass: small saves padding on a CPU, large "
                        "saves kernel launches on a GPU (256 there)")
    parser.add_argument("--dataloader-workers", type=int, default=0,
                        help="processes that tokenize the next batches while the model trains: on a GPU the "
                        "contrastive stage otherwise waits on tokenizing (8 there)")
    parser.add_argument("--hidden-size", type=int, default=256, help="backbone width (heads of 64 dimensions)")
    parser.add_argument("--num-layers", type=int, default=4, help="backbone layers")
    parser.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: 3 x --hidden-size)")
    parser.add_argument("--variants-per-report", type=int, default=4)
    parser.add_argument("--synthetic-triplets", type=int, default=12000)
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="end the contrastive stage at this step (its schedule still spans --contrastive-steps)")
    parser.add_argument("--save-steps", type=int, default=100, help="checkpoint interval of both stages (resuming)")
    parser.add_argument("--evaluate-only", metavar="MODEL_DIR",
                        help="skip training: evaluate (and with --install, ship) an already trained model; the "
                        "run's training.json, two folders up, describes its training in the results")
    parser.add_argument("--training-minutes", type=float, default=None,
                        help="with --evaluate-only and no training.json: the training's wall time, for the card")
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    parser.add_argument("--half-precision-weights", action="store_true",
                        help="evaluate and ship the weights rounded to float16 (half the size; it still loads as "
                        "float32)")
    parser.add_argument("--held-out-fraction", type=float, default=VALIDATION_FRACTION,
                        help="studies never trained on (seeded; a larger fraction holds out a superset). 0.2 trains "
                        "the development twin of training/tune_fusion.py")
    parser.add_argument("--equivalent-studies", action="store_true",
                        help="also train pairs of different studies with identical MeSH label sets as positives "
                        "(train_text_encoder.py --equivalent_studies; an experiment, off in the shipped default)")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="training seed (weights, masking, variants, batches); the split and the tokenizer keep "
                        f"seed {SEED}, so runs of several seeds share the held-out studies")
    parser.add_argument("--skip-evaluation", action="store_true", help="train only (the twin is evaluated elsewhere)")
    parser.add_argument("--resume", action="store_true", help="resume interrupted stages from their checkpoints")
    return parser


# Flags that say where or how a run happens, not what it trains: left out of the recorded command.
_NOT_RECORDED = {"help", "output_dir", "evaluate_only", "training_minutes", "skip_evaluation", "resume"}


def recipe_command(args) -> str:
    """The command that trains this model again: every training flag that differs from its default."""
    words = ["python training/make_default_text_encoder.py"]
    for action in build_parser()._actions:
        value = getattr(args, action.dest, None)
        if action.dest in _NOT_RECORDED or value == action.default:
            continue
        words.append(action.option_strings[-1] if value is True else f"{action.option_strings[-1]} {value}")
    return " ".join(words)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.hidden_size % 64:
        parser.error(
            f"--hidden-size must be a multiple of 64 (attention heads of 64 dimensions), got {args.hidden_size}."
        )
    output = Path(args.output_dir)
    reports_csv = shared_data_dir() / "openi" / "reports.csv"
    started = time.time()

    rows = read_reports_csv(reports_csv)
    if args.install and args.held_out_fraction != VALIDATION_FRACTION:
        parser.error(f"--install ships the model trained with --held-out-fraction {VALIDATION_FRACTION} only.")
    train_rows, validation_rows = split_by_study(rows, args.held_out_fraction, SEED)
    print(f"{len(train_rows)} training and {len(validation_rows)} held-out studies", flush=True)

    if args.evaluate_only:
        return evaluate_and_install(
            Path(args.evaluate_only), args, train_rows, validation_rows, output, minutes=args.training_minutes
        )
    transformers.set_seed(args.seed)
    train_texts = [harness.report_text(row) for row in train_rows]
    # Synthetic text gives device and finding words their own tokens; its seed is fixed (not --seed), so every
    # training seed gets the same tokenizer and runs of several seeds stay comparable.
    synthetic_texts = [
        t[role] for t in build_synthetic_triplets(3000, seed=SEED + 99) for role in ("anchor", "positive")
    ]
    tokenizer = train_report_tokenizer(train_texts + synthetic_texts, vocab_size=4096)
    if not (output / "init" / "config.json").is_file() or not args.resume:
        initial = build_text_encoder(
            tokenizer, pooling_mode="mean", max_seq_length=256, instructions={INSTRUCTION_NAME: INSTRUCTION},
            default_instruction_name=INSTRUCTION_NAME,
            backbone_kwargs=backbone_kwargs(args),
        )
        initial.save_pretrained(output / "init")

    common = common_stage_flags(args, reports_csv)
    mntp = train_text_encoder.main([
        "--stage", "mntp", "--model_name_or_path", str(output / "init"), "--output_dir", str(output / "mntp"),
        "--max_steps", str(args.mntp_steps), "--per_device_train_batch_size", str(args.mntp_batch_size),
        "--learning_rate", "1e-3", "--warmup_steps", "50", "--weight_decay", "0.01",
        "--train_sampling_strategy", "group_by_length",
        *(["--time_budget_minutes", str(args.mntp_minutes)] if args.mntp_minutes else []), *common,
    ])
    contrastive = train_text_encoder.main([
        "--stage", "contrastive", "--model_name_or_path", mntp, "--output_dir", str(output / "contrastive"),
        "--max_steps", str(args.contrastive_steps), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", "3e-4", "--warmup_steps", "60", "--weight_decay", "0.01",
        "--batch_sampler", "no_duplicates", "--multi_dataset_batch_sampler", "round_robin",
        "--instruction", INSTRUCTION, "--instruction_name", INSTRUCTION_NAME,
        "--bucket_rows", str(args.bucket_rows), "--variants_per_report", str(args.variants_per_report),
        "--synthetic_triplets", str(args.synthetic_triplets),
        "--equivalent_studies", str(args.equivalent_studies).lower(),
        *(["--stop_after_steps", str(args.stop_after_steps)] if args.stop_after_steps else []),
        *(["--time_budget_minutes", str(args.contrastive_minutes)] if args.contrastive_minutes else []), *common,
    ])
    minutes = round((time.time() - started) / 60, 1)
    atomic_write_json(output / "training.json", training_record(args, minutes, output), indent=2)
    if args.skip_evaluation:
        print(f"trained {contrastive} in {minutes} min", flush=True)
        return contrastive
    return evaluate_and_install(Path(contrastive), args, train_rows, validation_rows, output, minutes)


def common_stage_flags(args, reports_csv) -> list[str]:
    """The train_text_encoder.py flags both stages share: data, split, seeds, checkpoints, workers, device."""
    return ["--reports", str(reports_csv), "--validation_fraction", str(args.held_out_fraction),
            "--seed", str(args.seed), "--split_seed", str(SEED), "--report_to", "none", "--logging_steps", "50",
            "--save_steps", str(args.save_steps), "--save_total_limit", "1",
            "--dataloader_num_workers", str(args.dataloader_workers),
            # The round-robin epoch ends with the smallest dataset (the findings/impression pairs: ~20 steps), and
            # each epoch would start its workers again.
            *(["--dataloader_persistent_workers", "true"] if args.dataloader_workers else []),
            "--disable_tqdm", "true", "--resume", str(args.resume).lower(), "--use_cpu",
            str(not torch.cuda.is_available()).lower(), "--bf16", "true", "--eval_strategy", "no"]


def backbone_kwargs(args) -> dict:
    heads = args.hidden_size // 64
    return {"hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": heads, "num_kv_heads": heads,
            "intermediate_size": args.intermediate_size or 3 * args.hidden_size, "max_position_embeddings": 512}


def steps_reached(stage_dir: Path, planned: int) -> int:
    """The steps a stage trained: what its train_summary.json says (a time budget ends it early), else planned."""
    summary = stage_dir / "train_summary.json"
    return json.loads(summary.read_text())["global_step"] if summary.is_file() else planned


def training_record(args, minutes, output: Path | None = None) -> dict:
    """How the model was trained, for results.json and the model card."""
    contrastive_steps = args.stop_after_steps or args.contrastive_steps
    return {
        "mntp_steps": steps_reached(output / "mntp", args.mntp_steps) if output else args.mntp_steps,
        "mntp_batch_size": args.mntp_batch_size,
        "contrastive_steps": steps_reached(output / "contrastive", contrastive_steps) if output else contrastive_steps,
        "contrastive_schedule_steps": args.contrastive_steps, "batch_size": args.batch_size,
        "bucket_rows": args.bucket_rows,
        "time_budget_minutes": {"mntp": args.mntp_minutes, "contrastive": args.contrastive_minutes},
        "backbone": backbone_kwargs(args),
        "variants_per_report": args.variants_per_report, "synthetic_triplets": args.synthetic_triplets,
        "instruction": INSTRUCTION, "seed": args.seed, "split_seed": SEED, "minutes": minutes,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "families": [*POSITIVE_GENERATORS, *NEGATIVE_GENERATORS, "findings_impression", SYNTHETIC_FAMILY,
                     *(["equivalent_studies"] if args.equivalent_studies else [])],
        "command": recipe_command(args),
    }


def evaluate_and_install(model_dir: Path, args, train_rows, validation_rows, output: Path, minutes):
    """The harness on the held-out studies next to the baselines; results.json; with --install, the shipped copy."""
    output.mkdir(parents=True, exist_ok=True)
    model = LLM2Vec4CXRModel.from_pretrained(model_dir).eval()
    if args.half_precision_weights:  # evaluate exactly the values that --install stores
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
    dense = llm2vec_encoder(model)  # the trained instruction is the model's default
    model_name = EQUIVALENT_STUDIES_MODEL_NAME if args.equivalent_studies else MODEL_NAME
    encoders = {
        "tfidf": baselines.tfidf_encoder([harness.report_text(row) for row in validation_rows]),
        "bm25": baselines.bm25_scorer(),
        "all-MiniLM-L6-v2": baselines.minilm_encoder(),
        model_name: dense,
        hybrid_name(model_name): HybridScorer(dense),  # the default fusion and weights
    }
    results = harness.run_evaluation(encoders, validation_rows, seed=SEED)
    results["data"] = {
        "source": "openi/reports.csv under ../shared/data (or $LLM2CLIP4CXR_DATA)",
        "train_studies": len(train_rows), "validation_studies": len(validation_rows),
        "split": f"{args.held_out_fraction:.0%} of studies held out, seed {SEED}",
    }
    # A run trained elsewhere (a GPU) brings its training.json; else the flags describe the training.
    trained = model_dir.parent.parent / "training.json"
    results["training"] = (json.loads(trained.read_text()) if trained.is_file()
                           else training_record(args, minutes))
    results["training"]["parameters"] = sum(parameter.numel() for parameter in model.parameters())
    results["training"]["stored_weights"] = "float16" if args.half_precision_weights else "float32"
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(harness.results_markdown(results), flush=True)
    if args.install:
        from llm2clip4cxr.hub.cards import write_text_model_card

        shutil.rmtree(PACKAGE_TARGET, ignore_errors=True)
        model.save_pretrained(PACKAGE_TARGET)
        if args.half_precision_weights:
            store_weights_in_half_precision(PACKAGE_TARGET)
        shutil.copy(output / "results.json", PACKAGE_TARGET / "results.json")
        write_text_model_card(PACKAGE_TARGET, results, model_name=model_name)
        print(f"installed the default text encoder in {PACKAGE_TARGET}")
    return results


if __name__ == "__main__":
    main()
