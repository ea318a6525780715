"""Train variants of the default text encoder side by side on one machine (a lent GPU) and choose one on the
development studies, never on the reported held-out split:

    python training/sweep_default_text_encoder.py --output-dir runs/sweep \\
        --variant scaled "--batch-size 512 --mntp-batch-size 64" \\
        --variant wide "--hidden-size 384 --num-layers 5 --intermediate-size 1024 --batch-size 512" \\
        --common "--mntp-minutes 1.5 --contrastive-minutes 4.5 --mntp-steps 100000 --contrastive-steps 100000"

Each variant is trained twice at the same time by make_default_text_encoder.py: with --held-out-fraction 0.2 (the
development twin) and with the default 0.1 (the model that may ship). Each twin is scored on the development
studies (its hold-out minus the reported split: tune_fusion.development_studies) and on the clinical ordering
suite. The variant with the highest mean of strict findings->impression R@1, unique-impression R@1 and ordering
accuracy is chosen; the criterion is fixed here, before any run. sweep.json records every score and the choice.
Evaluate the chosen 0.1 model on the held-out split with make_default_text_encoder.py --evaluate-only.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tune_fusion import development_studies  # noqa: E402

from llm2clip4cxr import LLM2Vec4CXRModel  # noqa: E402
from llm2clip4cxr.data import read_reports_csv  # noqa: E402
from llm2clip4cxr.defaults import shared_data_dir  # noqa: E402
from llm2clip4cxr.evaluation.tasks import (  # noqa: E402
    clinical_ordering,
    findings_to_impression_retrieval,
    load_clinical_ordering_suite,
)
from llm2clip4cxr.fileio import atomic_write_json  # noqa: E402
from llm2clip4cxr.retrieval.encoders import llm2vec_encoder  # noqa: E402

TWIN_FRACTION = 0.2
CRITERION = "mean of development strict F->I R@1, development unique-impression R@1 and clinical ordering accuracy"


def development_scores(model_dir: Path, studies, suite) -> dict:
    encoder = llm2vec_encoder(LLM2Vec4CXRModel.from_pretrained(model_dir).eval())
    retrieval = findings_to_impression_retrieval(encoder, studies)
    ordering = clinical_ordering(encoder, suite)
    scores = {"strict_recall@1": retrieval["recall@1"],
              "unique_recall@1": retrieval["unique_impressions"]["recall@1"],
              "ordering_accuracy": ordering["accuracy"],
              "ordering_by_category": {name: row["accuracy"] for name, row in ordering["per_category"].items()},
              "queries": retrieval["num_queries"]}
    scores["criterion"] = (scores["strict_recall@1"] + scores["unique_recall@1"] + scores["ordering_accuracy"]) / 3
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "FLAGS"), required=True,
                        help="a name and its make_default_text_encoder.py flags (repeat for each variant)")
    parser.add_argument("--common", default="", help="flags every run gets")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="stop runs still going after this long (they count as failed)")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in args.variant]
    if len(set(names)) != len(names) or not all(name.replace("-", "").isalnum() for name in names):
        parser.error(f"variant names must be distinct letters, digits and '-', got {names}")

    runs = {}  # (variant, role) -> (process, run folder, open log file)
    threads = str(max(1, (os.cpu_count() or 2) // (2 * len(names))))
    started = time.monotonic()
    for name, flags in args.variant:
        for role, fraction in (("twin", TWIN_FRACTION), ("final", 0.1)):
            folder = output / f"{name}-{role}"
            command = [sys.executable, str(HERE / "make_default_text_encoder.py"), "--output-dir", str(folder),
                       "--skip-evaluation", "--held-out-fraction", str(fraction),
                       *shlex.split(args.common), *shlex.split(flags)]
            log = open(output / f"{name}-{role}.log", "w")  # noqa: SIM115 (closed with the process)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": threads})
            runs[name, role] = (process, folder, log)
            print(f"started {name}-{role}: {shlex.join(command)}", flush=True)
    for (name, role), (process, _, log) in runs.items():
        remaining = None
        if args.deadline_minutes is not None:
            remaining = max(1.0, args.deadline_minutes * 60 - (time.monotonic() - started))
        try:
            process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        print(f"{name}-{role} ended with exit code {process.returncode} after "
              f"{(time.monotonic() - started) / 60:.1f} min", flush=True)

    rows = read_reports_csv(shared_data_dir() / "openi" / "reports.csv")
    studies, suite = development_studies(rows, TWIN_FRACTION), load_clinical_ordering_suite()
    results = {"criterion": CRITERION, "common_flags": args.common, "development_studies": len(studies),
               "minutes": round((time.monotonic() - started) / 60, 1), "variants": {}}
    for name, flags in args.variant:
        entry = {"flags": flags}
        for role in ("twin", "final"):
            process, folder, _ = runs[name, role]
            model_dir = folder / "contrastive" / "model"
            entry[role] = {"exit_code": process.returncode, "model": str(model_dir) if model_dir.is_dir() else None}
            if (folder / "training.json").is_file():
                entry[role]["training"] = json.loads((folder / "training.json").read_text())
        if entry["twin"]["model"] and entry["twin"]["exit_code"] == 0:
            entry["development"] = development_scores(Path(entry["twin"]["model"]), studies, suite)
            print(f"{name}: {json.dumps(entry['development'])}", flush=True)
        results["variants"][name] = entry
    scored = {name: entry["development"]["criterion"] for name, entry in results["variants"].items()
              if "development" in entry and entry["final"]["exit_code"] == 0}
    results["chosen"] = max(scored, key=scored.get) if scored else None
    atomic_write_json(output / "sweep.json", results, indent=2)
    print(f"chosen: {results['chosen']} (by the {CRITERION}); written to {output / 'sweep.json'}", flush=True)
    return 0 if results["chosen"] else 1


if __name__ == "__main__":
    sys.exit(main())
