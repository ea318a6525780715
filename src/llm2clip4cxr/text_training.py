"""Training building blocks for LLM2Vec4CXR: the MNTP stage and the supervised contrastive stage.

Both stages run on `transformers.Trainer` (and so on `accelerate launch`, DDP, DeepSpeed, FSDP); only
what no library does is written here:

* MNTP (masked next-token prediction) is masked language modelling on the *bidirectional*
  backbone with the causal LM head: `DataCollatorForLanguageModeling` masks tokens and puts the
  original ids in `labels`, and the backbone's `*ForCausalLM` loss shifts them, so the token masked
  at position i is predicted from the logits at position i-1, as LLM2Vec does.
* The contrastive stage scores each anchor against every positive and hard negative of the global
  batch (`losses.info_nce_loss`, gathered across processes). All texts of a step go through the
  model in ONE forward pass: DDP does not allow several forwards before one backward.
"""

import json
import logging
import os
import re
import shutil

import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer

from .fileio import atomic_write_folder
from .losses import info_nce_loss
from .modeling.modeling_llm2vec4cxr import LLM2Vec4CXRModel

logger = logging.getLogger(__name__)

# All attention and MLP projections of Llama/Mistral/Qwen2/Qwen3 decoder layers.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONTRASTIVE_ROLES = ("anchor", "positive", "negative")


def mntp_model_for(encoder: LLM2Vec4CXRModel):
    """The backbone's `*ForCausalLM` sharing the encoder's (bidirectional) backbone module.

    Training it trains `encoder.model` in place; only the LM head is extra and stays behind.
    """
    lm = AutoModelForCausalLM.from_config(encoder.config.backbone_config)
    if type(lm.model) is not type(encoder.model):
        raise TypeError(f"{type(lm).__name__}.model is a {type(lm.model).__name__}, the encoder's backbone a {type(encoder.model).__name__}.")
    lm.model = encoder.model
    return lm


def mntp_collator(tokenizer, mask_probability: float = 0.2, mask_token: str | None = None, seed: int | None = None):
    """Masking collator for MNTP. A decoder tokenizer usually has no mask token: `mask_token` names an
    existing token to use instead (LLM2Vec uses "_"); the model learns it means "masked"."""
    if not 0.0 < mask_probability < 1.0:
        raise ValueError(f"`mask_probability` must be in (0, 1), got {mask_probability}.")
    if mask_token is not None:
        if tokenizer.convert_tokens_to_ids(mask_token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"mask token {mask_token!r} is not in the tokenizer's vocabulary; pick an existing token.")
        tokenizer.mask_token = mask_token
    elif tokenizer.mask_token is None:
        raise ValueError("The tokenizer has no mask token: pass `mask_token=` (an existing token such as '_').")
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mask_probability, mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed
    )


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=DEFAULT_LORA_TARGETS):
    """Wrap `model` with LoRA adapters (peft). `peft_model.merge_and_unload()` folds them back in."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('LoRA needs peft: pip install "llm2clip4cxr[train]"') from error
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    return get_peft_model(model, config)


def set_attention_dropout(encoder: LLM2Vec4CXRModel, probability: float) -> None:
    """Attention dropout for SimCSE: the two views of a text differ only by dropout noise, and decoder
    configs usually ship with none. Attention layers copy the rate at construction, hence the walk."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {probability}.")
    encoder.config.backbone_config.attention_dropout = probability
    for module in encoder.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = probability


class ContrastiveCollator:
    """Tokenizes rows of {"anchor", "positive"[, "negative"]} texts into one batch for one forward pass.

    Returns `input_ids`, `attention_mask`, `embed_mask` for all texts stacked as
    [anchors; positives; negatives] and `num_per_role` so the trainer can split the embeddings.
    """

    def __init__(self, encoder: LLM2Vec4CXRModel, instruction: str | None = None, columns=CONTRASTIVE_ROLES):
        self.tokenize = encoder.tokenize
        self.instruction = instruction
        self.columns = tuple(columns)

    def __call__(self, rows: list[dict]) -> dict:
        present = [column for column in self.columns if column in rows[0] and rows[0][column] is not None]
        if present[:2] != list(self.columns[:2]):
            raise ValueError(f"Contrastive rows need {self.columns[:2]} columns; got keys {sorted(rows[0])}.")
        texts = [row[column] for column in present for row in rows]
        batch = self.tokenize(texts, instruction=self.instruction)
        batch["num_per_role"] = torch.tensor([len(rows)] * len(present))
        return batch


class ContrastiveTrainer(Trainer):
    """`Trainer` whose loss is in-batch + hard-negative InfoNCE on the pooled embeddings.

    Args:
        scale: cosine similarity multiplier (inverse temperature); 20 as in sentence-transformers.
        gather_across_processes: score anchors against the candidates of every process.
    """

    def __init__(self, *args, scale: float = 20.0, gather_across_processes: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale
        self.gather_across_processes = gather_across_processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = inputs.pop("num_per_role").tolist()
        embeddings = model(**inputs).pooler_output.split(counts)
        loss = info_nce_loss(
            embeddings[0],
            embeddings[1],
            embeddings[2] if len(embeddings) > 2 else None,
            scale=self.scale,
            gather=self.gather_across_processes,
        )
        return (loss, {"embeddings": embeddings}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation reports the contrastive loss only: the default would try to collect logits.
        with torch.no_grad():
            loss = self.compute_loss(model, dict(inputs))
        return loss.detach(), None, None


def parse_recipe_arguments(recipe_arguments_class, argv=None):
    """(recipe arguments, TrainingArguments) from the command line or from a single YAML file, with the
    settings every recipe here needs: raw rows reach the collators, and DDP skips the unused-parameter
    search (every parameter takes part in each step)."""
    import sys

    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((recipe_arguments_class, TrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        args, training_args = parser.parse_yaml_file(os.path.abspath(argv[0]))
    else:
        args, training_args = parser.parse_args_into_dataclasses(argv)
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    return args, training_args


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir, remove_incomplete: bool = False) -> str | None:
    """The newest `checkpoint-N` folder whose `trainer_state.json` is whole and says step N.

    Trainer writes that file last, so a folder without it (or with a truncated one) is a save cut short
    by a kill: it is skipped with a warning, and deleted when `remove_incomplete` (a resumed run would
    otherwise later write into it and rotate checkpoints around it).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(output_dir) if (match := _CHECKPOINT.match(name))
    )
    for step, name in reversed(steps):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
                if json.load(handle).get("global_step") == step:
                    return path
        except (OSError, ValueError):
            pass
        logger.warning("Skipping %s: its trainer_state.json is missing or incomplete (an interrupted save).", path)
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def save_pretrained_atomically(output_dir: str | os.PathLike, *objects) -> str:
    """`save_pretrained` every object (model, processor) into `<output_dir>/model` through a temporary
    folder, so an interrupted save never leaves a half-written model where a complete one is expected."""
    def write(staging):
        for obj in objects:
            obj.save_pretrained(staging)

    return str(atomic_write_folder(os.path.join(os.fspath(output_dir), "model"), write))
