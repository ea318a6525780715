"""The `llm2clip4cxr` command line.

Errors: an expected failure (bad input, a damaged file, a busy output: `LLM2CLIP4CXRError`, and the
ValueError / OSError / ImportError that libraries raise for bad input) prints one line,
`llm2clip4cxr <command>: error: <message naming the file or argument>`, and exits 1; anything else
prints one line plus "rerun with --debug for the traceback" and exits 1; `--debug` prints the traceback.
With `--json` the error is instead a JSON object on stdout, `{"error": ..., "kind": ...}` (usage errors
too, with exit code 2).
"""

import argparse
import contextvars
import json
import os
import sys
import traceback
from pathlib import Path

from .errors import InputError, LLM2CLIP4CXRError
from .fileio import atomic_write, output_lock

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130

# Errors that mean "the input or the environment is wrong", not "the program is wrong".
EXPECTED_ERRORS = (LLM2CLIP4CXRError, ValueError, OSError, ImportError)
_BUILTIN_KINDS = (
    (FileNotFoundError, "not-found"), (FileExistsError, "exists"), (PermissionError, "permission"),
    (ImportError, "missing-dependency"), (OSError, "os"), (ValueError, "input"),
)
# Whether the command line asked for --json: argparse's own errors are then JSON too.
_JSON_ERRORS = contextvars.ContextVar("json_errors", default=False)


