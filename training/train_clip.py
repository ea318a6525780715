"""Train an LLM2CLIP4CXR image-report model CLIP-style (Trainer recipe).

NO REAL PAIRED DATA SHIPS WITH THIS PROJECT: the Open-I reports beside it come without their images,
so this recipe has only been run on fabricated pairings (the smoke test gives the sample X-rays made-up
reports). Bring your own image-report pairs (e.g. MIMIC-CXR under its licence).

Data: a folder written by `llm2clip4cxr prepare` (its train split; see docs/data.md), or a CSV or JSONL
file with an `image` column (path, relative to the data file's folder unless
absolute; PNG/JPEG/DICOM, read with `llm2clip4cxr.data.imaging.load_image`), `findings` and/or `impression`
columns and an optional integer `label` (class id, 0 = normal) for `--sup_con_weight` / `--bce_weight`.

    # start from a trained LLM2Vec4CXR text tower and a vision checkpoint (or a vision config JSON)
    python training/train_clip.py --text_model_name_or_path runs/contrastive/model --vision PATH_OR_CONFIG_JSON \
        --data pairs.csv --output_dir runs/clip --freeze_text --cache_text_embeddings --max_steps 1000
    # or continue an LLM2CLIP4CXR checkpoint, LoRA on the text tower
    python training/train_clip.py --model_name_or_path runs/clip/model --data pairs.csv --lora_text ...
    # resume an interrupted run from its last complete checkpoint: add --resume

With `--freeze_text --cache_text_embeddings` each caption is built once (seeded) and the text tower runs
once over the dataset before training (`<output_dir>/text_embeddings.safetensors`, reused on resume);
otherwise captions are redrawn every time a row is seen. The trained model and its processor are written
to `<output_dir>/model` (atomically: a complete folder or none).
"""

import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import AutoModel, AutoProcessor

from llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor  # registers Auto classes
from llm2clip4cxr.errors import InputError, LLM2CLIP4CXRError
from llm2clip4cxr.training.clip import (
    ClipCollator,
    ClipTrainer,
    ClipTrainingModel,
    apply_text_lora,
    build_caption,
    cache_text_embeddings,
)
from llm2clip4cxr.training.recipe import last_complete_checkpoint, parse_recipe_arguments, save_pretrained_atomically


