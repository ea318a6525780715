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

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.utils import validate_repo_id

from ..checkpoints import check_safetensors_file
from ..fileio import atomic_write_folder
from .cards import CARD_FILE, build_card, read_results
from .folder import ADAPTER_CONFIG, adapter_base_id, adapter_base_source, checkpoint_kind
from .verify import verify_checkpoint

__all__ = ["PushPlan", "files_to_push", "merge_adapter", "push_to_hub"]

# Pickle-based formats run arbitrary code when loaded: never published.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


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
        target = (
            self.repo_id
            + (f"@{self.revision}" if self.revision else "")
            + (" (as a pull request)" if self.create_pr else "")
        )
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


# Two fresh interpreters: one where llm2clip4cxr cannot be imported (what a Hub user without the package has:
# "remote_code", "sentence_transformers") and one that imports it ("package"). Each check's result goes as JSON
# to a file (stdout may carry library messages); a failing check does not stop the next one.
def merge_adapter(adapter_dir, output_dir, *, base_model: str | None = None) -> Path:
    """Fold a LoRA adapter into its base model and save the merged checkpoint (weights, tokenizer or processor,
    remote code) to `output_dir`, atomically (through a temporary folder). Returns `output_dir`."""
    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor  # Auto classes registered by importing llm2clip4cxr

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    if not checkpoint_kind(adapter_dir).endswith("-adapter"):
        raise ValueError(f"{adapter_dir} has no {ADAPTER_CONFIG}: it is not a LoRA adapter to merge.")
    load_from = adapter_base_source(adapter_dir, base_model)
    base = AutoModel.from_pretrained(load_from, trust_remote_code=False)  # the package's registered classes
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        if merged.config.model_type == "llm2clip4cxr":
            with contextlib.suppress(OSError):  # the base has no processor saved: neither will the merged model
                AutoProcessor.from_pretrained(load_from, trust_remote_code=False).save_pretrained(staging)

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
        base_model = adapter_base_id(model_dir, base_model)
        with tempfile.TemporaryDirectory() as scratch:
            merged = merge_adapter(model_dir, Path(scratch) / "merged", base_model=base_model)
            return push_to_hub(
                merged, repo_id, private=private, revision=revision, commit_message=commit_message,
                create_pr=create_pr, dry_run=dry_run, token=token,
                results=read_results(results, model_dir), results_model=results_model,
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
