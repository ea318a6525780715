"""`llm2clip4cxr push` (placeholder until implemented: its owner replaces this file)."""


def register(commands) -> None:
    parser = commands.add_parser("push", help="(not implemented yet)")
    parser.set_defaults(handler=_not_implemented)


def _not_implemented(args) -> int:
    raise NotImplementedError("llm2clip4cxr push is not implemented yet.")
