"""Publishing checkpoints on the Hugging Face Hub.

    from llm2clip4cxr.hub import push_to_hub

    plan = push_to_hub("runs/contrastive/model", "my-org/llm2vec4cxr-small", dry_run=True)
    print(plan.describe())  # the files and the rendered model card, nothing sent
    push_to_hub("runs/contrastive/model", "my-org/llm2vec4cxr-small", results="runs/eval/results.json")

Before anything is uploaded the folder is checked: safetensors weights only (pickle files are refused, damaged
safetensors files too), and it must load in a fresh Python process through this package's Auto classes. With
`trust_remote_code=True` it must also load through the checkpoint's own remote code and, for a text encoder,
through sentence-transformers, with the same outputs everywhere; without it no Python file of the folder is
run (a stranger's checkpoint could run anything) and the plan says those checks were not tried. The model
card (`README.md`) is rendered from `hub_cards/` with the evaluation results as its model-index. A peft
LoRA adapter folder (one with `adapter_config.json`) is pushed as an adapter with its base model named in
the card, or merged into its base first (`merge=True`).

Authentication uses only huggingface_hub's own mechanisms (`HF_TOKEN`, `hf auth login`, or `token=`
passed through to `HfApi`); the token is never printed, logged or written by this module.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.utils import validate_repo_id

from .checkpoints import check_safetensors_file
from .errors import LLM2CLIP4CXRError
from .fileio import atomic_write_folder
from .hub_card import model_card, select_model_results

# Pickle-based formats run arbitrary code when loaded: never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_CONFIG = "adapter_config.json"
CARD_FILE = "README.md"
RESULTS_FILE = "results.json"
KINDS = {"llm2vec4cxr": "text", "llm2clip4cxr": "clip"}
_BASE_CLASSES = {"LLM2Vec4CXRModel": "text", "LLM2CLIP4CXRModel": "clip"}
SAMPLE_REPORT = "No acute cardiopulmonary process."
VERIFY_TIMEOUT_S = 600


class CheckpointVerificationError(LLM2CLIP4CXRError, ValueError):
    """A checkpoint folder failed one of the load checks run before pushing it."""

    kind = "verification"


# The status of the checks that would run the folder's own code, when it is not trusted.
NOT_TRIED = "not tried: it runs the folder's own Python code (pass --trust-remote-code / trust_remote_code=True)"


@dataclass
class PushPlan:
    """What `push_to_hub` sends (or would send, with `dry_run=True`).

    Attributes:
        repo_id: the target repository.
        kind: "text" (LLM2Vec4CXR), "clip" (LLM2CLIP4CXR), "text-adapter" or "clip-adapter".
        files: `{path in the repository: local path}` of the files uploaded as they are.
        card: the model card uploaded as README.md.
        verification: `{check name: "ok", `NOT_TRIED` or the reason it failed}` (empty when verification was
            skipped).
        commit: the `CommitInfo` of the push; None for a dry run.
    """

    repo_id: str
    kind: str
    files: dict[str, Path]
    card: ModelCard
    revision: str | None = None
    private: bool = False
    create_pr: bool = False
    commit_message: str = ""
    verification: dict[str, str] = field(default_factory=dict)
    commit: object = None

    def paths_in_repo(self) -> list[str]:
        """Every path the commit writes, README.md included, sorted."""
        return sorted([*self.files, CARD_FILE])

    def describe(self) -> str:
        """The file list (with sizes), the load checks and the rendered card, as text."""
        target = self.repo_id + (f"@{self.revision}" if self.revision else "") + (" (as a pull request)" if self.create_pr else "")
        lines = [f"{self.kind} checkpoint -> {target}{' (private)' if self.private else ''}", "files:"]
        for path in self.paths_in_repo():
            size = len(str(self.card).encode()) if path == CARD_FILE else self.files[path].stat().st_size
            lines.append(f"  {path}  ({size:,} bytes){'  [rendered model card]' if path == CARD_FILE else ''}")
        if self.verification:
            lines.append("load checks: " + ", ".join(f"{name} {status}" for name, status in self.verification.items()))
        lines += [f"--- {CARD_FILE} ---", str(self.card)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (for `--json`)."""
        return {
            "repo_id": self.repo_id, "kind": self.kind, "revision": self.revision, "private": self.private,
            "create_pr": self.create_pr, "commit_message": self.commit_message, "files": self.paths_in_repo(),
            "verification": self.verification, "card": str(self.card),
            "commit_url": getattr(self.commit, "commit_url", None), "pr_url": getattr(self.commit, "pr_url", None),
        }


