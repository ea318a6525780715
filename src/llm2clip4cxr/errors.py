"""The package's exceptions: one base class, so callers (and the CLI) can tell expected failures from bugs.

Every class also derives from the built-in exception callers caught before it existed (mostly
`ValueError`), so `except ValueError` keeps working. `kind` is a short stable word for machines: the CLI
prints it as `{"error": ..., "kind": ...}` with `--json`.
"""

__all__ = [
    "CorruptFileError",
    "InputError",
    "LLM2CLIP4CXRError",
    "OutputLockedError",
    "ServiceUnavailableError",
    "UntrustedCodeError",
]


class LLM2CLIP4CXRError(Exception):
    """Base of every error this package raises on purpose (bad input, a busy output, a damaged file...)."""

    kind = "error"


class InputError(LLM2CLIP4CXRError, ValueError):
    """An input file or argument cannot be used; the message names it, the place in it and what to do."""

    kind = "input"


class CorruptFileError(LLM2CLIP4CXRError, ValueError):
    """A file this package wrote or reads (an index, a checkpoint's weights) is damaged, truncated or tampered
    with; the message names the file."""

    kind = "corrupt"


class OutputLockedError(LLM2CLIP4CXRError, OSError):
    """Another process is writing the same output, and waiting was not asked for."""

    kind = "locked"


class ServiceUnavailableError(LLM2CLIP4CXRError, ConnectionError):
    """A service the command needs (a Qdrant server) cannot be reached; the message names its address."""

    kind = "unavailable"


class UntrustedCodeError(LLM2CLIP4CXRError, ValueError):
    """Loading a folder would run Python code it ships, and `trust_remote_code` was not given."""

    kind = "untrusted-code"
