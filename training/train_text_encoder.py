"""Train an LLM2Vec4CXR text encoder: MNTP, then supervised contrastive (or SimCSE).

Runs with python or `accelerate launch` (see training/accelerate/*.yaml), arguments on the command
line or in a YAML file:

    # 1. masked next-token prediction on report text (LoRA, r16/alpha32, merged at the end)
    python training/train_text_encoder.py --stage mntp --model_name_or_path runs/init \
        --reports ../shared/data/openi/reports.csv --output_dir runs/mntp --lora --max_steps 500
    # 2. supervised contrastive (sentence-transformers trainer): findings<->impression of each study and
    #    report variants with hard negatives (or --pairs triplets.jsonl); GradCache mini-batches of 32
    python training/train_text_encoder.py --stage contrastive --model_name_or_path runs/mntp/model \
        --reports ../shared/data/openi/reports.csv --output_dir runs/contrastive --max_steps 500 \
        --per_device_train_batch_size 256 --mini_batch_size 32 --batch_sampler no_duplicates \
        --instruction "Retrieve reports with the same clinical findings"
    # or train on a folder written by `llm2clip4cxr prepare` (its own train/validation split)
    python training/train_text_encoder.py --stage mntp --model_name_or_path runs/init --data prepared/mimic ...
    # resume an interrupted run from its last complete checkpoint: add --resume

`--model_name_or_path` is an LLM2Vec4CXR checkpoint, or any Llama/Mistral/Qwen2/Qwen3 decoder (its
weights go into a bidirectional backbone with a new pooling head). The trained encoder is written to
`<output_dir>/model` (atomically: a complete folder or none).
"""

import os
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import Trainer

import llm2clip4cxr
from llm2clip4cxr.augment.triplets import (
    build_equivalent_study_pairs,
    build_section_pairs,
    build_triplets,
    load_triplets_jsonl,
)
from llm2clip4cxr.data import read_reports_csv, split_by_study
from llm2clip4cxr.errors import InputError, LLM2CLIP4CXRError
from llm2clip4cxr.fileio import atomic_write_json
from llm2clip4cxr.training.factory import encoder_from_decoder
from llm2clip4cxr.training.recipe import (
    TrainingTimeBudget,
    apply_lora,
    last_complete_checkpoint,
    parse_recipe_arguments,
    save_pretrained_atomically,
)
from llm2clip4cxr.training.text import (
    contrastive_loss,
    mntp_collator,
    mntp_model_for,
    sentence_transformer_for,
    set_attention_dropout,
)


