"""`llm2clip4cxr index build|search`: a FAISS index folder (or, with `--backend qdrant`, a Qdrant collection) of a
CSV column, and top-k ids for query reports."""

import contextlib
import json
import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..retrieval.index import INDEX_KINDS
from . import common

_QDRANT_BUILD_FLAGS = ("qdrant_url", "qdrant_path", "collection", "hnsw_m", "hnsw_ef_construct", "quantization",
                       "upsert_batch_size")
_QDRANT_SEARCH_FLAGS = ("qdrant_url", "qdrant_path", "collection", "filter")


def register(commands) -> None:
    parser = commands.add_parser(
        "index", help="build or search a FAISS index or a Qdrant collection of reports", description="Report indexes."
    )
    index_commands = parser.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser(
        "build", help="index a CSV column",
        description="Embed a CSV column and save an EmbeddingIndex folder, committed as one unit with the model "
        "and instruction it was built with (which `index search` reuses); two builds of one folder take turns. With "
        "--backend qdrant, upsert into a Qdrant collection instead, with the model and instruction in its metadata.",
        parents=[common.csv_options(required=True), _qdrant_options(build=True), common.model_options(), common.TRUST,
                 common.CHUNKS, common.NO_WAIT, common.ENGINE, common.JSON],
    )
    build.add_argument("--output", help="the index folder to write (--backend faiss)")
    build.add_argument("--kind", choices=INDEX_KINDS, default=None, help="FAISS index kind (default: flat, exact)")
    build.add_argument(
        "--metadata-column", action="append", default=[], help="a CSV column to store as metadata (repeatable)"
    )
    build.set_defaults(handler=run_build)

    search = index_commands.add_parser(
        "search",
        help="top-k ids for query texts",
        description="Search an index folder written by `index build`, or with --backend qdrant a collection "
        "(`index search --backend qdrant --collection NAME QUERY...`).",
        parents=[
            common.TOP_K,
            common.HYBRID,
            _qdrant_options(build=False),
            common.model_options(
                instruction_help="instruction for the queries (default: the one the index was built with)"
            ),
            common.TRUST,
            common.JSON,
            common.OUTPUT,
        ],
    )
    search.add_argument("index", help="the index folder (with --backend qdrant: the first query)")
    search.add_argument("queries", nargs="*", help="query report texts")
    search.set_defaults(handler=run_search)


def _qdrant_options(build: bool):
    """--backend and the Qdrant settings of `index build` (`build`) or `index search`."""
    options = common.parent_parser()
    options.add_argument(
        "--backend", choices=("faiss", "qdrant"), default="faiss",
        help="faiss: an index folder (default); qdrant: a Qdrant collection (needs llm2clip4cxr[qdrant])",
    )
    options.add_argument("--qdrant-url", help="with --backend qdrant: the server, e.g. http://qdrant:6333 "
                         "(its API key, if any, from $QDRANT_API_KEY)")
    options.add_argument("--qdrant-path", help="with --backend qdrant: a folder for Qdrant's embedded local mode "
                         "(one process at a time, exact search) instead of a server")
    options.add_argument("--collection", help="with --backend qdrant: the collection name")
    if not build:
        options.add_argument("--filter", action="append", metavar="KEY=VALUE",
                             help="with --backend qdrant: only hits whose metadata KEY is VALUE (repeatable; a key "
                             "given twice accepts either value)")
        return options
    options.add_argument("--hnsw-m", type=common.positive_int, help="with --backend qdrant: HNSW links per vector "
                         "(default: 16; applies when the collection is created)")
    options.add_argument("--hnsw-ef-construct", type=common.positive_int,
                         help="with --backend qdrant: HNSW build beam width (default: 100)")
    options.add_argument("--quantization", choices=("none", "int8"),
                         help="with --backend qdrant: scalar int8 quantization of the vectors (default: none)")
    options.add_argument("--upsert-batch-size", type=common.positive_int,
                         help="with --backend qdrant: points per upsert request, each retried 3 times (default: 256)")
    return options


def _check_backend_options(args, build: bool = False) -> None:
    """Refuse options of the other backend, so none is silently ignored."""
    qdrant_flags = _QDRANT_BUILD_FLAGS if build else _QDRANT_SEARCH_FLAGS
    if args.backend == "faiss":
        given = [name for name in qdrant_flags if getattr(args, name) is not None]
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} needs --backend qdrant.")
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
    from ..retrieval.qdrant_backend import QdrantIndex

    return QdrantIndex.connect(args.collection, url=args.qdrant_url, path=args.qdrant_path,
                               api_key=os.environ.get("QDRANT_API_KEY"), must_exist=must_exist)