class _Parser(argparse.ArgumentParser):
    """argparse with `--debug` on every (sub)command and usage errors as JSON when `--json` was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand's default must not reset a `--debug` given before the subcommand.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="on an error, print the full traceback")

    def error(self, message):
        if _JSON_ERRORS.get():
            print(json.dumps({"error": f"{self.prog}: {message}", "kind": "usage"}))
            sys.exit(EXIT_USAGE)
        super().error(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _load_text_encoder(model_path: str | None, trust_remote_code: bool = False):
    """The checkpoint at `model_path`, else the default encoder shipped in the package."""
    from . import LLM2Vec4CXRModel
    from .checkpoints import check_model_folder, remote_code_guard
    from .defaults import load_default_text_encoder

    if model_path is None:
        return _quiet(load_default_text_encoder)
    path = check_model_folder(model_path, "--model", "LLM2Vec4CXR checkpoint")
    with remote_code_guard(path, trust_remote_code) as remote:
        return _quiet(lambda: LLM2Vec4CXRModel.from_pretrained(path, **remote)).eval()


def _inputs_and_outputs(outputs: dict, inputs: dict) -> None:
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


def _waiting_message(args):
    def tell(lock_file: Path) -> None:
        print(f"llm2clip4cxr {_command_name(args)}: another run is writing this output (lock {lock_file}); "
              "waiting for it to finish (--no-wait fails instead)", file=sys.stderr)
    return tell


def _output_lock(args, target: Path, inside: bool = False):
    return output_lock(target, wait=not args.no_wait, inside=inside, on_wait=_waiting_message(args))


def _similarity(args) -> int:
    from .tables import read_text_lines

    _inputs_and_outputs({"--output": args.output}, {"--file": args.file, "--model": args.model})
    _create_parent(args.output)
    reports = list(args.reports)
    if args.file:
        reports += [line.strip() for line in read_text_lines(args.file) if line.strip()]
    if len(reports) < 2:
        raise ValueError("give at least two reports (as arguments or with --file) to compare.")
    model = _load_text_encoder(args.model, args.trust_remote_code)
    embeddings = _embed(model, reports, args.instruction, args.batch_size)
    scores = (embeddings @ embeddings.T).tolist()
    lines = [f"[{i}] {report}" for i, report in enumerate(reports)]
    lines.append("")
    lines.append("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(reports))))
    lines += [f"{f'[{i}]':>5} " + "".join(f"{value:8.3f}" for value in row) for i, row in enumerate(scores)]
    return _emit(args, {"reports": reports, "cosine_similarity": scores}, "\n".join(lines))


def _read_texts(path, column: str, id_column: str | None = None, extra_columns=()):
    """The non-empty cells of `column` as a `datasets.Dataset` with columns id, text and `extra_columns`."""
    from .embedding import load_text_dataset

    if not Path(path).is_file():
        raise FileNotFoundError(f"--csv {path}: no such file.")
    return load_text_dataset(path, column, id_column, extra_columns)


def _input_texts(args):
    """Texts from the positional arguments or from `--csv FILE --column COL`, as a `datasets.Dataset`."""
    import datasets

    if args.csv:
        if args.texts:
            raise ValueError("give texts as arguments or with --csv, not both.")
        return _read_texts(args.csv, args.column, getattr(args, "id_column", None))
    texts = [text for text in args.texts if text.strip()]
    if not texts:
        raise ValueError("no input text: give texts as arguments or --csv FILE --column COL.")
    return datasets.Dataset.from_dict({"id": [str(i) for i in range(len(texts))], "text": texts})


def _embed_collection(dataset, encode, args, work_dir: Path, encoder_name: str, ray_encoder=None):
    """Embed `dataset["text"]` in resumable chunks under `work_dir` (removed once the result is used): in this
    process with `encode`, or with `--engine ray` on Ray workers that build `ray_encoder` (joined into one
    memory-mapped array in `work_dir`)."""
    from .embedding import EMBEDDINGS_FILE, embed_in_chunks

    if args.engine == "ray":
        from .ray_engine import read_shards

        _ray_embed(dataset, args, work_dir, encoder_name, ray_encoder)
        return read_shards(work_dir, out=work_dir / EMBEDDINGS_FILE)[1]
    return embed_in_chunks(
        dataset, encode, work_dir, chunk_size=args.chunk_size, encoder_name=encoder_name, progress=not args.json
    )


def _ray_embed(dataset, args, output_dir: Path, encoder_name: str, ray_encoder) -> dict:
    from .ray_engine import embed_with_ray

    return embed_with_ray(
        dataset, ray_encoder, output_dir, rows_per_shard=args.chunk_size, encoder_name=encoder_name,
        num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker or 0, address=args.address,
        progress=not args.json,
    )


def _ray_text_encoder(args, instruction, normalize: bool):
    """What each Ray worker loads: the model of --model (else the shipped default), as this process would."""
    from .checkpoints import check_model_folder
    from .ray_engine import TextEncoder

    # Checked here too, so a missing folder fails before Ray starts (the workers need it at the same path).
    model = str(check_model_folder(args.model, "--model", "LLM2Vec4CXR checkpoint").resolve()) if args.model else None
    return TextEncoder(model, instruction, args.batch_size, normalize=normalize,
                       trust_remote_code=args.trust_remote_code)


def _check_engine_options(args) -> None:
    if args.engine != "ray":
        given = [flag for flag, value in (("--address", args.address), ("--num-workers", args.num_workers),
                                          ("--num-gpus-per-worker", args.num_gpus_per_worker)) if value is not None]
        if given:
            raise InputError(f"{given[0]} needs --engine ray.")


def _normalized_encoder(model, instruction, batch_size):
    """texts -> float32 (n, d) L2-normalised embeddings (the cosine space `similarity` also uses)."""
    from .evaluation.report_tasks import llm2vec_encoder

    return llm2vec_encoder(model, instruction=instruction, batch_size=batch_size)


def _embed(model, texts, instruction, batch_size):
    return _normalized_encoder(model, instruction, batch_size)(texts)


def _emit(args, payload: dict, text: str) -> int:
    """Print (or write to --output, atomically) `payload` as JSON with --json, else `text`."""
    out = json.dumps(payload, indent=2) if args.json else text
    if getattr(args, "output", None):
        atomic_write(args.output, lambda path: path.write_text(out + "\n", encoding="utf-8"))
    else:
        print(out)
    return EXIT_OK


def _create_parent(output) -> None:
    """Create the folder of an output file now, so a missing or unwritable one fails before any model work."""
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)


_EMBEDDING_SUFFIXES = (".npy", ".safetensors", ".parquet")


def _encode(args) -> int:
    import shutil

    _check_engine_options(args)
    output = Path(args.output)
    if args.engine == "ray" and output.suffix not in _EMBEDDING_SUFFIXES:
        return _encode_to_shards(args, output)
    if output.suffix not in _EMBEDDING_SUFFIXES:
        raise ValueError(f"--output {output}: the suffix must be one of {_EMBEDDING_SUFFIXES}, got {output.suffix!r} "
                         "(with --engine ray, a folder of parquet shards is also possible).")
    work_dir = _work_dir(args, output)
    _inputs_and_outputs({"--output": output, "--work-dir": work_dir}, {"--csv": args.csv, "--model": args.model})
    _create_parent(output)
    with _output_lock(args, output):
        dataset = _input_texts(args)
        encode = None
        if args.engine == "local":
            model = _load_text_encoder(args.model, args.trust_remote_code)

            def encode(texts):
                return model.encode(
                    texts, instruction=args.instruction, batch_size=args.batch_size, convert_to_numpy=True,
                    show_progress_bar=False,
                )

        with _output_lock(args, work_dir):  # held until the work folder is gone
            ray_encoder = _ray_text_encoder(args, args.instruction, normalize=False) if args.engine == "ray" else None
            embeddings = _embed_collection(dataset, encode, args, work_dir, _encoder_name(args), ray_encoder)
            _write_embeddings(output, embeddings, dataset)
            dim = int(embeddings.shape[1])
            del embeddings  # release the memory map before its folder goes
            shutil.rmtree(work_dir)
    summary = {"output": str(output), "num_texts": len(dataset), "dim": dim}
    print(json.dumps(summary) if args.json else f"wrote {len(dataset)} x {dim} embeddings to {output}")
    return EXIT_OK


def _encode_to_shards(args, output: Path) -> int:
    """`encode --engine ray` into a folder: its parquet shards (id, text hash, embedding) are the result."""
    _inputs_and_outputs({"--output": output}, {"--csv": args.csv, "--model": args.model})
    if args.work_dir:
        raise InputError("--work-dir is for a file --output; a folder --output holds the shards itself.")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: a file without an embeddings suffix; give a folder or a "
                         f"{'/'.join(_EMBEDDING_SUFFIXES)} file.")
    _create_parent(output)
    with _output_lock(args, output):
        dataset = _input_texts(args)
        summary = _ray_embed(dataset, args, output, _encoder_name(args),
                             _ray_text_encoder(args, args.instruction, normalize=False))
    summary = {"output": str(output), "num_texts": len(dataset), "dim": summary["dim"]}
    print(json.dumps(summary) if args.json else
          f"wrote {len(dataset)} x {summary['dim']} embeddings as parquet shards in {output}")
    return EXIT_OK


def _write_embeddings(output: Path, embeddings, dataset) -> None:
    """Write `embeddings` (rows of `dataset`) in the format of `output`'s suffix, atomically."""
    import numpy as np

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


