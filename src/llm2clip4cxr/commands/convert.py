"""`llm2clip4cxr convert` (placeholder until implemented: its owner replaces this file)."""


def register(commands) -> None:
    parser = commands.add_parser("convert", help="(not implemented yet)")
    parser.set_defaults(handler=_not_implemented)


def _not_implemented(args) -> int:
    raise NotImplementedError("llm2clip4cxr convert is not implemented yet.")