def checkpoint_kind(model_dir) -> str:
    """"text", "clip", "text-adapter" or "clip-adapter" for a saved folder; raises `ValueError` otherwise."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such directory (give a folder written by save_pretrained).")
    if (model_dir / ADAPTER_CONFIG).is_file():
        adapter = json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base_class = (adapter.get("auto_mapping") or {}).get("base_model_class")
        if base_class in _BASE_CLASSES:
            return f"{_BASE_CLASSES[base_class]}-adapter"
        base_path = adapter.get("base_model_name_or_path")
        if base_path and (Path(base_path) / "config.json").is_file():
            return f"{checkpoint_kind(base_path)}-adapter"
        raise ValueError(
            f"{model_dir / ADAPTER_CONFIG}: the adapter's base model ({base_class or base_path!r}) is not an "
            "LLM2Vec4CXR or LLM2CLIP4CXR model."
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json or {ADAPTER_CONFIG}: not a saved checkpoint.")
    model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    if model_type not in KINDS:
        raise ValueError(f"{config_path}: model_type must be one of {sorted(KINDS)}, got {model_type!r}.")
    return KINDS[model_type]


def files_to_push(model_dir) -> dict[str, Path]:
    """`{path in repo: local path}` of the folder's files, minus README.md (rendered anew), hidden files and
    Python caches. Raises `ValueError` listing any pickle file, or when no safetensors weights are present."""
    model_dir = Path(model_dir)
    files = {}
    for path in sorted(model_dir.rglob("*")):
        relative = path.relative_to(model_dir)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if relative.suffix == ".pyc" or relative.as_posix() == CARD_FILE:
            continue
        files[relative.as_posix()] = path
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(
            f"Refusing to push pickle files from {model_dir} (loading them can run arbitrary code): "
            f"{', '.join(pickles)}. Save with safetensors (save_pretrained does by default) and remove these files."
        )
    if not any(name.endswith((".safetensors", ".safetensors.index.json")) for name in files):
        raise ValueError(f"{model_dir} holds no .safetensors weights; save the model with save_pretrained first.")
    for name, path in files.items():
        if name.endswith(".safetensors"):
            check_safetensors_file(path)  # an empty or truncated file, or a pickle in disguise, is not published
    return files


def _saved_base(model_dir: Path) -> str | None:
    return json.loads((model_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")


def _adapter_base_source(model_dir: Path, base_model: str | None) -> str:
    """Where to load an adapter's base model from: the local folder it was trained on if it is still there,
    else the Hub id (resolved through the Hub cache)."""
    saved = _saved_base(model_dir)
    source = saved if saved and Path(saved).is_dir() else (base_model or saved)
    if not source:
        raise ValueError(f"{model_dir / ADAPTER_CONFIG} names no base model; pass `base_model=` (a Hub id).")
    return source


def _adapter_base_id(model_dir: Path, base_model: str | None) -> str:
    """The Hub id the card names as an adapter's base model."""
    saved = _saved_base(model_dir)
    hub_id = base_model or (saved if saved and not Path(saved).exists() else None)
    if not hub_id:
        raise ValueError(
            f"The adapter in {model_dir} was trained on the local folder {saved!r}; name the Hub id its base model "
            "is published as (`base_model=` / `--base-model ORG/NAME`), so the card can point to it."
        )
    validate_repo_id(hub_id)
    return hub_id


