"""What the subcommands share: the options several of them take (argparse parent parsers, so each is declared
once), and the steps around their work: refusing an output that would overwrite an input, taking the output's
lock, loading the text encoder, reading texts, writing the result.

Everything heavy (torch, transformers, datasets, faiss) is imported inside the function that needs it, so
building the parser, and with it every --help, stays fast.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from ..defaults import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHTS, FUSION_METHODS
from ..errors import InputError
from ..fileio import atomic_write_text
from ..fileio import output_lock as _output_lock

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130

INSTRUCTION_HELP = (
    "instruction prepended to every report and pooled out (default: the one the model was trained with; "
    '"" for none)'
)
TRUST_HELP = (
    "let the model folder run Python code it ships (never needed for checkpoints of this package; without it "
    "such a folder is refused)"
)


# ----------------------------------------------------------------------------------------------- option types


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def _finite_float(accept, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (accept(value) and value < float("inf")):  # also refuses nan: every comparison with it is False
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_float = _finite_float(lambda value: value > 0, "a positive number")
non_negative_float = _finite_float(lambda value: value >= 0, "a number >= 0")


class _FusionWeights(argparse.Action):
    """Two weights, refused at parse time when both are 0 (before any model is loaded)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not any(values):
            parser.error(f"{option_string}: the dense and lexical weights cannot both be 0.")
        setattr(namespace, self.dest, tuple(values))


# ----------------------------------------------------------------------------------------------- shared options


def parent_parser() -> argparse.ArgumentParser:
    """An empty parent parser: options added to it go into every parser given it in `parents=[...]`."""
    return argparse.ArgumentParser(add_help=False)


# Pass these as `parents=[...]` to `add_parser`: the same options, the same help, in every command.
JSON = parent_parser()
JSON.add_argument("--json", action="store_true", help='print JSON for machines (an error too: {"error", "kind"})')

OUTPUT = parent_parser()
OUTPUT.add_argument("--output", help="write the result to this file instead of stdout")

TRUST = parent_parser()
TRUST.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

TOP_K = parent_parser()
TOP_K.add_argument("--top-k", type=positive_int, default=5, help="results per query (default: 5)")

NO_WAIT = parent_parser()
NO_WAIT.add_argument(
    "--no-wait", action="store_true",
    help="if another run is writing the same output (or work folder), fail at once instead of waiting for it",
)

CHUNKS = parent_parser()
CHUNKS.add_argument(
    "--chunk-size", type=positive_int, default=10_000,
    help="texts per chunk file: a killed run resumes from its finished chunks (default: 10000)",
)
CHUNKS.add_argument(
    "--work-dir",
    help="folder for the chunk files until the run completes (default: OUTPUT.chunks beside --output; with "
    "--backend qdrant, qdrant-COLLECTION.chunks in the current folder)",
)

# Where the embedding runs: in this process, or on Ray workers (retrieval.ray_engine, docs/scale.md).
ENGINE = parent_parser()
ENGINE.add_argument(
    "--engine", choices=("local", "ray"), default="local",
    help="local: embed in this process (default); ray: on Ray Data workers that each load the model once, "
    "in resumable parquet shards of --chunk-size rows (needs llm2clip4cxr[ray]; docs/scale.md)",
)
ENGINE.add_argument(
    "--address", help="with --engine ray: the Ray cluster, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, "
    "else a local Ray started for this command)",
)
ENGINE.add_argument(
    "--num-workers", type=positive_int,
    help="with --engine ray: embedding workers (default: as many as the cluster's GPUs, or CPUs, allow)",
)
ENGINE.add_argument(
    "--num-gpus-per-worker", type=positive_float,
    help="with --engine ray: GPUs per worker, e.g. 1, or 0.5 for two workers per GPU (default: CPU workers)",
)

HYBRID = parent_parser()
HYBRID.add_argument(
    "--hybrid", action="store_true",
    help="fuse the dense ranking with BM25 (bm25s): scores become fusion scores (docs/retrieval.md)",
)
HYBRID.add_argument(
    "--fusion", choices=FUSION_METHODS, default=DEFAULT_FUSION,
    help=f"--hybrid fusion: min-max normalised scores, z-scores or reciprocal-rank (k=60); default {DEFAULT_FUSION}",
)
HYBRID.add_argument(
    "--fusion-weights", nargs=2, type=non_negative_float, metavar=("DENSE", "LEXICAL"),
    default=DEFAULT_FUSION_WEIGHTS, action=_FusionWeights,
    help="--hybrid weights of the dense and the BM25 side, not both 0 (default: %(default)s, chosen on "
    "development studies: docs/retrieval.md)",
)