def _work_dir(args, output: Path) -> Path:
    """Where chunks are kept until the run completes: --work-dir, else `<output>.chunks` beside the output."""
    return Path(args.work_dir) if args.work_dir else output.with_name(output.name + ".chunks")


def _encoder_name(args) -> str:
    """What the embeddings depend on besides the texts; a resumed run must match it."""
    model = str(Path(args.model).resolve()) if args.model else "default"
    return json.dumps({"model": model, "instruction": args.instruction, "normalized": args.command != "encode"})


def _similar(args) -> int:
    if not args.query.strip():
        raise ValueError("the query is empty.")
    _inputs_and_outputs({"--output": args.output}, {"--csv": args.csv, "--model": args.model})
    _create_parent(args.output)
    dataset = _read_texts(args.csv, args.column, args.id_column)
    ids, texts = list(dataset["id"]), list(dataset["text"])
    model = _load_text_encoder(args.model, args.trust_remote_code)
    corpus = _embed(model, texts, args.instruction, args.batch_size)
    scores = corpus @ _embed(model, [args.query], args.instruction, args.batch_size)[0]
    if args.hybrid:
        from .hybrid import BM25Index, fuse

        lexical = BM25Index().index(texts).scores([args.query])
        scores = fuse(scores[None, :], lexical, args.fusion)[0]
    top = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[: args.top_k]  # stable order on ties
    hits = [{"rank": rank, "id": ids[i], "score": float(scores[i]), "text": texts[i]} for rank, i in enumerate(top, 1)]
    lines = [f"{hit['rank']:>3}. {hit['score']:.3f}  [{hit['id']}] {hit['text']}" for hit in hits]
    return _emit(args, {"query": args.query, "results": hits}, "\n".join(lines))


def _index_build(args) -> int:
    import contextlib
    import shutil

    from .index import EmbeddingIndex

    _check_engine_options(args)
    _check_backend_options(args, build=True)
    qdrant = args.backend == "qdrant"
    output = None if qdrant else Path(args.output)
    # With Qdrant there is no output folder to hold the chunks beside: they go into the current folder.
    work_dir = Path(args.work_dir) if args.work_dir else (
        Path(f"qdrant-{args.collection}.chunks") if qdrant else _work_dir(args, output))
    _inputs_and_outputs({"--output": output, "--work-dir": work_dir, "--qdrant-path": args.qdrant_path},
                        {"--csv": args.csv, "--model": args.model})
    if not qdrant:
        if output.exists() and not output.is_dir():
            raise InputError(f"--output {output}: a file, not an index folder; choose a folder path.")
        output.mkdir(parents=True, exist_ok=True)
    # Qdrant is reached before any model work, so an unreachable server fails at once, not after the embedding.
    store = _open_qdrant(args) if qdrant else contextlib.nullcontext()
    # One build per output at a time: the lock is held from before reading to after the commit, so the
    # index, its encoder and its work folder all come from one run.
    with store, (contextlib.nullcontext() if qdrant else _output_lock(args, output, inside=True)):
        dataset = _read_texts(args.csv, args.column, args.id_column, extra_columns=args.metadata_column)
        encode = None
        if args.engine == "local":
            model = _load_text_encoder(args.model, args.trust_remote_code)
            default_instruction = model.config.default_instruction
        else:  # the workers load the model; this process needs only its config
            default_instruction = _checkpoint_default_instruction(args.model)
        # Recorded as used (the model's own instruction when none is given), so a search embeds queries alike.
        instruction = args.instruction if args.instruction is not None else default_instruction
        if args.engine == "local":
            encode = _normalized_encoder(model, instruction or "", args.batch_size)
        encoder = {"model": str(Path(args.model).resolve()) if args.model else None, "instruction": instruction}
        if qdrant and store.exists():
            store.check(info={"encoder": encoder})  # another encoder's collection: refused before embedding
        ray_encoder = _ray_text_encoder(args, instruction or "", normalize=True) if args.engine == "ray" else None
        with _output_lock(args, work_dir):  # held until the work folder is gone
            embeddings = _embed_collection(dataset, encode, args, work_dir, _encoder_name(args), ray_encoder)
            metadata = dataset.select_columns(["text", *args.metadata_column]).to_list()
            dim = int(embeddings.shape[1])
            if qdrant:
                store.ensure(dim, {"encoder": encoder}, hnsw_m=args.hnsw_m or 16,
                             ef_construct=args.hnsw_ef_construct or 100, quantization=args.quantization or "none",
                             payload_keys=args.metadata_column)
                store.add(embeddings, ids=list(dataset["id"]), metadata=metadata,
                          batch_size=args.upsert_batch_size or 256)
            else:
                index = EmbeddingIndex(dim=dim, kind=args.kind or "flat")
                index.add(embeddings, ids=list(dataset["id"]), metadata=metadata)
                index.set_lexical(dataset["text"])  # BM25 statistics for `index search --hybrid`
                # The encoder is committed with the vectors (one generation), so a kill cannot pair them wrongly.
                index.save(output, info={"encoder": encoder})
                del index  # it referenced the memory-mapped chunks until save() copied them
            del embeddings
            shutil.rmtree(work_dir)
    if qdrant:
        summary = {"collection": args.collection, "location": store.location, "size": len(dataset), "dim": dim}
        text = f"indexed {len(dataset)} reports in collection {args.collection!r} of {store.location}"
    else:
        summary = {"index": str(output), "size": len(dataset), "dim": dim, "kind": args.kind or "flat"}
        text = f"indexed {len(dataset)} reports ({args.kind or 'flat'}) in {output}"
    print(json.dumps(summary) if args.json else text)
    return EXIT_OK