# ----------------------------------------------------------------------------------------------- build


def run_build(args) -> int:
    common.check_engine_options(args)
    _check_backend_options(args, build=True)
    qdrant = args.backend == "qdrant"
    output = None if qdrant else Path(args.output)
    # With Qdrant there is no output folder to hold the chunks beside: they go into the current folder.
    work_dir = Path(args.work_dir) if args.work_dir else (
        Path(f"qdrant-{args.collection}.chunks") if qdrant else common.work_dir(args, output))
    common.refuse_outputs_over_inputs(
        {"--output": output, "--work-dir": work_dir, "--qdrant-path": args.qdrant_path},
        {"--csv": args.csv, "--model": args.model},
    )
    if not qdrant:
        if output.exists() and not output.is_dir():
            raise InputError(f"--output {output}: a file, not an index folder; choose a folder path.")
        output.mkdir(parents=True, exist_ok=True)
    # Qdrant is reached before any model work, so an unreachable server fails at once, not after the embedding.
    store = _open_qdrant(args) if qdrant else contextlib.nullcontext()
    # One build per output at a time: the lock is held from before reading to after the commit, so the
    # index, its encoder and its work folder all come from one run.
    with store, (contextlib.nullcontext() if qdrant else common.output_lock(args, output, inside=True)):
        dataset = common.read_texts(args.csv, args.column, args.id_column, extra_columns=args.metadata_column)
        encode, instruction = _build_encoder(args)
        encoder = {"model": str(Path(args.model).resolve()) if args.model else None, "instruction": instruction}
        if qdrant and store.exists():
            store.check(info={"encoder": encoder})  # another encoder's collection: refused before embedding
        ray_encoder = common.ray_text_encoder(args, instruction or "", normalize=True) if encode is None else None
        with common.output_lock(args, work_dir):  # held until the work folder is gone
            embeddings = common.embed_collection(dataset, encode, args, work_dir, ray_encoder)
            metadata = dataset.select_columns(["text", *args.metadata_column]).to_list()
            dim = int(embeddings.shape[1])
            if qdrant:
                _upsert(store, args, embeddings, list(dataset["id"]), metadata, encoder)
            else:
                _save_faiss(output, args, embeddings, dataset, metadata, encoder)
            del embeddings  # release the memory map before its folder goes
            shutil.rmtree(work_dir)
    if qdrant:
        summary = {"collection": args.collection, "location": store.location, "size": len(dataset), "dim": dim}
        text = f"indexed {len(dataset)} reports in collection {args.collection!r} of {store.location}"
    else:
        summary = {"index": str(output), "size": len(dataset), "dim": dim, "kind": args.kind or "flat"}
        text = f"indexed {len(dataset)} reports ({args.kind or 'flat'}) in {output}"
    print(json.dumps(summary) if args.json else text)
    return common.EXIT_OK


def _build_encoder(args):
    """(texts -> normalised embeddings in this process, or None with --engine ray; the instruction to record)."""
    if args.engine == "local":
        model = common.load_text_encoder(args.model, args.trust_remote_code)
        default_instruction = model.config.default_instruction
    else:  # the workers load the model; this process needs only its config
        default_instruction = _checkpoint_default_instruction(args.model)
    # Recorded as used (the model's own instruction when none is given), so a search embeds queries alike.
    instruction = args.instruction if args.instruction is not None else default_instruction
    if args.engine != "local":
        return None, instruction
    return common.text_encoder(model, instruction or "", args.batch_size), instruction


def _checkpoint_default_instruction(model_path):
    """The instruction a checkpoint was trained with, read from its config alone (no weights loaded)."""
    from ..checkpoints import check_model_folder
    from ..defaults import default_model_path
    from ..modeling.configuration_llm2vec4cxr import LLM2Vec4CXRConfig

    path = check_model_folder(model_path, "--model", "LLM2Vec4CXR checkpoint") if model_path else default_model_path()
    return LLM2Vec4CXRConfig.from_pretrained(path).default_instruction


def _save_faiss(output: Path, args, embeddings, dataset, metadata, encoder) -> None:
    from ..retrieval.index import EmbeddingIndex

    index = EmbeddingIndex(dim=int(embeddings.shape[1]), kind=args.kind or "flat")
    index.add(embeddings, ids=list(dataset["id"]), metadata=metadata)
    index.set_lexical(dataset["text"])  # BM25 statistics for `index search --hybrid`
    # The encoder is committed with the vectors (one generation), so a kill cannot pair them wrongly.
    index.save(output, info={"encoder": encoder})
    # Returning drops the index, which referenced the memory-mapped chunks until save() copied them.


