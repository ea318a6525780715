"""`llm2clip4cxr retrieve image-to-report|report-to-image`: exact image <-> report retrieval with an
LLM2CLIP4CXR checkpoint."""

from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "retrieve", help="image -> report and report -> image retrieval (LLM2CLIP4CXR)",
        description="Rank reports for chest X-rays, or chest X-rays for reports, with an LLM2CLIP4CXR checkpoint "
        "(exact cosine similarity; for large collections build an index).",
    )
    directions = parser.add_subparsers(dest="direction", required=True)
    options = common.model_options(
        model_help="a saved LLM2CLIP4CXR checkpoint directory", batch_size=16, required=True
    )
    options.add_argument(
        "--max-image-pixels", type=common.non_negative_int, default=None,
        help="refuse image files declaring more pixels (width x height), before decoding them "
        "(default: 67108864 = 8192 x 8192; 0: no limit)",
    )
    shared = [options, common.TOP_K, common.TRUST, common.JSON, common.OUTPUT]
    to_report = directions.add_parser(
        "image-to-report", help="the reports of a CSV column closest to each image",
        description="For each image (PNG, JPEG or DICOM; folders are searched recursively), the top-k reports.",
        parents=[common.csv_options(required=True), *shared],
    )
    to_report.add_argument("images", nargs="+", help="image files or folders")
    to_report.set_defaults(handler=run_image_to_report)
    to_image = directions.add_parser(
        "report-to-image", help="the images closest to each query report",
        description="For each query report, the top-k images among --images (files or folders, searched recursively).",
        parents=shared,
    )
    to_image.add_argument("queries", nargs="+", help="query report texts")
    to_image.add_argument("--images", nargs="+", required=True, help="image files or folders to search")
    to_image.set_defaults(handler=run_report_to_image)


def run_image_to_report(args) -> int:
    from ..retrieval import find_images, image_encoder, load_clip_model, rank, report_encoder

    common.refuse_outputs_over_inputs(
        {"--output": args.output}, {"images": args.images, "--csv": args.csv, "--model": args.model}
    )
    common.create_parent(args.output)
    images = find_images(args.images)
    dataset = common.read_texts(args.csv, args.column, args.id_column)
    ids, texts = list(dataset["id"]), list(dataset["text"])
    model, processor = common.quiet(load_clip_model, args.model, args.trust_remote_code)
    reports = report_encoder(model, processor, args.instruction, args.batch_size)(texts)
    encode_images = image_encoder(model, processor, args.batch_size, max_pixels=args.max_image_pixels)
    order, scores = rank(encode_images(images), reports, args.top_k)
    return _emit_rankings(
        args, "image", [str(image) for image in images], order, scores, lambda i: {"id": ids[i], "text": texts[i]},
        lambda hit: f"[{hit['id']}] {hit['text']}",
    )


def run_report_to_image(args) -> int:
    from ..retrieval import find_images, image_encoder, load_clip_model, rank, report_encoder

    queries = [query for query in args.queries if query.strip()]
    if not queries:
        raise ValueError("no query report given.")
    common.refuse_outputs_over_inputs({"--output": args.output}, {"--images": args.images, "--model": args.model})
    common.create_parent(args.output)
    images = find_images(args.images)
    model, processor = common.quiet(load_clip_model, args.model, args.trust_remote_code)
    corpus = image_encoder(model, processor, args.batch_size, max_pixels=args.max_image_pixels)(images)
    order, scores = rank(
        report_encoder(model, processor, args.instruction, args.batch_size)(queries), corpus, args.top_k
    )
    return _emit_rankings(
        args, "query", queries, order, scores, lambda i: {"image": str(images[i])}, lambda hit: hit["image"]
    )


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
    return common.emit(args, {"results": results}, "\n".join(lines))
