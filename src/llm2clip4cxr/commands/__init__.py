"""Subcommands of the `llm2clip4cxr` CLI that live in their own module.

Each module defines `register(commands)`, adding its parser to the `argparse`
subparsers with `set_defaults(handler=...)`; a handler returns an exit code and
raises an `llm2clip4cxr.errors.LLM2CLIP4CXRError` (or ValueError / OSError) for
user errors, which `llm2clip4cxr.cli.main` prints as one line (a JSON object
with --json) and turns into exit code 1.
"""

# Imported lazily by cli.build_parser, in this order (their place in --help).
COMMAND_MODULES = ("prepare", "convert", "push")