def _upsert(store, args, embeddings, ids, metadata, encoder) -> None:
    store.ensure(int(embeddings.shape[1]), {"encoder": encoder}, hnsw_m=args.hnsw_m or 16,
                 ef_construct=args.hnsw_ef_construct or 100, quantization=args.quantization or "none",
                 payload_keys=args.metadata_column)
    store.add(embeddings, ids=ids, metadata=metadata, batch_size=args.upsert_batch_size or 256)


# ----------------------------------------------------------------------------------------------- search


def run_search(args) -> int:
    from ..retrieval.index import CONFIG_NAME, EmbeddingIndex

    _check_backend_options(args)
    if args.backend == "qdrant":
        return _search_qdrant(args)
    folder = Path(args.index)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder}: not an index folder (no {CONFIG_NAME}); build one with `index build`.")
    queries = [query for query in args.queries if query.strip()]
    if not queries:
        raise ValueError("no query text given.")
    common.refuse_outputs_over_inputs({"--output": args.output}, {"index": folder, "--model": args.model})
    common.create_parent(args.output)
    index = EmbeddingIndex.load(folder)
    saved = {"model": None, "instruction": None, **(index.info.get("encoder") or {})}
    # None in an index means it was built without an instruction: embed the queries without one too.
    instruction = args.instruction if args.instruction is not None else (saved["instruction"] or "")
    if args.model is None and saved["model"] is not None and not Path(saved["model"]).is_dir():
        raise FileNotFoundError(
            f"{folder} was built with the model {saved['model']}, which no longer exists; pass --model with it."
        )
    model = common.load_text_encoder(args.model or saved["model"], args.trust_remote_code)
    query_vectors = common.text_encoder(model, instruction, args.batch_size)(queries)
    if args.hybrid:
        results = index.search_hybrid(
            query_vectors, queries, k=args.top_k, method=args.fusion, weights=args.fusion_weights
        )
    else:
        results = index.search(query_vectors, k=args.top_k)
    return _emit_hits(args, queries, results)


def _search_qdrant(args) -> int:
    # No index folder with Qdrant: the first positional argument is a query too.
    queries = [query for query in [args.index, *args.queries] if query.strip()]
    if not queries:
        raise ValueError("no query text given.")
    common.refuse_outputs_over_inputs({"--output": args.output}, {"--model": args.model,
                                                                  "--qdrant-path": args.qdrant_path})
    common.create_parent(args.output)
    accepted = _payload_filter(args.filter)
    with _open_qdrant(args, must_exist=True) as store:
        saved = {"model": None, "instruction": None, **(store.info.get("encoder") or {})}
        _check_search_encoder(args, saved, f"collection {args.collection!r} of {store.location}")
        model = common.load_text_encoder(saved["model"], args.trust_remote_code)
        query_vectors = common.text_encoder(model, saved["instruction"] or "", args.batch_size)(queries)
        results = store.search(query_vectors, args.top_k, filter=accepted)
    return _emit_hits(args, queries, results)


def _check_search_encoder(args, saved: dict, where: str) -> None:
    """Refuse --model / --instruction other than the collection's: query vectors of another encoder would be
    compared with vectors they have nothing in common with."""
    built_with = f"the model {saved['model']}" if saved["model"] else "the shipped default model"
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


def _payload_filter(items) -> dict:
    """--filter KEY=VALUE (repeatable; one key given twice accepts either value) -> {key: value or [values]}."""
    accepted: dict[str, list[str]] = {}
    for item in items or ():
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise InputError(f"--filter {item!r}: expected KEY=VALUE, e.g. --filter view=PA.")
        accepted.setdefault(key.strip(), []).append(value)
    return {key: values[0] if len(values) == 1 else values for key, values in accepted.items()}


def _emit_hits(args, queries, results) -> int:
    payload = {
        "results": [
            {
                "query": query,
                "hits": [{"id": id_, "score": float(score), "metadata": metadata} for id_, score, metadata in hits],
            }
            for query, hits in zip(queries, results)
        ]
    }
    lines = []
    for entry in payload["results"]:
        lines.append(f"query: {entry['query']}")
        lines += [f"{rank:>3}. {hit['score']:.3f}  [{hit['id']}] {(hit['metadata'] or {}).get('text', '')}"
                  for rank, hit in enumerate(entry["hits"], 1)]
    return common.emit(args, payload, "\n".join(lines))
