"""Run the report tasks of `report_tasks` for several models and write the results.

    results = run_evaluation({"default": llm2vec_encoder(model), "bm25": bm25_scorer()}, rows, seed=0)
    write_results(results, "runs/eval")  # results.json, results.md, recall.png

`rows` are report-CSV rows (see the `report_tasks` docstring for the format), e.g. from
`data.read_reports_csv`. Everything random (paraphrases, error triplets) is drawn from `seed`, and the
results hold no timings, so the same models, rows and seed give an identical results.json.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..fileio import atomic_write
from .report_tasks import (
    Model,
    error_discrimination,
    findings_to_impression_retrieval,
    paraphrase_retrieval,
    parse_problems,
    zero_shot_label_auroc,
)

TASKS = ("findings_to_impression", "paraphrase", "error_discrimination", "zero_shot_labels")
RETRIEVAL_TASKS = ("findings_to_impression", "paraphrase")
RECALL_KS = (1, 5, 10)
# Columns of results.md: (task, metric key, header).
_TABLE_COLUMNS = (
    *((task, f"recall@{k}", f"{label} R@{k}") for task, label in (("findings_to_impression", "F→I"), ("paraphrase", "Para"))
      for k in RECALL_KS),
    ("findings_to_impression", "mrr", "F→I MRR"),
    ("paraphrase", "mrr", "Para MRR"),
    ("error_discrimination", "accuracy", "Error acc"),
    ("zero_shot_labels", "macro_auroc", "Zero-shot AUROC"),
    ("zero_shot_labels", "macro_f1", "Zero-shot F1"),
)
RESULT_FILES = ("results.json", "results.md", "recall.png")


def report_text(row: Mapping[str, str]) -> str:
    """Findings and impression of a report-CSV row, joined."""
    return " ".join(part for part in ((row.get("findings") or "").strip(), (row.get("impression") or "").strip()) if part)


def run_evaluation(
    encoders: Mapping[str, Model],
    data: Sequence[Mapping[str, str]],
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    *,
    triplets: Sequence[dict] | None = None,
    label_prompts: Mapping[str, str] | None = None,
) -> dict:
    """Score every model on every task.

    Args:
        encoders: name -> Encoder or Scorer (see `report_tasks`).
        data: report rows with `uid`, `findings`, `impression` and, for "zero_shot_labels", `Problems`.
        tasks: a subset of `TASKS`, run in the given order.
        seed: seeds the paraphrases and the generated error triplets.
        triplets: error-discrimination triplets to use instead of generating them from `data`.
        label_prompts: label -> prompt for "zero_shot_labels" (default `DEFAULT_LABEL_PROMPTS`).

    Returns:
        `{"seed", "num_studies", "tasks", "models": {name: {task: metrics}}}`, JSON-serialisable.
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

    # Task inputs are built once so that every model sees exactly the same queries.
    inputs = {}
    if "error_discrimination" in tasks:
        if triplets is None:
            from ..report_variants import build_triplets

            triplets = build_triplets(rows, seed=seed)
        inputs["error_discrimination"] = list(triplets)
    if "zero_shot_labels" in tasks:
        missing = next((row["uid"] for row in rows if "Problems" not in row), None)
        if missing is not None:
            raise ValueError(f"Task 'zero_shot_labels' needs a `Problems` column; study {missing!r} has none.")
        inputs["zero_shot_labels"] = {str(row["uid"]): parse_problems(row["Problems"]) for row in rows}

    run = {
        "findings_to_impression": lambda model: findings_to_impression_retrieval(model, rows, ks=RECALL_KS),
        "paraphrase": lambda model: paraphrase_retrieval(model, reports, seed=seed, ks=RECALL_KS),
        "error_discrimination": lambda model: error_discrimination(model, inputs["error_discrimination"]),
        "zero_shot_labels": lambda model: zero_shot_label_auroc(model, reports, inputs["zero_shot_labels"], label_prompts),
    }
    models = {name: {task: run[task](model) for task in tasks} for name, model in encoders.items()}
    return {"seed": seed, "num_studies": len(rows), "tasks": tasks, "models": models}


def results_markdown(results: Mapping) -> str:
    """A Markdown table: one row per model, the headline metric of each task that was run."""
    columns = [column for column in _TABLE_COLUMNS if column[0] in results["tasks"]]
    lines = [
        "| model | " + " | ".join(header for _, _, header in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, metrics in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[task][key]:.3f}" for task, key, _ in columns) + " |")
    notes = [f"{results['num_studies']} studies, seed {results['seed']}."]
    first = next(iter(results["models"].values()))
    if "findings_to_impression" in first:
        notes.append(f"F→I: findings→impression retrieval, {first['findings_to_impression']['num_queries']} queries.")
    if "paraphrase" in first:
        notes.append(f"Para: paraphrase→original retrieval, {first['paraphrase']['num_queries']} queries "
                     f"among {first['paraphrase']['num_corpus']} reports.")
    if "error_discrimination" in first:
        notes.append(f"Error acc: {first['error_discrimination']['num_triplets']} triplets, chance 0.5.")
    if "zero_shot_labels" in first:
        notes.append(f"Zero-shot: macro over {first['zero_shot_labels']['num_labels']} Problems labels; "
                     "F1 of 'label prompt beats the normal prompt'.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def write_results(results: Mapping, output_dir) -> dict[str, Path]:
    """Write `results.json`, `results.md` and `recall.png` (R@K curves) into `output_dir`.

    Each file goes through a temp file and `os.replace`, so a reader never sees half a file.
    Returns {file name: path}.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / name for name in RESULT_FILES}
    json_text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    atomic_write(paths["results.json"], lambda path: path.write_text(json_text, encoding="utf-8"))
    markdown = results_markdown(results)
    atomic_write(paths["results.md"], lambda path: path.write_text(markdown, encoding="utf-8"))
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