def _checkpoint_default_instruction(model_path):
    """The instruction a checkpoint was trained with, read from its config alone (no weights loaded)."""
    from .checkpoints import check_model_folder
    from .defaults import default_model_path
    from .modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig

    path = check_model_folder(model_path, "--model", "LLM2Vec4CXR checkpoint") if model_path else default_model_path()
    return LLM2Vec4CXRConfig.from_pretrained(path).default_instruction


_QDRANT_BUILD_FLAGS = ("qdrant_url", "qdrant_path", "collection", "hnsw_m", "hnsw_ef_construct", "quantization",
                       "upsert_batch_size")
_QDRANT_SEARCH_FLAGS = ("qdrant_url", "qdrant_path", "collection", "filter")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_backend_options(args, build: bool = False) -> None:
    """Refuse options of the other backend, so none is silently ignored."""
    qdrant_flags = _QDRANT_BUILD_FLAGS if build else _QDRANT_SEARCH_FLAGS
    if args.backend == "faiss":
        given = [name for name in qdrant_flags if getattr(args, name) is not None]
        if given:
            raise InputError(f"{_flag(given[0])} needs --backend qdrant.")
        if build and args.output is None:
            raise InputError("--output (the index folder) is required with --backend faiss.")
        return
    if args.collection is None:
        raise InputError("--backend qdrant needs --collection NAME.")
    if build and args.output is not None:
        raise InputError("--output is for --backend faiss; Qdrant keeps the vectors in --collection.")
    if build and args.kind is not None:
        raise InputError("--kind is a FAISS setting; Qdrant indexes with HNSW (--hnsw-m, --hnsw-ef-construct).")
    if not build and args.hybrid:
        raise InputError("--hybrid is not supported with --backend qdrant (the BM25 statistics live beside FAISS "
                         "indexes only); search without --hybrid, or build a FAISS index for hybrid search.")


def _open_qdrant(args, must_exist: bool = False):
    from .qdrant_backend import QdrantIndex

    return QdrantIndex.connect(args.collection, url=args.qdrant_url, path=args.qdrant_path,
                               api_key=os.environ.get("QDRANT_API_KEY"), must_exist=must_exist)


def _payload_filter(items) -> dict:
    """--filter KEY=VALUE (repeatable; one key given twice accepts either value) -> {key: value or [values]}."""
    accepted: dict[str, list[str]] = {}
    for item in items or ():
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise InputError(f"--filter {item!r}: expected KEY=VALUE, e.g. --filter view=PA.")
        accepted.setdefault(key.strip(), []).append(value)
    return {key: values[0] if len(values) == 1 else values for key, values in accepted.items()}


def _index_search(args) -> int:
    from .index import CONFIG_NAME, EmbeddingIndex

    _check_backend_options(args)
    if args.backend == "qdrant":
        return _index_search_qdrant(args)
    folder = Path(args.index)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder}: not an index folder (no {CONFIG_NAME}); build one with `index build`.")
    queries = [query for query in args.queries if query.strip()]
    if not queries:
        raise ValueError("no query text given.")
    _inputs_and_outputs({"--output": args.output}, {"index": folder, "--model": args.model})
    _create_parent(args.output)
    index = EmbeddingIndex.load(folder)
    saved = {"model": None, "instruction": None, **(index.info.get("encoder") or {})}
    # None in an index means it was built without an instruction: embed the queries without one too.
    instruction = args.instruction if args.instruction is not None else (saved["instruction"] or "")
    if args.model is None and saved["model"] is not None and not Path(saved["model"]).is_dir():
        raise FileNotFoundError(
            f"{folder} was built with the model {saved['model']}, which no longer exists; pass --model with it."
        )
    model = _load_text_encoder(args.model or saved["model"], args.trust_remote_code)
    query_vectors = _embed(model, queries, instruction, args.batch_size)
    if args.hybrid:
        results = index.search_hybrid(query_vectors, queries, k=args.top_k, method=args.fusion)
    else:
        results = index.search(query_vectors, k=args.top_k)
    return _emit_index_hits(args, queries, results)


def _index_search_qdrant(args) -> int:
    # No index folder with Qdrant: the first positional argument is a query too.
    queries = [query for query in [args.index, *args.queries] if query.strip()]
    if not queries:
        raise ValueError("no query text given.")
    _inputs_and_outputs({"--output": args.output}, {"--model": args.model, "--qdrant-path": args.qdrant_path})
    _create_parent(args.output)
    filter = _payload_filter(args.filter)
    with _open_qdrant(args, must_exist=True) as store:
        saved = {"model": None, "instruction": None, **(store.info.get("encoder") or {})}
        where = f"collection {args.collection!r} of {store.location}"
        built_with = f"the model {saved['model']}" if saved["model"] else "the shipped default model"
        # Query vectors of another encoder would be compared with vectors they have nothing in common with.
        if args.model is not None and str(Path(args.model).resolve()) != saved["model"]:
            raise InputError(f"{where} was built with {built_with}, not --model {args.model}; drop --model (the "
                             "recorded one is used) or search a collection built with it.")
        if args.instruction is not None and args.instruction != (saved["instruction"] or ""):
            recorded = f"the instruction {saved['instruction']!r}" if saved["instruction"] else "no instruction"
            raise InputError(f"{where} was built with {recorded}, not --instruction {args.instruction!r}; drop "
                             "--instruction (the recorded one is used).")
        if saved["model"] is not None and not Path(saved["model"]).is_dir():
            raise FileNotFoundError(f"{where} was built with the model {saved['model']}, which does not exist here; "
                                    "search from a machine that has it at that path.")
        model = _load_text_encoder(saved["model"], args.trust_remote_code)
        query_vectors = _embed(model, queries, saved["instruction"] or "", args.batch_size)
        results = store.search(query_vectors, args.top_k, filter=filter)
    return _emit_index_hits(args, queries, results)


