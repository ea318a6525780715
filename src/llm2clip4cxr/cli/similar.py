"""`llm2clip4cxr similar`: the reports of a CSV column most similar to a query (exact, optionally hybrid)."""

from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "similar", help="the reports of a CSV column most similar to a query",
        description="Rank the reports of a CSV column by cosine similarity to a query report.",
        parents=[common.csv_options(required=True), common.TOP_K, common.HYBRID, common.model_options(), common.TRUST,
                 common.JSON, common.OUTPUT],
    )
    parser.add_argument("query", help="the query report text")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..retrieval.ranking import top_k

    if not args.query.strip():
        raise ValueError("the query is empty.")
    common.refuse_outputs_over_inputs({"--output": args.output}, {"--csv": args.csv, "--model": args.model})
    common.create_parent(args.output)
    dataset = common.read_texts(args.csv, args.column, args.id_column)
    ids, texts = list(dataset["id"]), list(dataset["text"])
    model = common.load_text_encoder(args.model, args.trust_remote_code)
    encode = common.text_encoder(model, args.instruction, args.batch_size)
    scores = (encode(texts) @ encode([args.query])[0])[None, :]  # one query row
    if args.hybrid:
        from ..retrieval.hybrid import BM25Index, fuse

        scores = fuse(scores, BM25Index().index(texts).scores([args.query]), args.fusion, args.fusion_weights)
    order, best = top_k(scores, args.top_k)
    hits = [{"rank": rank, "id": ids[i], "score": float(score), "text": texts[i]}
            for rank, (i, score) in enumerate(zip(order[0], best[0]), 1)]
    lines = [f"{hit['rank']:>3}. {hit['score']:.3f}  [{hit['id']}] {hit['text']}" for hit in hits]
    return common.emit(args, {"query": args.query, "results": hits}, "\n".join(lines))
