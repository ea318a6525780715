"""`llm2clip4cxr index build|search`: a FAISS index of a CSV column, and top-k ids for query reports."""

import json
import shutil
from pathlib import Path

from ..errors import InputError
from ..retrieval.index import INDEX_KINDS
from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "index", help="build or search a FAISS index of reports", description="Report indexes."
    )
    index_commands = parser.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser(
        "build", help="index a CSV column",
        description="Embed a CSV column and save an EmbeddingIndex folder, committed as one unit with the model "
        "and instruction it was built with (which `index search` reuses). Two builds of one folder take turns.",
        parents=[common.csv_options(required=True), common.model_options(), common.TRUST, common.CHUNKS,
                 common.NO_WAIT, common.JSON],
    )
    build.add_argument("--output", required=True, help="the index folder to write")
    build.add_argument("--kind", choices=INDEX_KINDS, default="flat", help="FAISS index kind (default: flat, exact)")
    build.add_argument(
        "--metadata-column", action="append", default=[], help="a CSV column to store as metadata (repeatable)"
    )
    build.set_defaults(handler=run_build)

    search = index_commands.add_parser(
        "search",
        help="top-k ids for query texts",
        description="Search an index folder written by `index build`.",
        parents=[
            common.TOP_K,
            common.HYBRID,
            common.model_options(
                instruction_help="instruction for the queries (default: the one the index was built with)"
            ),
            common.TRUST,
            common.JSON,
            common.OUTPUT,
        ],
    )
    search.add_argument("index", help="the index folder")
    search.add_argument("queries", nargs="+", help="query report texts")
    search.set_defaults(handler=run_search)


def run_build(args) -> int:
    from ..retrieval.index import EmbeddingIndex

    output = Path(args.output)
    work_dir = common.work_dir(args, output)
    common.refuse_outputs_over_inputs(
        {"--output": output, "--work-dir": work_dir}, {"--csv": args.csv, "--model": args.model}
    )
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: a file, not an index folder; choose a folder path.")
    output.mkdir(parents=True, exist_ok=True)
    # One build per output at a time: the lock is held from before reading to after the commit, so the
    # index, its encoder and its work folder all come from one run.
    with common.output_lock(args, output, inside=True):
        dataset = common.read_texts(args.csv, args.column, args.id_column, extra_columns=args.metadata_column)
        model = common.load_text_encoder(args.model, args.trust_remote_code)
        # Recorded as used (the model's own instruction when none is given), so a search embeds queries alike.
        instruction = args.instruction if args.instruction is not None else model.config.default_instruction
        encode = common.text_encoder(model, instruction or "", args.batch_size)
        with common.output_lock(args, work_dir):  # held until the work folder is gone
            embeddings = common.embed_collection(dataset, encode, args, work_dir)
            index = EmbeddingIndex(dim=embeddings.shape[1], kind=args.kind)
            metadata = dataset.select_columns(["text", *args.metadata_column]).to_list()
            index.add(embeddings, ids=list(dataset["id"]), metadata=metadata)
            index.set_lexical(dataset["text"])  # BM25 statistics for `index search --hybrid`
            # The encoder is committed with the vectors (one generation), so a kill cannot pair them wrongly.
            encoder = {"model": str(Path(args.model).resolve()) if args.model else None, "instruction": instruction}
            index.save(output, info={"encoder": encoder})
            dim = index.dim
            del index, embeddings  # the index referenced the memory-mapped chunks until save() copied them
            shutil.rmtree(work_dir)
    summary = {"index": str(output), "size": len(dataset), "dim": dim, "kind": args.kind}
    print(json.dumps(summary) if args.json else f"indexed {len(dataset)} reports ({args.kind}) in {output}")
    return common.EXIT_OK


def run_search(args) -> int:
    from ..retrieval.index import CONFIG_NAME, EmbeddingIndex

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
        results = index.search_hybrid(query_vectors, queries, k=args.top_k, method=args.fusion)
    else:
        results = index.search(query_vectors, k=args.top_k)
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
