"""The `llm2clip4cxr` command line: `app` (the parser and `main`, which reports errors), `common` (the options
and steps the subcommands share) and one module per subcommand (similarity, encode, similar, index, retrieve,
evaluate, prepare, convert, push)."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
