"""The `llm2clip4cxr` command line: the parser, assembled from one module per subcommand, and `main`.

Each subcommand module has `register(commands)`, which adds its parser (shared options come from
`common`'s parent parsers) with `set_defaults(handler=run...)`; a handler returns an exit code and raises an
`LLM2CLIP4CXRError` (or ValueError / OSError) for user errors. A new subcommand is a module named in
`COMMANDS`; a new option of a command goes into its module (or into `common` when several commands share it).

Errors: an expected failure (bad input, a damaged file, a busy output: `LLM2CLIP4CXRError`, and the
ValueError / OSError / ImportError that libraries raise for bad input) prints one line,
`llm2clip4cxr <command>: error: <message naming the file or argument>`, and exits 1; anything else
prints one line plus "rerun with --debug for the traceback" and exits 1; `--debug` prints the traceback.
With `--json` the error is instead a JSON object on stdout, `{"error": ..., "kind": ...}` (usage errors
too, with exit code 2).
"""

import argparse
import contextvars
import importlib
import json
import sys
import traceback

from ..errors import LLM2CLIP4CXRError
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, command_name

# The subcommand modules of this package, in their --help order.
COMMANDS = ("similarity", "encode", "similar", "index", "retrieve", "evaluate", "prepare", "convert", "push")

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


def build_parser() -> argparse.ArgumentParser:
    """The full parser; builds fast, since no command module imports torch, transformers or datasets at import."""
    from .. import __version__

    parser = _Parser(prog="llm2clip4cxr", description="Chest X-ray report encoders (LLM2Vec4CXR).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".{name}", __package__).register(commands)
    return parser


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
        print(f"llm2clip4cxr {command_name(args)}: error: {message}", file=sys.stderr)
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
            print(f"llm2clip4cxr {command_name(args)}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if getattr(args, "debug", False):
            traceback.print_exc()
            return EXIT_ERROR
        return _report_error(args, error, expected=isinstance(error, EXPECTED_ERRORS))
