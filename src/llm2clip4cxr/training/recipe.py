"""What both training recipes (`training/train_text_encoder.py`, `training/train_clip.py`) share: LoRA
adapters, the command line (or YAML) of a recipe, resuming from the last complete checkpoint and saving the
final model atomically."""

import json
import logging
import os
import re
import shutil
import time

from transformers import TrainerCallback

from ..fileio import atomic_write_folder

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "TrainingTimeBudget",
    "apply_lora",
    "last_complete_checkpoint",
    "parse_recipe_arguments",
    "save_pretrained_atomically",
]

# All attention and MLP projections of Llama/Mistral/Qwen2/Qwen3 decoder layers.
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules=DEFAULT_LORA_TARGETS):
    """Wrap `model` with LoRA adapters (peft). `peft_model.merge_and_unload()` folds them back in."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError('LoRA needs peft: pip install "llm2clip4cxr[train]"') from error
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    return get_peft_model(model, config)


def parse_recipe_arguments(recipe_arguments_class, argv=None):
    """(recipe arguments, TrainingArguments) from the command line or from a single YAML file, with the
    settings every recipe here needs: raw rows reach the collators, and DDP skips the unused-parameter
    search (every parameter takes part in each step)."""
    import sys

    from sentence_transformers import SentenceTransformerTrainingArguments
    from transformers import HfArgumentParser

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


class TrainingTimeBudget(TrainerCallback):
    """Train for a wall-clock budget instead of a step count.

    The learning rate warms up over the run's warmup steps, then falls linearly to zero with the fraction of the
    budget spent (not of `max_steps`, which only caps the run), and training stops once the budget is spent. Made
    for a machine whose speed is not known ahead, such as a lent GPU that several runs share: the steps reached
    are in `trainer.state.global_step`, and `--max_steps` set to them gives the same schedule anywhere at a steady
    throughput. Transformers' own `max_steps` schedules need the step count up front, hence this callback.
    """

    def __init__(self, minutes: float, clock=time.monotonic):
        if not minutes > 0:
            raise ValueError(f"The time budget must be a positive number of minutes, got {minutes}.")
        self.seconds = minutes * 60
        self.clock = clock
        self.started = None
        self.warmup_steps = 0

    def spent(self) -> float:
        """The fraction of the budget spent (0 before training starts)."""
        return 0.0 if self.started is None else (self.clock() - self.started) / self.seconds

    def learning_rate_factor(self, step: int) -> float:
        warmup = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        return warmup * max(0.0, 1.0 - self.spent())

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.started = self.clock()
        self.warmup_steps = args.get_warmup_steps(args.max_steps)
        # Transformers' step schedules are LambdaLRs: their factor of the peak rate now follows the clock.
        if not hasattr(lr_scheduler, "lr_lambdas"):
            raise ValueError(f"A time budget needs a step schedule (--lr_scheduler_type linear, cosine, constant...), "
                             f"not {type(lr_scheduler).__name__}.")
        lr_scheduler.lr_lambdas = [self.learning_rate_factor] * len(lr_scheduler.lr_lambdas)

    def on_step_end(self, args, state, control, **kwargs):
        if self.spent() >= 1.0:
            control.should_training_stop = True
        return control
