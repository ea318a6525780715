"""The `llm2clip4cxr` command line."""

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _load_text_encoder(model_path: str | None):
    """The checkpoint at `model_path`, else the default encoder shipped in the package."""
    import transformers

    from . import LLM2Vec4CXRModel
    from .defaults import load_default_text_encoder

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # keep stderr for messages meant for the user
    if model_path is None:
        return load_default_text_encoder()
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--model {model_path}: no such directory (give a saved LLM2Vec4CXR checkpoint).")
    return LLM2Vec4CXRModel.from_pretrained(model_path).eval()


def _similarity(args) -> int:
    import torch.nn.functional as F

    reports = list(args.reports)
    if args.file:
        reports += [line.strip() for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(reports) < 2:
        raise ValueError("give at least two reports (as arguments or with --file) to compare.")
    model = _load_text_encoder(args.model)
    embeddings = F.normalize(model.encode(reports, instruction=args.instruction, batch_size=args.batch_size), dim=-1)
    scores = (embeddings @ embeddings.T).tolist()
    if args.json:
        text = json.dumps({"reports": reports, "cosine_similarity": scores}, indent=2)
    else:
        lines = [f"[{i}] {report}" for i, report in enumerate(reports)]
        lines.append("")
        lines.append("      " + "".join(f"{f'[{j}]':>8}" for j in range(len(reports))))
        lines += [f"{f'[{i}]':>5} " + "".join(f"{value:8.3f}" for value in row) for i, row in enumerate(scores)]
        text = "\n".join(lines)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2clip4cxr", description="Chest X-ray report encoders (LLM2Vec4CXR).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    similarity = commands.add_parser(
        "similarity", help="cosine similarity between reports", description="Cosine similarity between every pair of reports."
    )
    similarity.add_argument("reports", nargs="*", help="report texts")
    similarity.add_argument("--file", help="a text file with one report per line (added after the arguments)")
    similarity.add_argument("--model", help="a saved LLM2Vec4CXR checkpoint directory (default: the shipped LLM2Vec4CXR-tiny)")
    similarity.add_argument(
        "--instruction", default=None, help="instruction prepended to every report and pooled out (default: none)"
    )
    similarity.add_argument("--batch-size", type=int, default=32)
    similarity.add_argument("--json", action="store_true", help="print JSON for machines")
    similarity.add_argument("--output", help="write the result to this file instead of stdout")
    similarity.set_defaults(handler=_similarity)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        print(f"llm2clip4cxr {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
