"""`llm2clip4cxr similarity`: cosine similarity between every pair of reports."""

from . import common


def register(commands) -> None:
    parser = commands.add_parser(
        "similarity",
        help="cosine similarity between reports",
        description="Cosine similarity between every pair of reports.",
        parents=[common.model_options(), common.TRUST, common.JSON, common.OUTPUT],
    )
    parser.add_argument("reports", nargs="*", help="report texts")
    parser.add_argument("--file", help="a text file with one report per line (added after the arguments)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..data.tables import read_text_lines

    common.refuse_outputs_over_inputs({"--output": args.output}, {"--file": args.file, "--model": args.model})
    common.create_parent(args.output)
    reports = list(args.reports)
    if args.file:
        reports += [line.strip() for line in read_text_lines(args.file) if line.strip()]
    if len(reports) < 2:
        raise ValueError("give at least two reports (as arguments or with --file) to compare.")
    model = common.load_text_encoder(args.model, args.trust_remote_code)
    embeddings = common.text_encoder(model, args.instruction, args.batch_size)(reports)
    scores = (embeddings @ embeddings.T).tolist()
    lines = [f"[{i}] {report}" for i, report in enumerate(reports)]
    lines.append("")
    lines.append("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(reports))))
    lines += [f"{f'[{i}]':>5} " + "".join(f"{value:8.3f}" for value in row) for i, row in enumerate(scores)]
    return common.emit(args, {"reports": reports, "cosine_similarity": scores}, "\n".join(lines))