@dataclass
class RecipeArguments:
    data: str = field(metadata={"help": "CSV or JSONL with image, findings/impression[, label] columns, or a folder "
                                        "written by `llm2clip4cxr prepare` (its train split)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "LLM2CLIP4CXR checkpoint to continue"})
    text_model_name_or_path: str | None = field(default=None, metadata={"help": "LLM2Vec4CXR checkpoint (new model)"})
    vision: str | None = field(
        default=None, metadata={"help": "vision checkpoint folder, or a vision config JSON file (random init)"}
    )
    projection_dim: int = 512
    image_size: int = field(default=224, metadata={"help": "square canvas of a new processor"})
    instruction: str | None = field(
        default=None, metadata={"help": "prepended to every caption (attended to, not pooled)"}
    )
    shuffle_p: float = field(default=0.3, metadata={"help": "probability of shuffling a caption's sentences"})
    freeze_text: bool = field(default=False, metadata={"help": "freeze the text tower (its projection still trains)"})
    cache_text_embeddings: bool = field(
        default=False, metadata={"help": "with --freeze_text: run the text tower once, not every step"}
    )
    text_cache_batch_size: int = 32
    lora_text: bool = field(
        default=False, metadata={"help": "LoRA (q/k/v/o) on the text tower instead of full training"}
    )
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    sup_con_weight: float = field(
        default=0.0, metadata={"help": "weight of the supervised-contrastive term (needs label)"}
    )
    sup_con_temperature: float = 0.07
    bce_weight: float = field(default=0.0, metadata={"help": "weight of the normal/abnormal BCE term (needs label)"})
    resume: bool = field(default=False, metadata={"help": "resume from the last complete checkpoint in output_dir"})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.text_model_name_or_path is None):
            raise InputError("Pass exactly one of --model_name_or_path and --text_model_name_or_path (with --vision).")
        if self.text_model_name_or_path is not None and self.vision is None:
            raise InputError("--text_model_name_or_path needs --vision (a vision checkpoint or config JSON).")
        if self.cache_text_embeddings and (not self.freeze_text or self.lora_text):
            raise InputError(
                "--cache_text_embeddings needs a frozen text tower: add --freeze_text and drop --lora_text."
            )
        if self.freeze_text and self.lora_text:
            raise InputError("--freeze_text and --lora_text exclude each other (LoRA trains the text tower).")


def read_rows(path: str) -> list[dict]:
    """Rows of the data file, image paths made absolute (relative ones are relative to the file)."""
    path = Path(path)
    if path.is_dir():  # a prepared folder: load_prepared gives absolute image paths
        from llm2clip4cxr.data import load_prepared

        rows = load_prepared(path, split="train").to_list()
        if rows and "image" not in rows[0]:
            raise InputError(f"{path} has no `image` column (prepared with --unit study or --text-only); "
                             "CLIP training needs one row per image: prepare it with --unit image.")
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".csv":
        rows = datasets.Dataset.from_csv(str(path), keep_in_memory=True).to_list()
    else:
        raise InputError(f"--data must be a .csv or .jsonl file or a prepared folder, got {path.name!r}.")
    if not rows or "image" not in rows[0] or not {"findings", "impression"} & rows[0].keys():
        raise InputError(
            f"{path} needs an `image` column and `findings` and/or `impression`; "
            f"got {sorted(rows[0]) if rows else 'no rows'}."
        )
    for index, row in enumerate(rows):
        row["image"] = str(path.parent / row["image"])  # an absolute path stays as it is
        row["index"] = index
    return rows


def load_model_and_processor(args: RecipeArguments):
    if args.model_name_or_path is not None:
        return AutoModel.from_pretrained(args.model_name_or_path), AutoProcessor.from_pretrained(
            args.model_name_or_path
        )
    vision = args.vision
    if os.path.isfile(vision):  # a config JSON: a randomly initialised tower
        vision = json.loads(Path(vision).read_text())
    model = LLM2CLIP4CXRModel.from_text_vision_pretrained(
        args.text_model_name_or_path, vision, projection_dim=args.projection_dim
    )
    text_config = model.config.text_config
    processor = LLM2CLIP4CXRProcessor(
        LLM2CLIP4CXRImageProcessor(size={"height": args.image_size, "width": args.image_size}),
        model.text_model.tokenizer,
        instruction_separator=text_config.instruction_separator,
        max_seq_length=text_config.max_seq_length,
        embed_mask_rule=text_config.embed_mask_rule,
        default_instruction=args.instruction if args.instruction is not None else text_config.default_instruction,
    )
    return model, processor


def main(argv=None) -> str | None:
    args, training_args = parse_recipe_arguments(RecipeArguments, argv)
    transformers.set_seed(training_args.seed)

    model, processor = load_model_and_processor(args)
    rows = read_rows(args.data)
    if args.freeze_text:
        model.text_model.requires_grad_(False)
    if args.lora_text:
        model = apply_text_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)

    text_embeddings = None
    if args.cache_text_embeddings:
        # Fixed captions: the cache holds one embedding per row.
        rng = random.Random(training_args.seed)
        captions = [
            build_caption(
                row.get("findings"), row.get("impression"), rng, instruction=args.instruction,
                shuffle_p=args.shuffle_p, instruction_separator=processor.instruction_separator,
            )
            for row in rows
        ]
        with training_args.main_process_first(desc="caching text embeddings"):  # rank 0 writes, others read
            text_embeddings = cache_text_embeddings(
                model, captions, args.text_cache_batch_size,
                path=os.path.join(training_args.output_dir, "text_embeddings.safetensors"), processor=processor,
            )

    collator = ClipCollator(
        processor, instruction=args.instruction, shuffle_p=args.shuffle_p, text_embeddings=text_embeddings,
        seed=training_args.seed,
    )
    trainer = ClipTrainer(
        model=ClipTrainingModel(model, abnormal_head=args.bce_weight > 0),
        args=training_args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=collator,
        sup_con_weight=args.sup_con_weight,
        sup_con_temperature=args.sup_con_temperature,
        bce_weight=args.bce_weight,
    )
    resume_from = last_complete_checkpoint(training_args.output_dir, remove_incomplete=True) if args.resume else None
    trainer.train(resume_from_checkpoint=resume_from)
    if args.lora_text:
        model = model.merge_and_unload()
    final = None
    if trainer.is_world_process_zero():
        final = save_pretrained_atomically(training_args.output_dir, model, processor)
        print(f"saved the trained model and processor to {final}")
    return final


if __name__ == "__main__":
    try:
        main()
    except LLM2CLIP4CXRError as error:  # bad input: one line, not a traceback
        sys.exit(f"error: {error}")
