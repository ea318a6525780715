"""Model cards for saved checkpoints, rendered with huggingface_hub's ModelCard from `hub_cards/`."""

from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEXT_TEMPLATE = "llm2vec4cxr.md"
# How the tasks and metrics of `results.json` read on the Hub's model-index.
# The Hub groups model-index metrics by (task type, dataset type, config, split): each task gets its own
# dataset config so the two tasks stay apart.
_TASKS = {
    "findings_to_impression": ("Findings to impression retrieval", ("recall@1", "recall@5", "recall@10", "mrr")),
    "error_discrimination": ("Clinical error discrimination", ("accuracy",)),
}
_SHORT_NAMES = {"findings_to_impression": "findings→impression", "error_discrimination": "error discrimination"}
_TASK_DATASETS = {
    "findings_to_impression": "Open-I held-out studies (findings, impressions)",
    "error_discrimination": "Open-I held-out studies (report variants)",
}


def template_path(name: str) -> Path:
    return Path(str(resources.files("llm2clip4cxr.hub_cards") / name))


def evaluation_table(results: dict) -> str:
    """Markdown table: one row per model, one column per task metric."""
    columns = [(task, metric) for task, (_, metrics) in _TASKS.items() for metric in metrics]
    header = "| model | " + " | ".join(f"{_SHORT_NAMES[task]} {metric}" for task, metric in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for model, tasks in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{tasks[task][metric]:.3f}" for task, metric in columns) + " |")
    return "\n".join(lines)


def text_model_card(summary: dict, model_name: str, repo_id: str, this_model: str, config) -> ModelCard:
    """The card of an LLM2Vec4CXR checkpoint from a `make_default_text_encoder.py`-style summary."""
    eval_results = [
        EvalResult(
            task_type="sentence-similarity", task_name=task_name, dataset_type="openi", dataset_name=_TASK_DATASETS[task],
            dataset_config=task, dataset_split="validation",
            metric_type=metric, metric_name=metric, metric_value=round(summary["results"][this_model][task][metric], 4),
        )
        for task, (task_name, metrics) in _TASKS.items()
        for metric in metrics
    ]
    card_data = ModelCardData(
        language="en", license="cc-by-nc-nd-4.0", library_name="transformers", pipeline_tag="sentence-similarity",
        tags=["llm2vec4cxr", "chest-x-ray", "radiology", "sentence-transformers", "feature-extraction"],
        datasets=["openi"], model_name=model_name, eval_results=eval_results,
    )
    data, training = summary["data"], summary["training"]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(TEXT_TEMPLATE)),
        model_name=model_name,
        repo_id=repo_id,
        pooling_mode=config.pooling_mode,
        instruction=training["instruction"],
        model_description=(
            f"Backbone: {config.backbone_config.model_type}, hidden size {config.hidden_size}, "
            f"{config.backbone_config.num_hidden_layers} layers, trained from scratch with its own BPE tokenizer."
        ),
        training_description=(
            f"MNTP for {training['mntp_steps']} steps, then supervised contrastive training (in-batch and hard "
            f"negatives, scale 20) for {training['contrastive_steps']} steps, batch {training['batch_size']}, "
            f"instruction \"{training['instruction']}\"; {training['minutes']} minutes on 2 CPU cores. Recipe: "
            "`python training/make_default_text_encoder.py --install`."
        ),
        evaluation_table=(
            f"On {data['validation_studies']} held-out Open-I studies ({data['split']}), next to baselines "
            "measured in the same run:\n\n" + evaluation_table(summary["results"]) + "\n\n"
            "Error discrimination uses the same rule-based variant generators as training (on held-out "
            "reports), so it measures how well the model learned those rules, not robustness to errors "
            "written by people or LLMs. Identical impressions count as relevant in retrieval."
        ),
        data_description=(
            f"Open-I (Indiana University chest X-ray collection, Demner-Fushman et al., JAMIA 2016): "
            f"{data['train_studies']} training studies. Research-only, non-commercial (CC BY-NC-ND 4.0 as "
            "distributed by third parties); the model inherits these terms."
        ),
    )


def write_text_model_card(model_dir, summary: dict, model_name: str = "LLM2Vec4CXR-tiny (default)", repo_id: str = "llm2clip4cxr/llm2vec4cxr-tiny-openi") -> Path:
    from . import LLM2Vec4CXRConfig

    config = LLM2Vec4CXRConfig.from_pretrained(model_dir)
    card = text_model_card(summary, model_name, repo_id, model_name, config)
    path = Path(model_dir) / "README.md"
    card.save(path)
    return path
