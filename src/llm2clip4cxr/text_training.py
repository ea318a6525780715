"""Training building blocks for LLM2Vec4CXR: the MNTP stage and the supervised contrastive stage.

Both stages run on `transformers.Trainer` (and so on `accelerate launch`, DDP, DeepSpeed, FSDP); only
what no library does is written here:

* MNTP (masked next-token prediction) is masked language modelling on the *bidirectional*
  backbone with the causal LM head: `DataCollatorForLanguageModeling` masks tokens and puts the
  original ids in `labels`, and the backbone's `*ForCausalLM` loss shifts them, so the token masked
  at position i is predicted from the logits at position i-1, as LLM2Vec does.
* The contrastive stage is a `SentenceTransformerTrainer` run: the encoder is wrapped as a
  sentence-transformers model (`sentence_transformer_for`) and trained with sentence-transformers'
  `MultipleNegativesRankingLoss`, or its GradCache variant `CachedMultipleNegativesRankingLoss` when
  `mini_batch_size` is below the batch size (`contrastive_loss`): every anchor is scored against every
  positive and hard negative of the (process-gathered) batch, and the batch size is no longer bounded by
  activation memory. The instruction is the trainer's prompt: `LLM2Vec4CXRSentenceEncoder.preprocess`
  prepends it and pools it out.
"""

import json
import logging
import os
import re
import shutil

import torch
from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

from .fileio import atomic_write_folder
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
    backbone = encoder.model
    # A LoRA-wrapped backbone (peft) is shared as it is: its base model must be the LM's backbone class.
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if type(lm.model) is not type(base):
        raise TypeError(f"{type(lm).__name__}.model is a {type(lm.model).__name__}, the encoder's backbone a {type(base).__name__}.")
    lm.model = backbone
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


def sentence_transformer_for(encoder: LLM2Vec4CXRModel, bucket_rows: int = 32):
    """`encoder` as a `SentenceTransformer` (sharing its weights) with the config's named instructions as
    prompts. `bucket_rows`: rows per length-sorted bucket of a training forward (see
    `LLM2Vec4CXRSentenceEncoder.forward`)."""
    from sentence_transformers import SentenceTransformer

    from .modeling.modeling_llm2vec4cxr import LLM2Vec4CXRSentenceEncoder

    return SentenceTransformer(
        modules=[LLM2Vec4CXRSentenceEncoder(encoder, bucket_rows=bucket_rows)],
        prompts=dict(encoder.config.instructions) or None,
        default_prompt_name=encoder.config.default_instruction_name,
        similarity_fn_name="cosine",
    )


def contrastive_loss(
    model,
    batch_size: int,
    mini_batch_size: int | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
    gather_across_devices: bool = True,
):
    """sentence-transformers' in-batch-negatives InfoNCE for a `SentenceTransformer` `model`.

    Cached (GradCache: embed in mini-batches without a graph, compute the full-batch loss, back-propagate
    through the cached embedding gradients) when `mini_batch_size` is below `batch_size`: same loss and
    gradients, memory of one mini-batch. `symmetric` adds the positive->anchor direction (for pairs whose
    two sides are both queries and documents, such as findings and impression), one softmax per direction.
    """
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    if mini_batch_size is not None and mini_batch_size < 1:
        raise ValueError(f"`mini_batch_size` must be positive, got {mini_batch_size}.")
    settings = {
        "scale": scale,
        "gather_across_devices": gather_across_devices,
        "directions": ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",),
        "partition_mode": "per_direction" if symmetric else "joint",
    }
    if mini_batch_size is not None and mini_batch_size < batch_size:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **settings)
    return MultipleNegativesRankingLoss(model, **settings)


def parse_recipe_arguments(recipe_arguments_class, argv=None):
    """(recipe arguments, TrainingArguments) from the command line or from a single YAML file, with the
    settings every recipe here needs: raw rows reach the collators, and DDP skips the unused-parameter
    search (every parameter takes part in each step)."""
    import sys

    from transformers import HfArgumentParser

    from sentence_transformers import SentenceTransformerTrainingArguments

    # sentence-transformers' arguments extend transformers' (batch samplers, prompts); the MNTP stage ignores them.
    parser = HfArgumentParser((recipe_arguments_class, SentenceTransformerTrainingArguments))
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
