"""`llm2clip4cxr encode`: embed reports into a .npy, .safetensors or .parquet file, in resumable chunks; with
`--engine ray`, on Ray workers (into such a file, or a folder of parquet shards)."""

import json
import shutil
from pathlib import Path

from ..errors import InputError
from . import common

EMBEDDING_SUFFIXES = (".npy", ".safetensors", ".parquet")


def register(commands) -> None:
    parser = commands.add_parser(
        "encode", help="embed reports into a file",
        description="Embed reports (arguments, or a CSV column) and save their float32 embeddings (as model.encode "
        "returns them); the format follows the --output suffix: .npy (array), .safetensors (tensor 'embeddings', "
        "ids in the metadata) or .parquet (columns id, text, embedding; needs pyarrow).",
        parents=[common.csv_options(required=False), common.model_options(), common.TRUST, common.CHUNKS,
                 common.NO_WAIT, common.ENGINE, common.JSON],
    )
    parser.add_argument("texts", nargs="*", help="report texts (or use --csv)")
    parser.add_argument("--output", required=True, help="the embeddings file: .npy, .safetensors or .parquet")
    parser.set_defaults(handler=run)


def run(args) -> int:
    common.check_engine_options(args)
    output = Path(args.output)
    if args.engine == "ray" and output.suffix not in EMBEDDING_SUFFIXES:
        return run_to_shards(args, output)
    if output.suffix not in EMBEDDING_SUFFIXES:
        raise ValueError(f"--output {output}: the suffix must be one of {EMBEDDING_SUFFIXES}, got {output.suffix!r} "
                         "(with --engine ray, a folder of parquet shards is also possible).")
    work_dir = common.work_dir(args, output)
    common.refuse_outputs_over_inputs(
        {"--output": output, "--work-dir": work_dir}, {"--csv": args.csv, "--model": args.model}
    )
    common.create_parent(output)
    with common.output_lock(args, output):
        dataset = common.input_texts(args)
        encode = _local_encoder(args) if args.engine == "local" else None
        with common.output_lock(args, work_dir):  # held until the work folder is gone
            ray_encoder = common.ray_text_encoder(args, args.instruction, normalize=False) if encode is None else None
            embeddings = common.embed_collection(dataset, encode, args, work_dir, ray_encoder)
            write_embeddings(output, embeddings, dataset)
            dim = int(embeddings.shape[1])
            del embeddings  # release the memory map before its folder goes
            shutil.rmtree(work_dir)
    summary = {"output": str(output), "num_texts": len(dataset), "dim": dim}
    print(json.dumps(summary) if args.json else f"wrote {len(dataset)} x {dim} embeddings to {output}")
    return common.EXIT_OK


def _local_encoder(args):
    """texts -> embeddings as `model.encode` returns them, in this process."""
    model = common.load_text_encoder(args.model, args.trust_remote_code)

    def encode(texts):
        return model.encode(
            texts, instruction=args.instruction, batch_size=args.batch_size, convert_to_numpy=True,
            show_progress_bar=False,
        )

    return encode


def run_to_shards(args, output: Path) -> int:
    """`encode --engine ray` into a folder: its parquet shards (id, text hash, embedding) are the result."""
    common.refuse_outputs_over_inputs({"--output": output}, {"--csv": args.csv, "--model": args.model})
    if args.work_dir:
        raise InputError("--work-dir is for a file --output; a folder --output holds the shards itself.")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: a file without an embeddings suffix; give a folder or a "
                         f"{'/'.join(EMBEDDING_SUFFIXES)} file.")
    common.create_parent(output)
    with common.output_lock(args, output):
        dataset = common.input_texts(args)
        ray_encoder = common.ray_text_encoder(args, args.instruction, normalize=False)
        dim = common.ray_embed(dataset, args, output, ray_encoder)["dim"]
    summary = {"output": str(output), "num_texts": len(dataset), "dim": dim}
    print(json.dumps(summary) if args.json else
          f"wrote {len(dataset)} x {dim} embeddings as parquet shards in {output}")
    return common.EXIT_OK


def write_embeddings(output: Path, embeddings, dataset) -> None:
    """Write `embeddings` (rows of `dataset`) in the format of `output`'s suffix, atomically."""
    import numpy as np

    from ..fileio import atomic_write

    if output.suffix == ".npy":
        atomic_write(output, lambda path: np.save(path, embeddings))
    elif output.suffix == ".safetensors":
        from safetensors.numpy import save_file

        array, metadata = np.ascontiguousarray(embeddings), {"ids": json.dumps(list(dataset["id"]))}
        atomic_write(output, lambda path: save_file({"embeddings": array}, str(path), metadata=metadata))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"id": list(dataset["id"]), "text": list(dataset["text"]), "embedding": list(np.asarray(embeddings))}
        table = pa.table(columns)
        atomic_write(output, lambda path: pq.write_table(table, path))