# Two fresh interpreters: one where llm2clip4cxr cannot be imported (what a Hub user without the package has:
# "remote_code", "sentence_transformers") and one that imports it ("package"). Each check's result goes as JSON
# to a file (stdout may carry library messages); a failing check does not stop the next one.
_VERIFY_SCRIPT = r"""
import importlib.abc, json, sys
mode, kind, path, base, sample, out_file = sys.argv[1:]

class RefuseThisPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm2clip4cxr":
            raise ImportError("the checkpoint's own code must load it, without the llm2clip4cxr package")

if mode == "hub":
    sys.meta_path.insert(0, RefuseThisPackage())
import torch
import transformers
transformers.logging.set_verbosity_error()
from transformers import AutoModel, AutoProcessor
# Explicit either way: transformers never prompts, and "package" runs no file of the folder.
remote = {"trust_remote_code": mode == "hub"}

def load_model():
    if mode == "package":
        import llm2clip4cxr
    if kind.endswith("-adapter"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(base, **remote), path).merge_and_unload()
    else:
        model = AutoModel.from_pretrained(path, **remote)
    model.eval()
    out = {"class": type(model).__name__, "module": type(model).__module__}
    with torch.no_grad():
        if kind.startswith("text"):
            out["output"] = model.encode([sample])[0].tolist()
        else:
            try:
                processor = AutoProcessor.from_pretrained(base if kind.endswith("-adapter") else path, **remote)
            except OSError:  # no processor saved: compare the weights instead
                processor = None
            if processor is not None:
                out["output"] = model.get_text_features(**processor(text=[sample])).pooler_output[0].tolist()
            else:
                out["output"] = [float(sum(p.double().sum() for p in model.state_dict().values()))]
    return out

def load_sentence_transformer():
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(path, trust_remote_code=True, device="cpu")
    return {"class": type(model[0]).__name__, "output": model.encode([sample], convert_to_numpy=True)[0].tolist()}

checks = {"package": load_model} if mode == "package" else {"remote_code": load_model}
if mode == "hub" and kind == "text":
    checks["sentence_transformers"] = load_sentence_transformer
results = {}
for name, check in checks.items():
    try:
        results[name] = check()
    except Exception as error:
        message = str(error).strip().splitlines()
        results[name] = {"error": f"{type(error).__name__}: {message[0] if message else ''}"}
with open(out_file, "w") as handle:
    json.dump(results, handle)
"""


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
    base = _adapter_base_source(model_dir, base_model) if kind.endswith("-adapter") else ""
    expected = ["remote_code", "package"] + (["sentence_transformers"] if kind == "text" else [])
    if not trust_remote_code:
        expected = ["package"]
    modes = ("hub", "package") if trust_remote_code else ("package",)
    with tempfile.TemporaryDirectory() as scratch:
        # A private modules cache: remote code is imported from this checkpoint, not a stale copy.
        env = {**os.environ, "HF_MODULES_CACHE": scratch, "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        result_files = {mode: Path(scratch) / f"{mode}.json" for mode in modes}
        processes = {
            mode: subprocess.Popen(
                [sys.executable, "-c", _VERIFY_SCRIPT, mode, kind, str(model_dir), base, SAMPLE_REPORT,
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
    if outcomes["package"] == "ok" and not kind.endswith("-adapter") and not package["module"].startswith("llm2clip4cxr."):
        outcomes["package"] = f"failed: loaded {package['module']}.{package['class']}, not the package's class"
    passed = [check for check in expected if outcomes[check] == "ok"]
    if len(passed) > 1:
        import numpy as np

        reference = results[passed[0]]["output"]
        for check in passed[1:]:
            if not np.allclose(results[check]["output"], reference, rtol=1e-4, atol=1e-5):
                outcomes[check] = f"failed: its output differs from the {passed[0]} check's"
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


def _read_results(results, model_dir: Path) -> Mapping | None:
    if results is None:
        path = model_dir / RESULTS_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if isinstance(results, Mapping):
        return results
    path = Path(results)
    if not path.is_file():
        raise FileNotFoundError(f"results {path}: no such file (give the results.json of `llm2clip4cxr eval`).")
    return json.loads(path.read_text(encoding="utf-8"))


def build_card(
    model_dir,
    repo_id: str,
    *,
    results=None,
    results_model: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    keep_card: bool = False,
) -> ModelCard:
    """The card pushed with `model_dir`.

    By default it is rendered from `hub_cards/` with `results` (a results file path or dict; default the
    folder's `results.json`) as its model-index. The model's name defaults to the one in the folder's
    existing card, else the repository name. `keep_card=True` pushes the folder's own README.md unchanged
    (it must parse as a model card, and an adapter's card must name its `base_model`).
    """
    model_dir = Path(model_dir)
    kind = checkpoint_kind(model_dir)
    existing = ModelCard.load(model_dir / CARD_FILE) if (model_dir / CARD_FILE).is_file() else None
    if keep_card:
        if existing is None:
            raise FileNotFoundError(f"keep_card: {model_dir} has no {CARD_FILE} to keep.")
        if kind.endswith("-adapter") and not existing.data.base_model:
            raise ValueError(f"{model_dir / CARD_FILE} names no base_model; an adapter's card must.")
        return existing
    from transformers import AutoConfig  # the package's configs are registered by importing llm2clip4cxr

    if kind.endswith("-adapter"):
        config = AutoConfig.from_pretrained(_adapter_base_source(model_dir, base_model), trust_remote_code=False)
        base_model = _adapter_base_id(model_dir, base_model)
    else:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    model_name = model_name or (existing.data.model_name if existing is not None else None)
    results = _read_results(results, model_dir)
    if results is not None:
        results_model = select_model_results(results, [results_model, model_name, model_dir.name])
    return model_card(
        config, repo_id, results=results, results_model=results_model, model_name=model_name,
        base_model=base_model, adapter=kind.endswith("-adapter"),
    )


def merge_adapter(adapter_dir, output_dir, *, base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save the merged checkpoint (weights, tokenizer or processor,
    remote code) to `output_dir`, atomically (through a temporary folder). Returns `output_dir`."""
    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor  # Auto classes registered by importing llm2clip4cxr

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not checkpoint_kind(adapter_dir).endswith("-adapter"):
        raise ValueError(f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a LoRA adapter to merge.")
    load_from = _adapter_base_source(adapter_dir, base_model)
    base = AutoModel.from_pretrained(load_from, trust_remote_code=False)  # the package's registered classes
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        if merged.config.model_type == "llm2clip4cxr":
            try:
                AutoProcessor.from_pretrained(load_from, trust_remote_code=False).save_pretrained(staging)
            except OSError:  # the base has no processor saved: neither will the merged model
                pass

    return atomic_write_folder(output_dir, write)


def push_to_hub(
    model_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    results=None,
    results_model: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    keep_card: bool = False,
    merge: bool = False,
    verify: bool = True,
    trust_remote_code: bool = False,
) -> PushPlan:
    """Check, card and upload a saved LLM2Vec4CXR / LLM2CLIP4CXR checkpoint (or LoRA adapter) to the Hub.

    Args:
        model_dir: a folder written by `save_pretrained` (or a peft adapter folder).
        repo_id: "org/name" of the model repository (created if missing).
        private: create the repository private.
        revision: the branch to commit to (created if missing); with `create_pr`, the PR's target.
        commit_message: default "Upload <kind> checkpoint with llm2clip4cxr".
        create_pr: open a pull request instead of committing directly.
        dry_run: check and render only; return the plan without any network call.
        token: passed to `HfApi`; by default huggingface_hub finds it (`HF_TOKEN`, `hf auth login`).
        results, results_model, model_name, keep_card: see `build_card`.
        base_model: the Hub id of an adapter's base model (or of the model a full checkpoint was fine-tuned from).
        merge: merge an adapter into its base and push the merged weights instead of the adapter.
        verify: run `verify_checkpoint` first (on by default; a failed check stops the push).
        trust_remote_code: let the verification run the folder's own Python files (its remote-code and
            sentence-transformers checks); without it only the package check runs and the plan says so.

    Returns:
        The `PushPlan`; after a push its `commit` holds huggingface_hub's `CommitInfo`.
    """
    validate_repo_id(repo_id)
    if "/" not in repo_id:
        raise ValueError(f"repo_id must be 'org/name' (or 'user/name'), got {repo_id!r}.")
    model_dir = Path(model_dir)
    kind = checkpoint_kind(model_dir)
    if merge:
        if not kind.endswith("-adapter"):
            raise ValueError(f"merge: {model_dir} is not an adapter folder (no {ADAPTER_CONFIG}).")
        base_model = _adapter_base_id(model_dir, base_model)
        with tempfile.TemporaryDirectory() as scratch:
            merged = merge_adapter(model_dir, Path(scratch) / "merged", base_model=base_model)
            return push_to_hub(
                merged, repo_id, private=private, revision=revision, commit_message=commit_message,
                create_pr=create_pr, dry_run=dry_run, token=token,
                results=_read_results(results, model_dir), results_model=results_model,
                model_name=model_name, base_model=base_model, verify=verify, trust_remote_code=trust_remote_code,
            )
    files = files_to_push(model_dir)
    card = build_card(model_dir, repo_id, results=results, results_model=results_model, model_name=model_name,
                      base_model=base_model, keep_card=keep_card)
    plan = PushPlan(
        repo_id=repo_id, kind=kind, files=files, card=card, revision=revision, private=private, create_pr=create_pr,
        commit_message=commit_message or f"Upload {kind} checkpoint with llm2clip4cxr",
    )
    if verify:
        plan.verification = verify_checkpoint(model_dir, base_model=base_model, trust_remote_code=trust_remote_code)
    if dry_run:
        return plan
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode("utf-8")))
    plan.commit = api.create_commit(
        repo_id, operations, commit_message=plan.commit_message, repo_type="model", revision=revision,
        create_pr=create_pr,
    )
    return plan
