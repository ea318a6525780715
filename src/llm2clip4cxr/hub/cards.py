"""Model cards for saved checkpoints, rendered with huggingface_hub's `ModelCard` from the `hub_cards/` templates.

    card = model_card(config, "org/llm2vec4cxr-small", results=json.load(open("runs/eval/results.json")))
    card.save("README.md")

Evaluation results become the card's `model-index` (the metadata the Hub renders as a results widget).
Two results formats are read:

* the evaluation harness's `results.json` (`llm2clip4cxr eval`): `{"seed", "num_studies", "tasks", "data",
  "models": {name: {task: metrics}}}`;
* the training summary of `training/make_default_text_encoder.py` (the shipped default's `results.json`):
  `{"data": {...}, "training": {...}, "results": {name: {task: metrics}}}`.
"""

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .folder import adapter_base_id, adapter_base_source, checkpoint_kind

CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
TEXT_TEMPLATE = "llm2vec4cxr.md"
CLIP_TEMPLATE = "llm2clip4cxr.md"
PIPELINE_TAGS = {"llm2vec4cxr": "sentence-similarity", "llm2clip4cxr": "zero-shot-image-classification"}
DEFAULT_LICENSE = "cc-by-nc-nd-4.0"  # the Open-I terms as distributed: models trained on it inherit them
# How the tasks of a results file read on the Hub's model-index: (task name, metrics to publish).
# The Hub groups model-index metrics by (task type, dataset type, config, split): each task gets its own
# dataset config so the tasks stay apart.
_TASKS = {
    "findings_to_impression": ("Findings to impression retrieval", ("recall@1", "recall@5", "recall@10", "mrr")),
    "paraphrase": ("Paraphrase retrieval", ("recall@1", "recall@5", "recall@10", "mrr")),
    "error_discrimination": ("Clinical error discrimination", ("macro_accuracy", "accuracy")),
    "clinical_ordering": ("Clinical ordering suite", ("accuracy",)),
    "embedding_spread": ("Embedding spread", ()),
    "zero_shot_labels": ("Zero-shot report labels", ("macro_auroc", "macro_f1")),
}
# Tasks this module does not know (e.g. image<->report retrieval) publish the metrics matching this.
_HEADLINE_METRIC = re.compile(r"(recall|precision|ndcg)@\d+|mrr|map|accuracy|(macro_|micro_)?(auroc|f1)")
_SHORT_NAMES = {
    "findings_to_impression": "findings→impression",
    "paraphrase": "paraphrase",
    "error_discrimination": "error discrimination",
    "clinical_ordering": "clinical ordering",
    "zero_shot_labels": "zero-shot labels",
}
_TASK_DATASETS = {
    "findings_to_impression": "(findings, impressions)",
    "paraphrase": "(report paraphrases)",
    "error_discrimination": "(report variants)",
    "clinical_ordering": "(hand-written triplets)",
    "zero_shot_labels": "(Problems labels)",
}


def template_path(name: str) -> Path:
    """Path of a card template shipped in `llm2clip4cxr.hub_cards`."""
    return Path(str(resources.files("llm2clip4cxr.hub_cards") / name))


def results_by_model(results: Mapping) -> dict:
    """`{model name: {task: metrics}}` of either results format (see the module docstring)."""
    for key in ("models", "results"):
        if isinstance(results.get(key), Mapping):
            return dict(results[key])
    raise ValueError(
        "Unrecognised results file: expected the `llm2clip4cxr eval` results.json (a 'models' object) or a "
        f"training summary (a 'results' object); got the keys {sorted(results)}."
    )


def select_model_results(results: Mapping, candidates) -> str:
    """The name under which `results` holds this model: the first of `candidates` present, else the only model.

    Raises `ValueError` listing the names when it cannot tell which model the card is about.
    """
    models = results_by_model(results)
    for name in candidates:
        if name and name in models:
            return name
    if len(models) == 1:
        return next(iter(models))
    raise ValueError(
        f"The results hold several models {sorted(models)} and none is named {[c for c in candidates if c]}; "
        "say which one this checkpoint is (`results_model=` / `--results-model`)."
    )


def _published_metrics(task: str, metrics: Mapping) -> list[str]:
    known = _TASKS.get(task)
    names = known[1] if known else [name for name in metrics if _HEADLINE_METRIC.fullmatch(name)]
    return [
        name for name in names if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics[name], bool)
    ]


