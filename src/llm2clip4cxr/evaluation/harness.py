"""Run the report tasks of `tasks` for several models and write the results.

    results = run_evaluation({"default": llm2vec_encoder(model), "bm25": bm25_scorer()}, rows, seed=0)
    write_results(results, "runs/eval")  # results.json, results.md, recall.png

`rows` are report-CSV rows (see the `tasks` docstring for the format), e.g. from
`data.read_reports_csv`. Everything random (paraphrases, error triplets) is drawn from `seed`, and the
results hold no timings, so the same models, rows and seed give an identical results.json.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..fileio import atomic_write, atomic_write_json, atomic_write_text
from .tasks import (
    Model,
    clinical_ordering,
    embedding_spread,
    error_discrimination,
    findings_to_impression_retrieval,
    load_clinical_ordering_suite,
    paraphrase_retrieval,
    parse_problems,
    zero_shot_label_auroc,
)

TASKS = (
    "findings_to_impression", "paraphrase", "error_discrimination", "clinical_ordering", "embedding_spread",
    "zero_shot_labels",
)
RETRIEVAL_TASKS = ("findings_to_impression", "paraphrase")
RECALL_KS = (1, 5, 10)
# Columns of results.md: (task, metric key, header).
_TABLE_COLUMNS = (
    ("findings_to_impression", "recall@1", "F→I R@1 (strict)"),
    ("findings_to_impression", "recall@10", "F→I R@10 (strict)"),
    ("findings_to_impression", "mrr", "F→I MRR (strict)"),
    ("findings_to_impression", "unique_impressions.recall@1", "F→I R@1 (unique impressions)"),
    ("findings_to_impression", "count_as_relevant.recall@1", "F→I R@1 (duplicates as hits)"),
    ("paraphrase", "recall@1", "Para R@1"),
    ("paraphrase", "mrr", "Para MRR"),
    ("error_discrimination", "macro_accuracy", "Error acc (macro)"),
    ("clinical_ordering", "accuracy", "Clinical ordering"),
    ("embedding_spread", "mean_pairwise_cosine", "Mean cos"),
    ("zero_shot_labels", "macro_auroc", "Zero-shot AUROC"),
)
RESULT_FILES = ("results.json", "results.md", "recall.png")


def report_text(row: Mapping[str, str]) -> str:
    """Findings and impression of a report-CSV row, joined."""
    return " ".join(
        part for part in ((row.get("findings") or "").strip(), (row.get("impression") or "").strip()) if part
    )


def run_evaluation(
    encoders: Mapping[str, Model],
    data: Sequence[Mapping[str, str]],
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    *,
    triplets: Sequence[dict] | None = None,
    label_prompts: Mapping[str, str] | None = None,
    ordering_suite: Sequence[dict] | None = None,
) -> dict:
    """Score every model on every task.

    Args:
        encoders: name -> Encoder or Scorer (see `tasks`).
        data: report rows with `uid`, `findings`, `impression` and, for "zero_shot_labels", `Problems`.
        tasks: a subset of `TASKS`, run in the given order.
        seed: seeds the paraphrases, the generated error triplets and the embedding-spread sample.
        triplets: error-discrimination triplets to use instead of generating them from `data`.
        label_prompts: label -> prompt for "zero_shot_labels" (default `DEFAULT_LABEL_PROMPTS`).
        ordering_suite: rows of a clinical ordering suite (default: the one shipped in the package).

    Returns:
        `{"seed", "num_studies", "tasks", "variant_families", "models": {name: {task: metrics}}}`,
        JSON-serialisable. `variant_families` names the generator families the paraphrase and error tasks
        were built with (held-out, evaluation-only) and the training families they exclude.
    """
    tasks = list(tasks)
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty subset of {TASKS}, got {tasks!r}.")
    if not encoders:
        raise ValueError("`encoders` is empty; give at least one {name: model}.")
    rows = [row for row in data if report_text(row)]
    if not rows:
        raise ValueError("No report has findings or impression text; nothing to evaluate.")
    reports = {str(row["uid"]): report_text(row) for row in rows}
    if len(reports) != len(rows):
        raise ValueError("Study `uid`s must be unique.")

    from ..augment.variants import TRAINING_FAMILIES
    from .heldout_variants import HELDOUT_NEGATIVE_FAMILIES, HELDOUT_POSITIVE_FAMILIES

    inputs = _task_inputs(tasks, rows, seed, triplets, ordering_suite)
    run = _task_runners(rows, reports, inputs, seed, label_prompts)
    models = {name: {task: run[task](model) for task in tasks} for name, model in encoders.items()}
    families = {
        "evaluation": {"positive": sorted(HELDOUT_POSITIVE_FAMILIES),
                       "negative": sorted(inputs.get("error_discrimination", HELDOUT_NEGATIVE_FAMILIES))},
        "training_families_not_used_here": list(TRAINING_FAMILIES),
    }
    return {"seed": seed, "num_studies": len(rows), "tasks": tasks, "variant_families": families, "models": models}


def _task_inputs(tasks: list[str], rows: list, seed: int, triplets, ordering_suite) -> dict:
    """What the tasks score models on, built once so that every model sees exactly the same queries."""
    from .heldout_variants import HELDOUT_NEGATIVE_FAMILIES, build_heldout_triplets

    inputs = {}
    if "error_discrimination" in tasks:
        if triplets is not None:
            inputs["error_discrimination"] = {"given": list(triplets)}
        else:  # one triplet set per held-out negative family, so no family dominates the average
            texts = [report_text(row) for row in rows]
            inputs["error_discrimination"] = {
                family: built
                for family in HELDOUT_NEGATIVE_FAMILIES
                if (built := build_heldout_triplets(texts, seed=seed, negative_kinds=[family]))
            }
    if "clinical_ordering" in tasks:
        inputs["clinical_ordering"] = (
            list(ordering_suite) if ordering_suite is not None else load_clinical_ordering_suite()
        )
    if "zero_shot_labels" in tasks:
        missing = next((row["uid"] for row in rows if "Problems" not in row), None)
        if missing is not None:
            raise ValueError(f"Task 'zero_shot_labels' needs a `Problems` column; study {missing!r} has none.")
        inputs["zero_shot_labels"] = {str(row["uid"]): parse_problems(row["Problems"]) for row in rows}
    return inputs


def _task_runners(rows: list, reports: dict, inputs: dict, seed: int, label_prompts) -> dict:
    """{task: model -> its metrics}."""

    def findings_to_impression(model):
        return findings_to_impression_retrieval(
            model, rows, duplicate_rule="collapse", ks=RECALL_KS, also_rules=("count_as_relevant",)
        )

    def errors(model):
        per_family = {
            family: error_discrimination(model, built) for family, built in inputs["error_discrimination"].items()
        }
        return {
            "macro_accuracy": float(sum(r["accuracy"] for r in per_family.values()) / len(per_family)),
            "chance": 0.5,
            "per_family": per_family,
        }

    return {
        "findings_to_impression": findings_to_impression,
        "paraphrase": lambda model: paraphrase_retrieval(model, reports, seed=seed, ks=RECALL_KS),
        "error_discrimination": errors,
        "clinical_ordering": lambda model: clinical_ordering(model, inputs["clinical_ordering"]),
        "embedding_spread": lambda model: embedding_spread(model, list(reports.values()), rows, seed=seed),
        "zero_shot_labels": lambda model: zero_shot_label_auroc(
            model, reports, inputs["zero_shot_labels"], label_prompts
        ),
    }


def _cell(metrics: Mapping, task: str, dotted_key: str) -> str:
    """A table cell: the metric at `dotted_key` of `task`, or "–" where it does not apply (BM25 has no space)."""
    value = metrics.get(task)
    for part in dotted_key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "–" if value is None else f"{value:.3f}"


def results_markdown(results: Mapping) -> str:
    """A Markdown table: one row per model, the headline metric of each task that was run."""
    columns = [column for column in _TABLE_COLUMNS if column[0] in results["tasks"]]
    lines = [
        "| model | " + " | ".join(header for _, _, header in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, metrics in results["models"].items():
        cells = [_cell(metrics, task, key) for task, key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"{results['num_studies']} studies, seed {results['seed']}."]
    first = next(iter(results["models"].values()))
    if "findings_to_impression" in first:
        task = first["findings_to_impression"]
        notes.append(f"F→I: findings→impression retrieval, {task['num_queries']} queries; strict = one relevant "
                     f"target among {task['num_corpus']} unique impressions (identical impressions collapsed); "
                     f"'unique impressions' keeps the {task.get('unique_impressions', {}).get('num_queries', 0)} "
                     "queries whose impression no other study shares (mostly abnormal studies); "
                     "'duplicates as hits' keeps every copy and counts each as relevant (flatters common normal "
                     "impressions).")
    if "paraphrase" in first:
        task = first["paraphrase"]
        notes.append(f"Para: held-out-family paraphrase→original retrieval ({', '.join(task['families'])}), "
                     f"{task['num_queries']} queries among {task['num_corpus']} reports.")
    if "error_discrimination" in first:
        families = ", ".join(first["error_discrimination"]["per_family"])
        notes.append(f"Error acc: macro mean over the held-out negative families ({families}), chance 0.5.")
    if "clinical_ordering" in first:
        notes.append(f"Clinical ordering: {first['clinical_ordering']['num_triplets']} hand-written triplets, "
                     "chance 0.5.")
    if "embedding_spread" in first:
        notes.append("Mean cos: mean pairwise cosine of random reports (near 1: a collapsed space).")
    if "zero_shot_labels" in first:
        notes.append(f"Zero-shot: macro over {first['zero_shot_labels']['num_labels']} Problems labels.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def write_results(results: Mapping, output_dir) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `recall.png` (R@K curves) into `output_dir`.

    Each file goes through a temp file and `os.replace`, so a reader never sees half a file.
    Returns {file name: path}.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in RESULT_FILES}
    atomic_write_json(paths["results.json"], results, indent=2, sort_keys=True)
    atomic_write_text(paths["results.md"], results_markdown(results))
    atomic_write(paths["recall.png"], lambda path: _plot_recall(results, path))
    return paths


def _plot_recall(results: Mapping, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('The recall plot needs `pip install "llm2clip4cxr[eval]"` (matplotlib).') from error
    matplotlib.use("Agg")  # no display; also makes the output independent of the user's backend
    import matplotlib.pyplot as plt

    tasks = [task for task in RETRIEVAL_TASKS if task in results["tasks"]] or ["(no retrieval task run)"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for name, metrics in results["models"].items():
            if task in metrics:
                axis.plot(RECALL_KS, [metrics[task][f"recall@{k}"] for k in RECALL_KS], marker="o", label=name)
        axis.set(title=task.replace("_", " "), xlabel="K", ylabel="recall@K", xticks=RECALL_KS, ylim=(0, 1))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    # No "Software" metadata: the PNG bytes then depend only on the results (and the matplotlib version).
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