def _emit_index_hits(args, queries, results) -> int:
    payload = {"results": [
        {"query": query, "hits": [{"id": id_, "score": float(score), "metadata": metadata} for id_, score, metadata in hits]}
        for query, hits in zip(queries, results)
    ]}
    lines = []
    for entry in payload["results"]:
        lines.append(f"query: {entry['query']}")
        lines += [f"{rank:>3}. {hit['score']:.3f}  [{hit['id']}] {(hit['metadata'] or {}).get('text', '')}"
                  for rank, hit in enumerate(entry["hits"], 1)]
    return _emit(args, payload, "\n".join(lines))


def _retrieve_image_to_report(args) -> int:
    from .retrieval import find_images, image_encoder, load_clip_model, rank, report_encoder

    _inputs_and_outputs({"--output": args.output}, {"images": args.images, "--csv": args.csv, "--model": args.model})
    _create_parent(args.output)
    images = find_images(args.images)
    dataset = _read_texts(args.csv, args.column, args.id_column)
    ids, texts = list(dataset["id"]), list(dataset["text"])
    model, processor = _quiet(load_clip_model, args.model, args.trust_remote_code)
    reports = report_encoder(model, processor, args.instruction, args.batch_size)(texts)
    encode_images = image_encoder(model, processor, args.batch_size, max_pixels=args.max_image_pixels)
    order, scores = rank(encode_images(images), reports, args.top_k)
    return _emit_rankings(
        args, "image", [str(image) for image in images], order, scores, lambda i: {"id": ids[i], "text": texts[i]},
        lambda hit: f"[{hit['id']}] {hit['text']}",
    )


def _retrieve_report_to_image(args) -> int:
    from .retrieval import find_images, image_encoder, load_clip_model, rank, report_encoder

    queries = [query for query in args.queries if query.strip()]
    if not queries:
        raise ValueError("no query report given.")
    _inputs_and_outputs({"--output": args.output}, {"--images": args.images, "--model": args.model})
    _create_parent(args.output)
    images = find_images(args.images)
    model, processor = _quiet(load_clip_model, args.model, args.trust_remote_code)
    corpus = image_encoder(model, processor, args.batch_size, max_pixels=args.max_image_pixels)(images)
    order, scores = rank(report_encoder(model, processor, args.instruction, args.batch_size)(queries), corpus, args.top_k)
    return _emit_rankings(args, "query", queries, order, scores, lambda i: {"image": str(images[i])}, lambda hit: hit["image"])


def _emit_rankings(args, query_key, queries, order, scores, describe, text_of) -> int:
    """Emit top-k results: JSON {"results": [{query_key: q, "hits": [{rank, score, **describe(i)}]}]} or lines."""
    results = [
        {query_key: query, "hits": [{"rank": rank, "score": float(score), **describe(i)}
                                    for rank, (i, score) in enumerate(zip(row, row_scores), 1)]}
        for query, row, row_scores in zip(queries, order, scores)
    ]
    lines = []
    for entry in results:
        lines.append(f"{query_key}: {entry[query_key]}")
        lines += [f"{hit['rank']:>3}. {hit['score']:.3f}  {text_of(hit)}" for hit in entry["hits"]]
    return _emit(args, {"results": results}, "\n".join(lines))


