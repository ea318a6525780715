"""`llm2clip4cxr prepare` (placeholder until implemented: its owner replaces this file)."""


def register(commands) -> None:
    parser = commands.add_parser("prepare", help="(not implemented yet)")
    parser.set_defaults(handler=_not_implemented)


def _not_implemented(args) -> int:
    raise NotImplementedError("llm2clip4cxr prepare is not implemented yet.")