def model_options(
    model_help: str = "a saved LLM2Vec4CXR checkpoint directory (default: the shipped LLM2Vec4CXR-tiny)",
    instruction_help: str = INSTRUCTION_HELP,
    batch_size: int = 32,
    required: bool = False,
) -> argparse.ArgumentParser:
    """--model, --instruction and --batch-size, with the defaults of one command."""
    options = parent_parser()
    options.add_argument("--model", required=required, help=model_help)
    options.add_argument("--instruction", default=None, help=instruction_help)
    options.add_argument("--batch-size", type=positive_int, default=batch_size)
    return options


def csv_options(required: bool) -> argparse.ArgumentParser:
    """--csv, --column and --id-column: the report texts of a table file."""
    options = parent_parser()
    options.add_argument("--csv", required=required, help="a UTF-8 CSV file with a header row")
    options.add_argument(
        "--column", default="findings", help="the CSV column holding the report texts (default: findings)"
    )
    options.add_argument(
        "--id-column",
        default=None,
        help="the CSV column holding unique ids (default: the position among non-empty rows)",
    )
    return options


# ----------------------------------------------------------------------------------------------- around the work


def command_name(args) -> str:
    """The subcommand as typed ("index build"), for messages."""
    parts = [args.command] + [getattr(args, key, None) for key in ("index_command", "direction", "convert_kind")]
    return " ".join(part for part in parts if part)


def waiting_message(args):
    """What to tell the user before waiting for another run's output lock."""

    def tell(lock_file: Path) -> None:
        print(f"llm2clip4cxr {command_name(args)}: another run is writing this output (lock {lock_file}); "
              "waiting for it to finish (--no-wait fails instead)", file=sys.stderr)

    return tell


def output_lock(args, target: Path, inside: bool = False):
    """`fileio.output_lock` of `target`, waiting (with a message) unless --no-wait."""
    return _output_lock(target, wait=not args.no_wait, inside=inside, on_wait=waiting_message(args))


def refuse_outputs_over_inputs(outputs: dict, inputs: dict) -> None:
    """Refuse an output that is an input, or lies inside an input folder (writing it would change the
    input), or a work folder (deleted at the end) that holds an input. Keys name the arguments."""

    def resolved(value):
        return [Path(value).resolve()] if isinstance(value, (str, os.PathLike)) else [Path(v).resolve() for v in value]

    for out_name, out in outputs.items():
        if out is None:
            continue
        target = Path(out).resolve()
        for in_name, given in inputs.items():
            if given is None:
                continue
            for source in resolved(given):
                same = target == source or (target.exists() and source.exists() and os.path.samefile(target, source))
                if same or source in target.parents:
                    raise InputError(
                        f"{out_name} {out} {'is' if same else 'lies inside'} the input {in_name} {source}; writing it "
                        "would change the input: choose another output path."
                    )
                if out_name == "--work-dir" and target in source.parents:
                    raise InputError(
                        f"--work-dir {out} holds the input {in_name} {source} and is deleted when the run ends: "
                        "choose another work folder."
                    )


def create_parent(output) -> None:
    """Create the folder of an output file now, so a missing or unwritable one fails before any model work."""
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)


def emit(args, payload: dict, text: str) -> int:
    """Print (or write to --output, atomically) `payload` as JSON with --json, else `text`."""
    out = json.dumps(payload, indent=2) if args.json else text
    if getattr(args, "output", None):
        atomic_write_text(args.output, out + "\n")
    else:
        print(out)
    return EXIT_OK


