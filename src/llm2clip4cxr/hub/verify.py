"""The load checks a checkpoint must pass before it is pushed, each in a fresh Python process
(`verify_worker.py`, run as a script so that it can load the folder without this package importable)."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import LLM2CLIP4CXRError
from .folder import adapter_base_source, checkpoint_kind

__all__ = ["NOT_TRIED", "CheckpointVerificationError", "verify_checkpoint"]

SAMPLE_REPORT = "No acute cardiopulmonary process."
VERIFY_TIMEOUT_S = 600
WORKER = Path(__file__).with_name("verify_worker.py")


class CheckpointVerificationError(LLM2CLIP4CXRError, ValueError):
    """A checkpoint folder failed one of the load checks run before pushing it."""

    kind = "verification"


# The status of the checks that would run the folder's own code, when it is not trusted.
NOT_TRIED = "not tried: it runs the folder's own Python code (pass --trust-remote-code / trust_remote_code=True)"


def _error_line(stderr: str) -> str | None:
    """The exception line of a traceback in `stderr` (else its last line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or [None])[-1]


def verify_checkpoint(
    model_dir, *, base_model: str | None = None, timeout: float = VERIFY_TIMEOUT_S, trust_remote_code: bool = False
) -> dict[str, str]:
    """Load `model_dir` in fresh Python processes, each way a user of the Hub repository would.

    Checks: "package" (`import llm2clip4cxr` then `AutoModel.from_pretrained(..., trust_remote_code=False)`,
    which must give the package's class) and, only with `trust_remote_code=True` since they run the
    folder's own Python files, "remote_code" (`AutoModel.from_pretrained(..., trust_remote_code=True)` with
    llm2clip4cxr not importable) and, for a text encoder, "sentence_transformers" (`SentenceTransformer(...,
    trust_remote_code=True)`, also without the package). Each encodes one report (an LLM2CLIP4CXR model:
    its text features, or a weight checksum without a processor); the outputs must agree. Adapters are
    loaded onto their base model with peft.

    Returns:
        `{check: "ok"}` when all pass; the checks not run without `trust_remote_code` are `NOT_TRIED`.

    Raises:
        CheckpointVerificationError: naming every failed check and its error.
    """
    model_dir = Path(model_dir).resolve()
    kind = checkpoint_kind(model_dir)
    base = adapter_base_source(model_dir, base_model) if kind.endswith("-adapter") else ""
    expected = ["remote_code", "package"] + (["sentence_transformers"] if kind == "text" else [])
    if not trust_remote_code:
        expected = ["package"]
    modes = ("hub", "package") if trust_remote_code else ("package",)
    results, crashed = _run_workers(model_dir, kind, base, modes, timeout)
    outcomes = _outcomes(expected, results, crashed, kind)
    failed = {check: status for check, status in outcomes.items() if status != "ok"}
    if not trust_remote_code:
        outcomes["remote_code"] = NOT_TRIED
        if kind == "text":
            outcomes["sentence_transformers"] = NOT_TRIED
    if failed:
        raise CheckpointVerificationError(
            f"{model_dir} did not pass the load checks, so it was not pushed: "
            + "; ".join(f"{check} {status}" for check, status in failed.items())
        )
    return outcomes


def _run_workers(model_dir: Path, kind: str, base: str, modes, timeout: float) -> tuple[dict, dict]:
    """Run `verify_worker.py` once per mode, in parallel: ({check: its result}, {mode: why it gave none})."""
    with tempfile.TemporaryDirectory() as scratch:
        # A private modules cache: remote code is imported from this checkpoint, not a stale copy.
        env = {**os.environ, "HF_MODULES_CACHE": scratch, "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        result_files = {mode: Path(scratch) / f"{mode}.json" for mode in modes}
        processes = {
            mode: subprocess.Popen(
                # -P: the worker's folder is not put on sys.path (its modules are this package's own).
                [sys.executable, "-P", str(WORKER), mode, kind, str(model_dir), base, SAMPLE_REPORT,
                 str(result_files[mode])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                cwd=scratch,
            )
            for mode in result_files
        }
        results, crashed = {}, {}
        for mode, process in processes.items():
            try:
                _, stderr = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                crashed[mode] = f"timed out after {timeout:.0f} s"
                continue
            if result_files[mode].is_file():
                results.update(json.loads(result_files[mode].read_text()))
            else:
                crashed[mode] = _error_line(stderr) or f"exit code {process.returncode}"
    return results, crashed


def _outcomes(expected: list[str], results: dict, crashed: dict, kind: str) -> dict[str, str]:
    """{check: "ok" or "failed: why"}: each check ran, loaded the package's class where it should, and gave the
    same output as the first check that passed."""
    outcomes = {}
    for check in expected:
        result = results.get(check)
        if result is None:
            outcomes[check] = f"failed: {crashed.get('package' if check == 'package' else 'hub', 'did not run')}"
        elif "error" in result:
            outcomes[check] = f"failed: {result['error']}"
        else:
            outcomes[check] = "ok"
    package = results.get("package", {})
    if (
        outcomes["package"] == "ok"
        and not kind.endswith("-adapter")
        and not package["module"].startswith("llm2clip4cxr.")
    ):
        outcomes["package"] = f"failed: loaded {package['module']}.{package['class']}, not the package's class"
    passed = [check for check in expected if outcomes[check] == "ok"]
    if len(passed) > 1:
        import numpy as np

        reference = results[passed[0]]["output"]
        for check in passed[1:]:
            if not np.allclose(results[check]["output"], reference, rtol=1e-4, atol=1e-5):
                outcomes[check] = f"failed: its output differs from the {passed[0]} check's"
    return outcomes
