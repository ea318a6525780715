"""Reproduce the default LLM2Vec4CXR text encoder shipped in the package, in one command:

    python training/make_default_text_encoder.py [--output-dir runs/default-text] [--install]

Steps, all on the Open-I reports in ../shared/data (research-only data, see its README):
  1. split the studies 90/10 by study id (seed 0): the 10% are never trained on;
  2. train a byte-level BPE tokenizer (4096 tokens) on the training reports;
  3. build a small Llama-style backbone (hidden 256, 4 layers, ~4.4M parameters) with mean pooling;
  4. MNTP on the training reports (full fine-tuning: the backbone starts from random weights);
  5. supervised contrastive training on report variants of the training reports (positives:
     abbreviations, sentence shuffle, boilerplate removal, findings <-> impression; hard negatives:
     laterality, negation, severity, size, change status, finding substitution);
  6. evaluate on the held-out studies against TF-IDF, all-MiniLM-L6-v2 and the untrained model, and
     write `results.json` and the model card.
`--install` copies the model into src/llm2clip4cxr/pretrained/text (what `default_model_path("text")`
returns). On 2 CPU cores the whole run takes roughly half an hour.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_text_encoder  # noqa: E402

from llm2clip4cxr import LLM2Vec4CXRModel  # noqa: E402
from llm2clip4cxr.data import read_reports_csv, shared_data_dir, split_by_study  # noqa: E402
from llm2clip4cxr.evaluation.report_tasks import (  # noqa: E402
    error_discrimination,
    findings_to_impression_retrieval,
    llm2vec_encoder,
    minilm_encoder,
    tfidf_encoder,
)
from llm2clip4cxr.factory import build_text_encoder  # noqa: E402
from llm2clip4cxr.report_variants import build_triplets  # noqa: E402
from llm2clip4cxr.tokenization import train_report_tokenizer  # noqa: E402

INSTRUCTION = "Retrieve reports with the same clinical findings"
SEED = 0
VALIDATION_FRACTION = 0.1
PACKAGE_TARGET = HERE.parent / "src" / "llm2clip4cxr" / "pretrained" / "text"


def report_text(row: dict) -> str:
    return " ".join(part for part in (row["findings"], row["impression"]) if part)


def evaluate(validation_rows: list[dict], train_rows: list[dict], models: dict) -> dict:
    """Both validation tasks for every encoder: the trained stages and the baselines."""
    triplets = build_triplets([report_text(row) for row in validation_rows], seed=SEED + 1)
    encoders = {
        "tfidf": tfidf_encoder([report_text(row) for row in train_rows]),
        "all-MiniLM-L6-v2": minilm_encoder(),
        **{name: llm2vec_encoder(model, instruction=INSTRUCTION) for name, model in models.items()},
    }
    results = {}
    for name, encoder in encoders.items():
        results[name] = {
            "findings_to_impression": findings_to_impression_retrieval(encoder, validation_rows),
            "error_discrimination": error_discrimination(encoder, triplets),
        }
        print(f"{name:>28}: findings->impression R@1 {results[name]['findings_to_impression']['recall@1']:.3f}"
              f"  error discrimination acc {results[name]['error_discrimination']['accuracy']:.3f}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/default-text")
    parser.add_argument("--mntp-steps", type=int, default=400)
    parser.add_argument("--contrastive-steps", type=int, default=300)
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    parser.add_argument("--resume", action="store_true", help="resume interrupted stages from their checkpoints")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    reports_csv = shared_data_dir() / "openi" / "reports.csv"
    started = time.time()

    rows = read_reports_csv(reports_csv)
    train_rows, validation_rows = split_by_study(rows, VALIDATION_FRACTION, SEED)
    print(f"{len(train_rows)} training and {len(validation_rows)} held-out studies")

    transformers.set_seed(SEED)
    tokenizer = train_report_tokenizer([report_text(row) for row in train_rows], vocab_size=4096)
    initial = build_text_encoder(
        tokenizer, pooling_mode="mean", max_seq_length=256, instructions={"findings": INSTRUCTION},
        backbone_kwargs={"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 768,
                         "max_position_embeddings": 512},
    )
    initial.save_pretrained(output / "init")

    common = ["--reports", str(reports_csv), "--validation_fraction", str(VALIDATION_FRACTION), "--seed", str(SEED),
              "--report_to", "none", "--logging_steps", "25", "--save_steps", "100", "--save_total_limit", "1",
              "--disable_tqdm", "true", "--resume", str(args.resume).lower()]
    mntp = train_text_encoder.main([
        "--stage", "mntp", "--model_name_or_path", str(output / "init"), "--output_dir", str(output / "mntp"),
        "--max_steps", str(args.mntp_steps), "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
        "--warmup_steps", "40", "--weight_decay", "0.01", *common,
    ])
    contrastive = train_text_encoder.main([
        "--stage", "contrastive", "--model_name_or_path", mntp, "--output_dir", str(output / "contrastive"),
        "--max_steps", str(args.contrastive_steps), "--per_device_train_batch_size", "32", "--learning_rate", "3e-4",
        "--warmup_steps", "30", "--instruction", INSTRUCTION, *common,
    ])

    models = {
        "untrained (same architecture)": LLM2Vec4CXRModel.from_pretrained(output / "init"),
        "MNTP only": LLM2Vec4CXRModel.from_pretrained(mntp),
        "LLM2Vec4CXR-tiny (default)": LLM2Vec4CXRModel.from_pretrained(contrastive),
    }
    results = evaluate(validation_rows, train_rows, models)
    summary = {
        "data": {"source": "openi/reports.csv under ../shared/data (or $LLM2CLIP4CXR_DATA)", "train_studies": len(train_rows), "validation_studies": len(validation_rows),
                 "split": f"{VALIDATION_FRACTION:.0%} of studies held out, seed {SEED}"},
        "training": {"mntp_steps": args.mntp_steps, "contrastive_steps": args.contrastive_steps, "batch_size": 32,
                     "instruction": INSTRUCTION, "minutes": round((time.time() - started) / 60, 1)},
        "results": results,
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2))
    if args.install:
        from llm2clip4cxr.hub_card import write_text_model_card

        shutil.rmtree(PACKAGE_TARGET, ignore_errors=True)
        models["LLM2Vec4CXR-tiny (default)"].save_pretrained(PACKAGE_TARGET)
        shutil.copy(output / "results.json", PACKAGE_TARGET / "results.json")
        write_text_model_card(PACKAGE_TARGET, summary)
        print(f"installed the default text encoder in {PACKAGE_TARGET}")
    return summary


if __name__ == "__main__":
    main()