def quiet(load, *args):
    """Call a model loader with transformers' logging and progress bars off (stderr is for the user)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return load(*args)


def load_text_encoder(model_path: str | None, trust_remote_code: bool = False):
    """The checkpoint at `model_path`, else the default encoder shipped in the package."""
    from .. import LLM2Vec4CXRModel
    from ..checkpoints import check_model_folder, remote_code_guard
    from ..defaults import load_default_text_encoder

    if model_path is None:
        return quiet(load_default_text_encoder)
    path = check_model_folder(model_path, "--model", "LLM2Vec4CXR checkpoint")
    with remote_code_guard(path, trust_remote_code) as remote:
        return quiet(lambda: LLM2Vec4CXRModel.from_pretrained(path, **remote)).eval()


def text_encoder(model, instruction, batch_size):
    """texts -> float32 (n, d) L2-normalised embeddings (the cosine space `similarity` also uses)."""
    from ..retrieval.encoders import llm2vec_encoder

    return llm2vec_encoder(model, instruction=instruction, batch_size=batch_size)


def read_texts(path, column: str, id_column: str | None = None, extra_columns=()):
    """The non-empty cells of `column` as a `datasets.Dataset` with columns id, text and `extra_columns`."""
    from ..data.tables import load_text_dataset

    if not Path(path).is_file():
        raise FileNotFoundError(f"--csv {path}: no such file.")
    return load_text_dataset(path, column, id_column, extra_columns)


def input_texts(args):
    """Texts from the positional arguments or from `--csv FILE --column COL`, as a `datasets.Dataset`."""
    import datasets

    if args.csv:
        if args.texts:
            raise ValueError("give texts as arguments or with --csv, not both.")
        return read_texts(args.csv, args.column, getattr(args, "id_column", None))
    texts = [text for text in args.texts if text.strip()]
    if not texts:
        raise ValueError("no input text: give texts as arguments or --csv FILE --column COL.")
    return datasets.Dataset.from_dict({"id": [str(i) for i in range(len(texts))], "text": texts})


def work_dir(args, output: Path) -> Path:
    """Where chunks are kept until the run completes: --work-dir, else `<output>.chunks` beside the output."""
    return Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".chunks")


def encoder_name(args) -> str:
    """What the embeddings depend on besides the texts; a resumed run must match it."""
    model = str(Path(args.model).resolve()) if args.model else "default"
    return json.dumps({"model": model, "instruction": args.instruction, "normalized": args.command != "encode"})


def embed_collection(dataset, encode, args, folder: Path, ray_encoder=None):
    """Embed `dataset["text"]` in resumable chunks under `folder` (removed once the result is used): in this
    process with `encode`, or with `--engine ray` on Ray workers that build `ray_encoder` (joined into one
    memory-mapped array in `folder`)."""
    from ..retrieval.embedding import EMBEDDINGS_FILE, embed_in_chunks

    if args.engine == "ray":
        from ..retrieval.ray_engine import read_shards

        ray_embed(dataset, args, folder, ray_encoder)
        return read_shards(folder, out=folder / EMBEDDINGS_FILE)[1]
    return embed_in_chunks(
        dataset, encode, folder, chunk_size=args.chunk_size, encoder_name=encoder_name(args), progress=not args.json
    )


# ----------------------------------------------------------------------------------------------- --engine ray


def check_engine_options(args) -> None:
    """Refuse the Ray options without --engine ray, so none is silently ignored."""
    if args.engine != "ray":
        given = [flag for flag, value in (("--address", args.address), ("--num-workers", args.num_workers),
                                          ("--num-gpus-per-worker", args.num_gpus_per_worker)) if value is not None]
        if given:
            raise InputError(f"{given[0]} needs --engine ray.")


def ray_embed(dataset, args, output_dir: Path, ray_encoder) -> dict:
    """`retrieval.ray_engine.embed_with_ray` with the command's --chunk-size and Ray options."""
    from ..retrieval.ray_engine import embed_with_ray

    return embed_with_ray(
        dataset, ray_encoder, output_dir, rows_per_shard=args.chunk_size, encoder_name=encoder_name(args),
        num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker or 0, address=args.address,
        progress=not args.json,
    )


def ray_text_encoder(args, instruction, normalize: bool):
    """What each Ray worker loads: the model of --model (else the shipped default), as this process would."""
    from ..checkpoints import check_model_folder
    from ..retrieval.ray_engine import TextEncoder

    # Checked here too, so a missing folder fails before Ray starts (the workers need it at the same path).
    model = str(check_model_folder(args.model, "--model", "LLM2Vec4CXR checkpoint").resolve()) if args.model else None
    return TextEncoder(model, instruction, args.batch_size, normalize=normalize,
                       trust_remote_code=args.trust_remote_code)