def eval_results(
    results: Mapping,
    model: str,
    *,
    task_type: str,
    dataset_type: str = "openi",
    dataset_name: str = "Open-I held-out studies",
    dataset_split: str = "validation",
) -> list[EvalResult]:
    """huggingface_hub `EvalResult`s (the card's model-index) of `model` in a results file.

    Known tasks publish their headline metrics (recall@K and MRR for retrieval, accuracy for error
    discrimination, macro AUROC/F1 for zero-shot labels); other tasks publish every metric named like
    recall@K, precision@K, ndcg@K, mrr, map, accuracy, AUROC or F1. Counts and ranks are left out.
    """
    models = results_by_model(results)
    if model not in models:
        raise ValueError(f"The results have no model {model!r}; they hold {sorted(models)}.")
    entries = []
    for task, metrics in models[model].items():
        task_name = _TASKS[task][0] if task in _TASKS else task.replace("_", " ").capitalize()
        for metric in _published_metrics(task, metrics):
            entries.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=dataset_type,
                dataset_name=f"{dataset_name} {_TASK_DATASETS.get(task, f'({task})')}",
                dataset_config=task, dataset_split=dataset_split,
                metric_type=metric, metric_name=metric, metric_value=round(float(metrics[metric]), 4),
            ))
    return entries