@dataclass
class RecipeArguments:
    stage: str = field(metadata={"help": "mntp, contrastive (report variants / pairs) or simcse (unsupervised)"})
    model_name_or_path: str = field(metadata={"help": "LLM2Vec4CXR checkpoint or decoder LLM folder/Hub id"})
    reports: str | None = field(default=None, metadata={"help": "report CSV (findings/impression columns)"})
    data: str | None = field(
        default=None,
        metadata={
            "help": "a folder written by `llm2clip4cxr prepare` (instead of --reports): "
            "its train split trains, its validation split validates"
        },
    )
    report_columns: str = field(default="findings,impression", metadata={"help": "CSV text columns, comma-separated"})
    pairs: str | None = field(
        default=None, metadata={"help": "JSONL of anchor/positive[/negative] (e.g. LLM-made variants)"}
    )
    validation_fraction: float = field(default=0.1, metadata={"help": "reports held out by study id (seeded)"})
    split_seed: int | None = field(
        default=None,
        metadata={"help": "seed of the study split (default: --seed); fix it to train other seeds on the same split"},
    )
    instruction: str | None = field(
        default=None,
        metadata={
            "help": "instruction prepended (and pooled out) in contrastive "
            "stages; saved in the config as the model's default"
        },
    )
    instruction_name: str = field(
        default="retrieval", metadata={"help": "name of --instruction in config.instructions"}
    )
    mini_batch_size: int | None = field(
        default=None,
        metadata={"help": "contrastive: embed in mini-batches of this size (GradCache) when below the batch size"},
    )
    variants_per_report: int = field(default=1, metadata={"help": "contrastive: variant triplets drawn per report"})
    section_pairs: bool = field(default=True, metadata={"help": "contrastive: also train findings<->impression of "
                                                        "each study (a symmetric loss)"})
    equivalent_studies: bool = field(default=False, metadata={"help": "contrastive: also train pairs of different "
                                     "studies with identical label sets (--label_column) as positives; candidates of "
                                     "the anchor's label set are not its negatives"})
    label_column: str = field(default="MeSH", metadata={"help": "CSV column of ';'-separated labels (Open-I: MeSH)"})
    synthetic_triplets: int = field(default=0, metadata={"help": "contrastive: add this many compositional synthetic "
                                                        "triplets (llm2clip4cxr.augment.synthetic)"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop at this step (the learning-rate "
                                                              "schedule still spans --max_steps)"})
    time_budget_minutes: float | None = field(default=None, metadata={"help": "train for this wall-clock time: the "
                                              "learning rate decays with the time spent, --max_steps only caps "
                                              "the run (the steps reached go to train_summary.json)"})
    bucket_rows: int = field(default=32, metadata={"help": "contrastive: rows per length-sorted forward bucket"})
    pooling_mode: str = field(default="mean", metadata={"help": "pooling head when starting from a plain decoder"})
    mask_probability: float = field(default=0.2, metadata={"help": "MNTP: fraction of tokens masked"})
    mask_token: str | None = field(
        default=None, metadata={"help": "MNTP: existing token used as mask when the tokenizer has none"}
    )
    scale: float = field(default=20.0, metadata={"help": "contrastive: cosine similarity scale"})
    simcse_dropout: float = field(
        default=0.1, metadata={"help": "simcse: attention dropout that makes the two views differ"}
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    resume: bool = field(default=False, metadata={"help": "resume from the last complete checkpoint in output_dir"})


def load_encoder(args: RecipeArguments):
    if os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
        config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
        if isinstance(config, llm2clip4cxr.LLM2Vec4CXRConfig):
            return llm2clip4cxr.LLM2Vec4CXRModel.from_pretrained(args.model_name_or_path)
    return encoder_from_decoder(args.model_name_or_path, pooling_mode=args.pooling_mode)


def report_texts(rows: list[dict], columns: list[str]) -> list[str]:
    return [" ".join(row[column] for column in columns if row.get(column)) for row in rows]


def prepared_report_rows(path: str, columns: list[str]) -> tuple[list[dict], list[dict]]:
    """(train, validation) report rows of a prepared folder, one per study (a per-image folder repeats a study's
    report for each of its images) and with text in at least one of `columns`."""
    from llm2clip4cxr.data import load_prepared

    splits = []
    for split in ("train", "validation"):
        try:
            dataset = load_prepared(path, split=split)
        except ValueError:  # no rows in this split
            splits.append([])
            continue
        missing = [column for column in columns if column not in dataset.column_names]
        if missing:
            raise InputError(f"{path} has no column(s) {missing}; its columns are {dataset.column_names}.")
        seen, rows = set(), []
        for row in dataset.select_columns(["study_id", *columns]).to_list():
            if row["study_id"] not in seen and any(row[column] for column in columns):
                seen.add(row["study_id"])
                rows.append({column: row[column] or "" for column in columns})
        splits.append(rows)
    return splits[0], splits[1]


def build_datasets(args: RecipeArguments, seed: int):
    columns = [column.strip() for column in args.report_columns.split(",")]
    if args.data and args.reports:
        raise InputError("Pass --data (a prepared folder) or --reports (a CSV), not both.")
    if args.data:  # the prepared folder's own (official or patient-level) split
        train_rows, validation_rows = prepared_report_rows(args.data, columns)
        rows = train_rows + validation_rows
    else:
        rows = read_reports_csv(args.reports, text_columns=columns) if args.reports else []
        split_seed = seed if args.split_seed is None else args.split_seed
        train_rows, validation_rows = split_by_study(rows, args.validation_fraction, split_seed) if rows else ([], [])
    if args.stage == "mntp":
        if not rows:
            raise InputError("--stage mntp needs --reports (a CSV of report text).")
        return (datasets.Dataset.from_dict({"text": report_texts(train_rows, columns)}),
                datasets.Dataset.from_dict({"text": report_texts(validation_rows, columns)}))
    if args.stage == "simcse":
        texts = report_texts(train_rows, columns)
        return {"pairs": datasets.Dataset.from_dict({"anchor": texts, "positive": texts})}, None
    if args.pairs:
        return {"pairs": datasets.Dataset.from_list(_triplet_columns(load_triplets_jsonl(args.pairs)))}, None
    if not rows:
        raise InputError("--stage contrastive needs --reports (variants are built from them) or --pairs.")
    if args.variants_per_report < 1:
        raise InputError(f"--variants_per_report must be at least 1, got {args.variants_per_report}.")

    def variants(subset, copies):
        # Each copy draws other variants of the same reports; repeated triplets are dropped.
        seen, triplets = set(), []
        for copy in range(copies):
            for triplet in _triplet_columns(build_triplets(subset, seed=seed * 1000 + copy, section_pairs=False)):
                key = tuple(triplet.values())
                if key not in seen:
                    seen.add(key)
                    triplets.append(triplet)
        return datasets.Dataset.from_list(triplets)

    train = {"variants": variants(train_rows, args.variants_per_report)}
    validation = {"variants": variants(validation_rows, 1)} if validation_rows else None
    if args.synthetic_triplets:
        from llm2clip4cxr.augment.synthetic import build_synthetic_triplets

        synthetic = build_synthetic_triplets(args.synthetic_triplets, seed=seed)
        train["synthetic"] = datasets.Dataset.from_list(_triplet_columns(synthetic))
    if args.equivalent_studies:
        if args.data:
            raise InputError("--equivalent_studies needs --reports with a label column; a prepared folder keeps none.")
        train["equivalent"] = datasets.Dataset.from_list(
            build_equivalent_study_pairs(train_rows, label_column=args.label_column, seed=seed)
        )
    if args.section_pairs:
        train["sections"] = datasets.Dataset.from_list(build_section_pairs(train_rows))
        if validation_rows and build_section_pairs(validation_rows):
            validation["sections"] = datasets.Dataset.from_list(build_section_pairs(validation_rows))
    return train, validation


def _triplet_columns(triplets: list[dict]) -> list[dict]:
    """Only the text columns: sentence-transformers treats every column as an input."""
    return [{role: item[role] for role in ("anchor", "positive", "negative")} for item in triplets]


def train_contrastive(args: RecipeArguments, training_args, encoder, train_dataset, eval_dataset):
    """The contrastive (or SimCSE) stage on sentence-transformers' trainer; returns the trainer."""
    from sentence_transformers import SentenceTransformerTrainer

    if args.instruction:
        encoder.config.instructions = {**encoder.config.instructions, args.instruction_name: args.instruction}
        encoder.config.default_instruction_name = args.instruction_name
        training_args.prompts = args.instruction
    model = sentence_transformer_for(encoder, bucket_rows=args.bucket_rows)
    batch_size = training_args.per_device_train_batch_size
    if not isinstance(train_dataset, dict):
        train_dataset = {"pairs": train_dataset}
    gather = training_args.world_size > 1  # score every anchor against the candidates of all processes
    losses = {
        name: contrastive_loss(
            model,
            batch_size,
            args.mini_batch_size,
            args.scale,
            symmetric=name in ("sections", "equivalent"),
            gather_across_devices=gather,
            equivalence_groups=name == "equivalent",
        )
        for name in train_dataset
    }

    class ContrastiveTrainer(SentenceTransformerTrainer):
        def _load_from_checkpoint(self, checkpoint_path, model=None):
            # sentence-transformers resumes by re-importing the checkpoint's modules.json classes, mapping only
            # subclasses of its own Module to the ones in memory. LLM2Vec4CXRSentenceEncoder is duck-typed (its
            # remote-code file imports no sentence_transformers), so resuming raised "pass trust_remote_code":
            # load the weights through the encoder's own from_pretrained instead.
            if args.lora:
                return super()._load_from_checkpoint(checkpoint_path)
            saved = type(encoder).from_pretrained(checkpoint_path)
            encoder.load_state_dict(saved.state_dict())

    return ContrastiveTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset, loss=losses,
    )


class StopAfterSteps(transformers.TrainerCallback):
    """Ends training at a given step, leaving the schedule of --max_steps as it was (a shortened run that
    reproduces step N of the longer one)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def main(argv=None) -> str:
    args, training_args = parse_recipe_arguments(RecipeArguments, argv)
    if args.stage not in ("mntp", "contrastive", "simcse"):
        raise InputError(f"--stage must be mntp, contrastive or simcse, got {args.stage!r}.")
    transformers.set_seed(training_args.seed)

    encoder = load_encoder(args)
    train_dataset, eval_dataset = build_datasets(args, training_args.seed)
    if args.lora:
        # LoRA on the backbone only (the LM head of MNTP shares it); folded back into the weights before saving.
        encoder.model = apply_lora(encoder.model, args.lora_r, args.lora_alpha, args.lora_dropout)
    if args.stage == "mntp":
        tokenizer = encoder.tokenizer
        max_length = encoder.config.max_seq_length

        def tokenize(batch):
            return tokenizer(batch["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True)

        train_dataset = train_dataset.map(tokenize, batched=True, remove_columns=["text"])
        eval_dataset = eval_dataset.map(tokenize, batched=True, remove_columns=["text"]) if len(eval_dataset) else None
        collator = mntp_collator(tokenizer, args.mask_probability, args.mask_token, seed=training_args.seed)
        trainer = Trainer(
            model=mntp_model_for(encoder), args=training_args, train_dataset=train_dataset,
            eval_dataset=eval_dataset, data_collator=collator,
        )
    else:
        if args.stage == "simcse":
            set_attention_dropout(encoder, args.simcse_dropout)
        trainer = train_contrastive(args, training_args, encoder, train_dataset, eval_dataset)
    if args.stop_after_steps:
        trainer.add_callback(StopAfterSteps(args.stop_after_steps))
    resume_from = last_complete_checkpoint(training_args.output_dir, remove_incomplete=True) if args.resume else None
    if args.time_budget_minutes:
        if resume_from:
            raise InputError(f"--time_budget_minutes cannot resume {resume_from}: its schedule follows one run's "
                             "clock. Start again without --resume, or resume without the budget and with --max_steps.")
        trainer.add_callback(TrainingTimeBudget(args.time_budget_minutes))
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    if args.lora:
        encoder.model = encoder.model.merge_and_unload()
    final = None
    if trainer.is_world_process_zero():
        final = save_pretrained_atomically(training_args.output_dir, encoder)
        # What a time-budgeted run reached, for the model card (trainer_state.json is only in checkpoints).
        atomic_write_json(os.path.join(training_args.output_dir, "train_summary.json"), {
            "global_step": train_output.global_step, "minutes": round(train_output.metrics["train_runtime"] / 60, 2),
            "time_budget_minutes": args.time_budget_minutes,
        }, indent=2)
        print(f"saved the trained encoder to {final}")
    return final


if __name__ == "__main__":
    try:
        main()
    except LLM2CLIP4CXRError as error:  # bad input: one line, not a traceback
        sys.exit(f"error: {error}")