def _quiet(load, *args):
    """Call a model loader with transformers' logging and progress bars off (stderr is for the user)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return load(*args)


def _eval(args) -> int:
    from .data import read_reports_csv, shared_data_dir, split_by_study
    from .evaluation import harness, report_tasks

    csv_path = Path(args.csv) if args.csv else shared_data_dir() / "openi" / "reports.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"--csv {csv_path}: no such file.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of studies, got {args.limit}.")
    rows = read_reports_csv(csv_path)
    if args.held_out:
        rows = split_by_study(rows)[1]
    rows = rows[: args.limit]  # the first N studies, in file order
    if not rows:
        raise ValueError(f"{csv_path} has no study with findings or impression text.")
    label_prompts = None
    if args.label_prompts:
        label_prompts = json.loads(Path(args.label_prompts).read_text(encoding="utf-8"))
        if not isinstance(label_prompts, dict) or not all(isinstance(v, str) for v in label_prompts.values()):
            raise ValueError(f"--label-prompts {args.label_prompts}: expected a JSON object {{label: prompt}}.")
    triplets = None
    if args.triplets:
        from .report_variants import load_triplets_jsonl

        triplets = load_triplets_jsonl(args.triplets)

    encoders = {}
    if not args.no_model:
        model = _load_text_encoder(args.model, getattr(args, "trust_remote_code", False))
        name = Path(args.model).name if args.model else "llm2vec4cxr-tiny (default)"
        # instruction None: the one the checkpoint was trained with (config.default_instruction).
        encoders[name] = report_tasks.llm2vec_encoder(model, instruction=args.instruction, batch_size=args.batch_size)
        if args.hybrid:
            from .hybrid import HybridScorer

            encoders[f"hybrid ({name} + bm25, {args.fusion})"] = HybridScorer(encoders[name], method=args.fusion)
    for baseline in args.baseline:
        if baseline == "tfidf":  # fitted on the evaluated reports themselves (unsupervised, no labels)
            encoders["tfidf"] = report_tasks.tfidf_encoder([harness.report_text(row) for row in rows])
        elif baseline == "bm25":
            encoders["bm25"] = report_tasks.bm25_scorer()
        else:
            encoders["all-MiniLM-L6-v2"] = report_tasks.minilm_encoder(batch_size=args.batch_size)
    for path in args.st_model:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--st-model {path}: no such directory (give a saved sentence-transformers model).")
        encoders[Path(path).name] = report_tasks.sentence_transformer_encoder(path, batch_size=args.batch_size)
    for path in args.clip_baseline:  # the text tower of a CLIP/SigLIP or open_clip (BiomedCLIP) folder
        from .baselines import load_dual_encoder

        encoders[Path(path).name] = _quiet(load_dual_encoder, path, args.batch_size).encode_texts
    if not encoders:
        raise ValueError("nothing to evaluate: --no-model was given without --baseline, --st-model or --clip-baseline.")

    ordering_suite = report_tasks.load_clinical_ordering_suite(args.ordering_suite) if args.ordering_suite else None
    results = harness.run_evaluation(
        encoders, rows, tasks=args.tasks, seed=args.seed, triplets=triplets, label_prompts=label_prompts,
        ordering_suite=ordering_suite,
    )
    results["data"] = str(csv_path)
    paths = harness.write_results(results, args.output_dir)
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(harness.results_markdown(results))
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    return EXIT_OK


_INSTRUCTION_HELP = (
    "instruction prepended to every report and pooled out (default: the one the model was trained with; "
    '"" for none)'
)
_TRUST_HELP = ("let the model folder run Python code it ships (never needed for checkpoints of this package; "
               "without it such a folder is refused)")


def _add_hybrid_options(parser):
    parser.add_argument(
        "--hybrid", action="store_true",
        help="fuse the dense ranking with BM25 (bm25s): scores become fusion scores (docs/retrieval.md)",
    )
    parser.add_argument(
        "--fusion", choices=("rrf", "normalized"), default="rrf",
        help="--hybrid fusion: reciprocal-rank (default, k=60, equal weights) or min-max normalised scores",
    )


def _add_trust_option(parser):
    parser.add_argument("--trust-remote-code", action="store_true", help=_TRUST_HELP)


def _add_model_options(parser, instruction_help=_INSTRUCTION_HELP):
    parser.add_argument("--model", help="a saved LLM2Vec4CXR checkpoint directory (default: the shipped LLM2Vec4CXR-tiny)")
    parser.add_argument("--instruction", default=None, help=instruction_help)
    parser.add_argument("--batch-size", type=_positive_int, default=32)


def _add_chunk_options(parser):
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=10_000,
        help="texts per chunk file: a killed run resumes from its finished chunks (default: 10000)",
    )
    parser.add_argument(
        "--work-dir",
        help="folder for the chunk files until the run completes (default: OUTPUT.chunks beside --output; with "
        "--backend qdrant, qdrant-COLLECTION.chunks in the current folder)",
    )
    parser.add_argument(
        "--no-wait", action="store_true",
        help="if another run is writing the same output (or work folder), fail at once instead of waiting for it",
    )


def _add_engine_options(parser):
    parser.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: embed in this process (default); ray: on Ray Data workers that each load the model once, "
        "in resumable parquet shards of --chunk-size rows (needs llm2clip4cxr[ray]; docs/scale.md)",
    )
    parser.add_argument(
        "--address", help="with --engine ray: the Ray cluster, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, "
        "else a local Ray started for this command)",
    )
    parser.add_argument(
        "--num-workers", type=_positive_int,
        help="with --engine ray: embedding workers (default: as many as the cluster's GPUs, or CPUs, allow)",
    )
    parser.add_argument(
        "--num-gpus-per-worker", type=_positive_float,
        help="with --engine ray: GPUs per worker, e.g. 1, or 0.5 for two workers per GPU (default: CPU workers)",
    )


def _add_qdrant_options(parser, build: bool):
    parser.add_argument(
        "--backend", choices=("faiss", "qdrant"), default="faiss",
        help="faiss: an index folder (default); qdrant: a Qdrant collection (needs llm2clip4cxr[qdrant])",
    )
    parser.add_argument("--qdrant-url", help="with --backend qdrant: the server, e.g. http://qdrant:6333 "
                        "(its API key, if any, from $QDRANT_API_KEY)")
    parser.add_argument("--qdrant-path", help="with --backend qdrant: a folder for Qdrant's embedded local mode "
                        "(one process at a time, exact search) instead of a server")
    parser.add_argument("--collection", help="with --backend qdrant: the collection name")
    if build:
        parser.add_argument("--hnsw-m", type=_positive_int, help="with --backend qdrant: HNSW links per vector "
                            "(default: 16; applies when the collection is created)")
        parser.add_argument("--hnsw-ef-construct", type=_positive_int,
                            help="with --backend qdrant: HNSW build beam width (default: 100)")
        parser.add_argument("--quantization", choices=("none", "int8"),
                            help="with --backend qdrant: scalar int8 quantization of the vectors (default: none)")
        parser.add_argument("--upsert-batch-size", type=_positive_int,
                            help="with --backend qdrant: points per upsert request, each retried 3 times "
                            "(default: 256)")
    else:
        parser.add_argument("--filter", action="append", metavar="KEY=VALUE",
                            help="with --backend qdrant: only hits whose metadata KEY is VALUE (repeatable; a key "
                            "given twice accepts either value)")


def _add_csv_options(parser, required: bool):
    parser.add_argument("--csv", required=required, help="a UTF-8 CSV file with a header row")
    parser.add_argument("--column", default="findings", help="the CSV column holding the report texts (default: findings)")
    parser.add_argument(
        "--id-column", default=None, help="the CSV column holding unique ids (default: the position among non-empty rows)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm2clip4cxr", description="Chest X-ray report encoders (LLM2Vec4CXR).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    similarity = commands.add_parser(
        "similarity", help="cosine similarity between reports", description="Cosine similarity between every pair of reports."
    )
    similarity.add_argument("reports", nargs="*", help="report texts")
    similarity.add_argument("--file", help="a text file with one report per line (added after the arguments)")
    similarity.add_argument("--model", help="a saved LLM2Vec4CXR checkpoint directory (default: the shipped LLM2Vec4CXR-tiny)")
    similarity.add_argument("--instruction", default=None, help=_INSTRUCTION_HELP)
    similarity.add_argument("--batch-size", type=_positive_int, default=32)
    _add_trust_option(similarity)
    similarity.add_argument("--json", action="store_true", help="print JSON for machines")
    similarity.add_argument("--output", help="write the result to this file instead of stdout")
    similarity.set_defaults(handler=_similarity)

    encode = commands.add_parser(
        "encode", help="embed reports into a file",
        description="Embed reports (arguments, or a CSV column) and save their float32 embeddings (as model.encode returns them); "
        "the format follows the --output suffix: .npy (array), .safetensors (tensor 'embeddings', ids in the "
        "metadata) or .parquet (columns id, text, embedding; needs pyarrow).",
    )
    encode.add_argument("texts", nargs="*", help="report texts (or use --csv)")
    _add_csv_options(encode, required=False)
    encode.add_argument("--output", required=True, help="the embeddings file: .npy, .safetensors or .parquet")
    _add_model_options(encode)
    _add_trust_option(encode)
    _add_chunk_options(encode)
    _add_engine_options(encode)
    encode.add_argument("--json", action="store_true", help="print a JSON summary")
    encode.set_defaults(handler=_encode)

    similar = commands.add_parser(
        "similar", help="the reports of a CSV column most similar to a query",
        description="Rank the reports of a CSV column by cosine similarity to a query report.",
    )
    similar.add_argument("query", help="the query report text")
    _add_csv_options(similar, required=True)
    similar.add_argument("--top-k", type=_positive_int, default=5)
    _add_hybrid_options(similar)
    _add_model_options(similar)
    _add_trust_option(similar)
    similar.add_argument("--json", action="store_true", help="print JSON for machines")
    similar.add_argument("--output", help="write the result to this file instead of stdout")
    similar.set_defaults(handler=_similar)

    index = commands.add_parser("index", help="build or search a FAISS index or a Qdrant collection of reports",
                                description="Report indexes.")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser(
        "build", help="index a CSV column",
        description="Embed a CSV column and save an EmbeddingIndex folder, committed as one unit with the model "
        "and instruction it was built with (which `index search` reuses); two builds of one folder take turns. With "
        "--backend qdrant, upsert into a Qdrant collection instead, with the model and instruction in its metadata.",
    )
    _add_csv_options(build, required=True)
    build.add_argument("--output", help="the index folder to write (--backend faiss)")
    build.add_argument("--kind", choices=("flat", "hnsw", "ivf", "pq"), default=None,
                       help="FAISS index kind (default: flat, exact)")
    build.add_argument("--metadata-column", action="append", default=[], help="a CSV column to store as metadata (repeatable)")
    _add_qdrant_options(build, build=True)
    _add_model_options(build)
    _add_trust_option(build)
    _add_chunk_options(build)
    _add_engine_options(build)
    build.add_argument("--json", action="store_true", help="print a JSON summary")
    build.set_defaults(handler=_index_build)
    search = index_commands.add_parser(
        "search", help="top-k ids for query texts",
        description="Search an index folder written by `index build`, or with --backend qdrant a collection "
        "(`index search --backend qdrant --collection NAME QUERY...`).",
    )
    search.add_argument("index", help="the index folder (with --backend qdrant: the first query)")
    search.add_argument("queries", nargs="*", help="query report texts")
    search.add_argument("--top-k", type=_positive_int, default=5)
    _add_hybrid_options(search)
    _add_qdrant_options(search, build=False)
    _add_model_options(search, "instruction for the queries (default: the one the index was built with)")
    _add_trust_option(search)
    search.add_argument("--json", action="store_true", help="print JSON for machines")
    search.add_argument("--output", help="write the result to this file instead of stdout")
    search.set_defaults(handler=_index_search)

    retrieve = commands.add_parser(
        "retrieve", help="image -> report and report -> image retrieval (LLM2CLIP4CXR)",
        description="Rank reports for chest X-rays, or chest X-rays for reports, with an LLM2CLIP4CXR checkpoint "
        "(exact cosine similarity; for large collections build an index).",
    )
    directions = retrieve.add_subparsers(dest="direction", required=True)
    to_report = directions.add_parser(
        "image-to-report", help="the reports of a CSV column closest to each image",
        description="For each image (PNG, JPEG or DICOM; folders are searched recursively), the top-k reports.",
    )
    to_report.add_argument("images", nargs="+", help="image files or folders")
    _add_csv_options(to_report, required=True)
    to_report.set_defaults(handler=_retrieve_image_to_report)
    to_image = directions.add_parser(
        "report-to-image", help="the images closest to each query report",
        description="For each query report, the top-k images among --images (files or folders, searched recursively).",
    )
    to_image.add_argument("queries", nargs="+", help="query report texts")
    to_image.add_argument("--images", nargs="+", required=True, help="image files or folders to search")
    to_image.set_defaults(handler=_retrieve_report_to_image)
    for direction in (to_report, to_image):
        direction.add_argument("--model", required=True, help="a saved LLM2CLIP4CXR checkpoint directory")
        direction.add_argument("--instruction", default=None, help=_INSTRUCTION_HELP)
        direction.add_argument("--batch-size", type=_positive_int, default=16)
        direction.add_argument("--top-k", type=_positive_int, default=5)
        direction.add_argument(
            "--max-image-pixels", type=_non_negative_int, default=None,
            help="refuse image files declaring more pixels (width x height), before decoding them "
            "(default: 67108864 = 8192 x 8192; 0: no limit)",
        )
        _add_trust_option(direction)
        direction.add_argument("--json", action="store_true", help="print JSON for machines")
        direction.add_argument("--output", help="write the result to this file instead of stdout")

    from .evaluation.harness import TASKS  # light: numpy only

    evaluate = commands.add_parser(
        "eval", help="evaluate encoders and baselines on a report CSV",
        description="Run the report tasks (findings->impression and paraphrase retrieval, error discrimination, "
        "zero-shot Problems labels) for the default model (or --model) and baselines; writes results.json, "
        "results.md and recall.png into --output-dir. Data format: see llm2clip4cxr.evaluation.report_tasks.",
    )
    evaluate.add_argument("--csv", help="report CSV with uid, findings, impression[, Problems] (default: the Open-I reports)")
    evaluate.add_argument("--output-dir", required=True, help="folder for results.json, results.md, recall.png")
    _add_model_options(evaluate)
    evaluate.add_argument("--no-model", action="store_true", help="evaluate only the baselines / --st-model models")
    _add_hybrid_options(evaluate)  # --hybrid adds the model fused with BM25 as a row of its own
    evaluate.add_argument("--baseline", nargs="*", choices=("tfidf", "bm25", "minilm"), default=[], help="baselines to add")
    evaluate.add_argument("--st-model", action="append", default=[], help="a sentence-transformers model folder (repeatable)")
    evaluate.add_argument(
        "--clip-baseline", action="append", default=[],
        help="a local transformers CLIP/SigLIP folder or open_clip BiomedCLIP folder (has open_clip_config.json); "
        "its text tower is evaluated (repeatable)",
    )
    evaluate.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to run (default: all)")
    evaluate.add_argument("--limit", type=int, help="use only the first N studies of the CSV (quick runs)")
    evaluate.add_argument(
        "--held-out",
        action="store_true",
        help="only the 10%% of studies held out by study id (seed 0): on Open-I, those the default model never saw",
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the paraphrases and error triplets (default: 0)")
    evaluate.add_argument("--triplets", help="a JSONL of anchor/positive/negative triplets for error discrimination")
    evaluate.add_argument("--label-prompts", help="a JSON object {Problems label: prompt} for zero-shot labels")
    evaluate.add_argument(
        "--ordering-suite", help="a JSONL clinical ordering suite (category, query, equivalent, different) to use "
        "instead of the one shipped in the package"
    )
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.set_defaults(handler=_eval)

    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(commands)
    return parser


def _command_name(args) -> str:
    parts = [args.command] + [getattr(args, key, None) for key in ("index_command", "direction", "convert_kind")]
    return " ".join(part for part in parts if part)


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def _error_kind(error: BaseException) -> str:
    if isinstance(error, LLM2CLIP4CXRError):
        return error.kind
    return next((kind for cls, kind in _BUILTIN_KINDS if isinstance(error, cls)), "internal")


def _report_error(args, error: BaseException, expected: bool) -> int:
    message = _one_line(error)
    if not expected:
        message = f"unexpected {type(error).__name__}: {message} (rerun with --debug for the traceback)"
    kind = _error_kind(error) if expected else "internal"
    if getattr(args, "json", False):
        print(json.dumps({"error": message, "kind": kind}))
    else:
        print(f"llm2clip4cxr {_command_name(args)}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    token = _JSON_ERRORS.set("--json" in argv)
    try:
        args = build_parser().parse_args(argv)
    finally:
        _JSON_ERRORS.reset(token)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if getattr(args, "json", False):
            print(json.dumps({"error": "interrupted", "kind": "interrupted"}))
        else:
            print(f"llm2clip4cxr {_command_name(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
            return EXIT_ERROR
        return _report_error(args, error, expected=isinstance(error, EXPECTED_ERRORS))


if __name__ == "__main__":
    sys.exit(main())