def evaluation_table(results: Mapping) -> str:
    """Markdown table: one row per model, one column per published metric of the tasks every model ran."""
    models = results_by_model(results)
    first = next(iter(models.values()))
    columns = [(task, metric) for task in first for metric in _published_metrics(task, first[task])
               if all(metric in tasks.get(task, {}) for tasks in models.values())]
    header = "| model | " + " | ".join(f"{_SHORT_NAMES.get(task, task)} {metric}" for task, metric in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for model, tasks in models.items():
        lines.append(f"| {model} | " + " | ".join(f"{tasks[task][metric]:.3f}" for task, metric in columns) + " |")
    return "\n".join(lines)


def _headline_values(task: str, metrics: Mapping) -> dict[str, float]:
    """The published metrics of a task, plus findings->impression recall@1 on unique impressions (the strict
    subset where a model cannot score by ranking a common normal impression first)."""
    values = {metric: float(metrics[metric]) for metric in _published_metrics(task, metrics)}
    unique = metrics.get("unique_impressions")
    if task == "findings_to_impression" and isinstance(unique, Mapping) and "recall@1" in unique:
        values["recall@1 (unique impressions)"] = float(unique["recall@1"])
    return values


def where_it_loses(results: Mapping, model: str) -> list[str]:
    """One line per metric on which another model of the same run beats `model`, naming each that does.

    Cards state these plainly so a reader does not have to find them in the table."""
    headline = {
        name: {task: _headline_values(task, metrics) for task, metrics in tasks.items()}
        for name, tasks in results_by_model(results).items()
    }
    lines = []
    for task, values in headline.get(model, {}).items():
        for metric, value in values.items():
            better = {
                name: other
                for name, tasks in headline.items()
                if name != model and (other := tasks.get(task, {}).get(metric)) is not None and other > value
            }
            if better:
                ranked = sorted(better.items(), key=lambda item: -item[1])
                beaten_by = ", ".join(f"{name} {other:.3f}" for name, other in ranked)
                lines.append(f"{_SHORT_NAMES.get(task, task)} {metric}: {value:.3f}, below {beaten_by}")
    return lines


def _evaluation_text(results: Mapping, model: str | None = None) -> str:
    data = results.get("data")
    if isinstance(data, Mapping) and "validation_studies" in data:  # a training summary
        where = f"On {data['validation_studies']} held-out Open-I studies ({data['split']})"
    elif "num_studies" in results:  # the harness
        where = f"On {results['num_studies']} studies (seed {results.get('seed', 0)})"
    else:
        where = "On the evaluation data"
    text = f"{where}, next to baselines measured in the same run:\n\n{evaluation_table(results)}"
    families = results.get("variant_families")
    if isinstance(families, Mapping):  # the harness names the generator families it evaluated with
        evaluation = families.get("evaluation", {})
        text += (
            "\n\nFindings→impression is strict: one relevant impression per query among unique impressions. "
            "Paraphrase and error discrimination use held-out variant families written for evaluation only "
            f"(positives: {', '.join(evaluation.get('positive', []))}; errors: "
            f"{', '.join(evaluation.get('negative', []))}), never the families a model trains on. The clinical "
            "ordering suite is hand-written (query, equivalent, different) triplets."
        )
    elif any("error_discrimination" in tasks for tasks in results_by_model(results).values()):
        text += (
            "\n\nError discrimination uses the same rule-based variant generators as training (on held-out "
            "reports), so it measures how well the model learned those rules, not robustness to errors "
            "written by people or LLMs. Identical impressions count as relevant in retrieval."
        )
    if model is not None:
        losses = where_it_loses(results, model)
        text += (
            "\n\nWhere this model loses in this run:\n\n" + "\n".join(f"- {line}" for line in losses)
            if losses else "\n\nNo other model of this run scores higher on any metric above."
        )
    return text


def _training_text(results: Mapping | None) -> str | None:
    training = (results or {}).get("training")
    if not isinstance(training, Mapping):
        return None
    text = (
        f"MNTP for {training['mntp_steps']} steps, then supervised contrastive training (in-batch and hard "
        f"negatives, scale 20) for {training['contrastive_steps']} steps, batch {training['batch_size']}, "
        f"instruction \"{training['instruction']}\"; {training['minutes']} minutes on "
        f"{training.get('device', '2 CPU cores')}, seed {training.get('seed', 0)}. Recipe: "
        f"`{training.get('command', 'python training/make_default_text_encoder.py --install')}`."
    )
    if training.get("families"):
        text += f" Variant families it was trained on: {', '.join(training['families'])}."
    return text


def _data_text(results: Mapping | None) -> str:
    data = (results or {}).get("data")
    text = (
        "Open-I (Indiana University chest X-ray collection, Demner-Fushman et al., JAMIA 2016): {}Research-only, "
        "non-commercial (CC BY-NC-ND 4.0 as distributed by third parties); the model inherits these terms."
    )
    if isinstance(data, Mapping) and "train_studies" in data:  # the recipe's own summary: the data is known
        return text.format(f"{data['train_studies']} training studies. ")
    return text.format("") + " If you trained on other data, state its source and licence here."


def model_card(
    config,
    repo_id: str,
    *,
    results: Mapping | None = None,
    results_model: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    adapter: bool = False,
    license: str = DEFAULT_LICENSE,
    datasets=("openi",),
    training_description: str | None = None,
) -> ModelCard:
    """The card of an LLM2Vec4CXR or LLM2CLIP4CXR checkpoint (picked by `config.model_type`).

    Args:
        config: the checkpoint's `LLM2Vec4CXRConfig` or `LLM2CLIP4CXRConfig` (for an adapter: its base model's).
        repo_id: the Hub repository the card is for (used in the code examples).
        results: an evaluation results file (see the module docstring); becomes the model-index and a table.
        results_model: which model of `results` this is (default: `model_name`, else the only model).
        model_name: the name shown on the card and in the model-index (default: the repository name).
        base_model: the Hub id this model derives from (required for an adapter).
        adapter: the repository holds a peft LoRA adapter for `base_model`, not full weights.
        training_description: how it was trained (default: read from a training summary, else a pointer to
            the recipes).
    """
    kind = getattr(config, "model_type", None)
    if kind not in PIPELINE_TAGS:
        raise ValueError(f"`config.model_type` must be one of {sorted(PIPELINE_TAGS)}, got {kind!r}.")
    if adapter and not base_model:
        raise ValueError("An adapter card needs `base_model`: the Hub id of the model the adapter applies to.")
    model_name = model_name or repo_id.split("/")[-1]
    pipeline_tag = PIPELINE_TAGS[kind]
    entries, chosen = [], None
    if results is not None:
        chosen = select_model_results(results, [results_model, model_name])
        entries = eval_results(results, chosen, task_type=pipeline_tag)
    tags = [kind, "chest-x-ray", "radiology"]
    tags += (
        ["sentence-transformers", "feature-extraction"] if kind == "llm2vec4cxr" else ["clip", "image-text-retrieval"]
    )
    if adapter:
        tags += ["peft", "lora"]
    card_data = ModelCardData(
        language="en", license=license, library_name="peft" if adapter else "transformers", pipeline_tag=pipeline_tag,
        tags=tags, datasets=list(datasets) or None, base_model=base_model,
        # model_name only names the model-index; without results it would be stray metadata.
        **({"model_name": model_name, "eval_results": entries} if entries else {}),
    )
    training_description = training_description or _training_text(results) or (
        "Trained with the `llm2clip4cxr` recipes (`training/train_text_encoder.py` for the text encoder, "
        "`training/train_clip.py` for the image-text model); see the package's training documentation."
    )
    template, extra = _template_fields(config, results)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(template)),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        adapter=adapter,
        training_description=training_description,
        evaluation_table=_evaluation_text(results, chosen) if results is not None else None,
        data_description=_data_text(results),
        **extra,
    )


def _template_fields(config, results: Mapping | None) -> tuple[str, dict]:
    """The card template of the checkpoint's kind and the fields only that template has."""
    if config.model_type == "llm2vec4cxr":
        backbone = config.backbone_config
        template, extra = TEXT_TEMPLATE, {
            "pooling_mode": config.pooling_mode,
            "instruction": getattr(config, "default_instruction", None)
            or next(iter((config.instructions or {}).values()), "Retrieve reports with the same clinical findings"),
            "model_description": (
                f"Backbone: {backbone.model_type}, hidden size {config.hidden_size}, "
                f"{backbone.num_hidden_layers} layers"
                # Only the default recipe writes a training summary, and it trains its own tokenizer.
                + (", trained from scratch with its own BPE tokenizer." if _training_text(results) else ".")
            ),
        }
    else:
        text, vision = config.text_config, config.vision_config
        template, extra = CLIP_TEMPLATE, {
            "model_description": (
                f"Text tower: LLM2Vec4CXR ({text.backbone_config.model_type}, hidden size {text.hidden_size}, "
                f"{text.pooling_mode} pooling). Vision tower: {vision.model_type}, hidden size "
                f"{vision.hidden_size}. Shared embedding size {config.projection_dim}."
            ),
        }
    return template, extra


def text_model_card(summary: dict, model_name: str, repo_id: str, this_model: str, config) -> ModelCard:
    """The card of an LLM2Vec4CXR checkpoint from a `make_default_text_encoder.py`-style summary."""
    return model_card(config, repo_id, results=summary, results_model=this_model, model_name=model_name)


def write_text_model_card(
    model_dir,
    summary: dict,
    model_name: str = "LLM2Vec4CXR-tiny (default)",
    repo_id: str = "llm2clip4cxr/llm2vec4cxr-tiny-openi",
) -> Path:
    """Render the card of the LLM2Vec4CXR checkpoint in `model_dir` and save it as its README.md."""
    from .. import LLM2Vec4CXRConfig

    config = LLM2Vec4CXRConfig.from_pretrained(model_dir)
    card = text_model_card(summary, model_name, repo_id, model_name, config)
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path


def read_results(results, model_dir: Path) -> Mapping | None:
    if results is None:
        path = model_dir / RESULTS_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if isinstance(results, Mapping):
        return results
    path = Path(results)
    if not path.is_file():
        raise FileNotFoundError(f"results {path}: no such file (give the results.json of `llm2clip4cxr eval`).")
    return json.loads(path.read_text(encoding="utf-8"))


def build_card(
    model_dir,
    repo_id: str,
    *,
    results=None,
    results_model: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    keep_card: bool = False,
) -> ModelCard:
    """The card pushed with `model_dir`.

    By default it is rendered from `hub_cards/` with `results` (a results file path or dict; default the
    folder's `results.json`) as its model-index. The model's name defaults to the one in the folder's
    existing card, else the repository name. `keep_card=True` pushes the folder's own README.md unchanged
    (it must parse as a model card, and an adapter's card must name its `base_model`).
    """
    model_dir = Path(model_dir)
    kind = checkpoint_kind(model_dir)
    existing = ModelCard.load(model_dir / CARD_FILE) if (model_dir / CARD_FILE).is_file() else None
    if keep_card:
        if existing is None:
            raise FileNotFoundError(f"keep_card: {model_dir} has no {CARD_FILE} to keep.")
        if kind.endswith("-adapter") and not existing.data.base_model:
            raise ValueError(f"{model_dir / CARD_FILE} names no base_model; an adapter's card must.")
        return existing
    from transformers import AutoConfig  # the package's configs are registered by importing llm2clip4cxr

    if kind.endswith("-adapter"):
        config = AutoConfig.from_pretrained(adapter_base_source(model_dir, base_model), trust_remote_code=False)
        base_model = adapter_base_id(model_dir, base_model)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    model_name = model_name or (existing.data.model_name if existing is not None else None)
    results = read_results(results, model_dir)
    if results is not None:
        results_model = select_model_results(results, [results_model, model_name, model_dir.name])
    return model_card(
        config, repo_id, results=results, results_model=results_model, model_name=model_name,
        base_model=base_model, adapter=kind.endswith("-adapter"),
    )
