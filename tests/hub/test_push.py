"""`llm2clip4cxr push` / `hub.push_to_hub`, offline: HfApi is mocked and the exact commit is checked."""

import json
import logging
import shutil
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import llm2clip4cxr.hub.push as hub
from llm2clip4cxr.cli import main
from llm2clip4cxr.defaults import default_model_path
from llm2clip4cxr.hub import CheckpointVerificationError, merge_adapter, push_to_hub, verify_checkpoint
from llm2clip4cxr.training.recipe import apply_lora

from ..conftest import INSTRUCTION

SECRET = "hf_TESTtokenThatMustNeverBePrinted0123456789"
DEFAULT_FILES = {"README.md", "config.json", "config_sentence_transformers.json", "configuration_llm2vec4cxr.py",
                 "model.safetensors", "modeling_llm2vec4cxr.py", "modules.json", "results.json", "tokenizer.json",
                 "tokenizer_config.json"}


@pytest.fixture()
def api(monkeypatch):
    """A mock HfApi with the real method signatures; records what would be sent."""
    constructed = []

    def make(*args, **kwargs):
        constructed.append(kwargs)
        instance = mock.create_autospec(HfApi, instance=True)
        instance.create_commit.return_value = mock.Mock(commit_url="https://hf.co/x/commit/1", pr_url=None)
        constructed.append(instance)
        return instance

    monkeypatch.setattr(hub, "HfApi", make)
    return constructed


def committed(api) -> dict[str, bytes]:
    instance = api[1]
    operations = instance.create_commit.call_args.args[1]
    return {op.path_in_repo: (op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                              else open(op.path_or_fileobj, "rb").read()) for op in operations}


@pytest.fixture()
def tiny_checkpoint(make_encoder, tmp_path):
    path = tmp_path / "model"
    make_encoder().save_pretrained(path)
    return path


def test_dry_run_on_the_shipped_default_prints_files_and_card_without_network(monkeypatch, capsys):
    monkeypatch.setattr(hub, "HfApi", mock.Mock(side_effect=AssertionError("a dry run must not touch the Hub")))
    code = main(["push", str(default_model_path("text")), "--repo-id", "me/llm2vec4cxr-tiny", "--dry-run",
                 "--trust-remote-code"])
    out = capsys.readouterr().out
    assert code == 0
    listed = {line.split()[0] for line in out.split("--- README.md ---")[0].splitlines() if line.startswith("  ")}
    assert listed == DEFAULT_FILES
    assert "load checks: remote_code ok, package ok, sentence_transformers ok" in out
    card = ModelCard(out.split("--- README.md ---\n", 1)[1].rsplit("\ndry run:", 1)[0])
    assert card.data.model_name == "LLM2Vec4CXR-tiny (default)"
    recall = {
        r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_config == "findings_to_impression"
    }
    shipped = json.loads((default_model_path("text") / "results.json").read_text())
    assert recall["recall@1"] == round(
        shipped["models"]["LLM2Vec4CXR-tiny (default)"]["findings_to_impression"]["recall@1"], 4
    )
    assert 'AutoModel.from_pretrained("me/llm2vec4cxr-tiny")' in card.text


def test_push_commits_exactly_the_checked_files_and_card(tiny_checkpoint, api, capsys, caplog):
    (tiny_checkpoint / ".cache").mkdir()
    (tiny_checkpoint / ".cache" / "lock").write_text("x")
    caplog.set_level(logging.DEBUG)
    plan = push_to_hub(tiny_checkpoint, "org/llm2vec4cxr-test", private=True, revision="v1", commit_message="first",
                       token=SECRET, verify=False)
    assert api[0] == {"token": SECRET}  # handed to huggingface_hub, nowhere else
    instance = api[1]
    instance.create_repo.assert_called_once_with(
        "org/llm2vec4cxr-test", repo_type="model", private=True, exist_ok=True
    )
    instance.create_branch.assert_called_once_with(
        "org/llm2vec4cxr-test", repo_type="model", branch="v1", exist_ok=True
    )
    kwargs = instance.create_commit.call_args.kwargs
    assert kwargs == {"commit_message": "first", "repo_type": "model", "revision": "v1", "create_pr": False}
    files = committed(api)
    on_disk = {p.name for p in tiny_checkpoint.iterdir() if p.is_file()}
    assert set(files) == on_disk | {"README.md"} and ".cache/lock" not in files
    for name in on_disk:
        assert files[name] == (tiny_checkpoint / name).read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "sentence-similarity" and str(card) == str(plan.card)
    assert SECRET not in capsys.readouterr().out + caplog.text + json.dumps(plan.to_dict()) + plan.describe()


def test_create_pr_targets_the_revision_without_creating_a_branch(tiny_checkpoint, api):
    push_to_hub(tiny_checkpoint, "org/x", revision="dev", create_pr=True, verify=False)
    instance = api[1]
    instance.create_branch.assert_not_called()
    assert instance.create_commit.call_args.kwargs["create_pr"] is True
    assert instance.create_commit.call_args.kwargs["revision"] == "dev"


def test_cli_push_prints_no_token_and_the_commit_url(tiny_checkpoint, api, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["push", str(tiny_checkpoint), "--repo-id", "org/x", "--no-verify", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["commit_url"] == "https://hf.co/x/commit/1" and payload["dry_run"] is False
    assert "model.safetensors" in payload["files"]
    assert api[0] == {"token": None}  # huggingface_hub reads HF_TOKEN itself
    assert SECRET not in captured.out + captured.err


def test_pickles_are_refused_and_listed(tiny_checkpoint, api, capsys):
    (tiny_checkpoint / "training_args.bin").write_bytes(b"\x80\x04")
    (tiny_checkpoint / "sub").mkdir()
    (tiny_checkpoint / "sub" / "optimizer.pt").write_bytes(b"\x80\x04")
    assert main(["push", str(tiny_checkpoint), "--repo-id", "org/x", "--no-verify"]) == 1
    err = capsys.readouterr().err
    assert "Refusing to push pickle files" in err and "training_args.bin" in err and "sub/optimizer.pt" in err
    assert api == []  # nothing was contacted


def test_bad_inputs_are_named(tiny_checkpoint, tmp_path, capsys):
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "org/x", "--dry-run"]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["push", str(tiny_checkpoint), "--repo-id", "not a repo", "--dry-run"]) == 1
    assert "Repo id must" in capsys.readouterr().err
    (tiny_checkpoint / "model.safetensors").unlink()
    assert main(["push", str(tiny_checkpoint), "--repo-id", "org/x", "--dry-run", "--no-verify"]) == 1
    assert "no .safetensors weights" in capsys.readouterr().err


def test_verification_names_the_failed_checks(tiny_checkpoint):
    # Broken remote code: the package still loads the folder, the Hub-style loads do not.
    with open(tiny_checkpoint / "modeling_llm2vec4cxr.py", "a") as handle:
        handle.write("\nraise RuntimeError('broken remote code')\n")
    with pytest.raises(CheckpointVerificationError) as error:
        verify_checkpoint(tiny_checkpoint, trust_remote_code=True)
    message = str(error.value)
    assert "remote_code failed: RuntimeError: broken remote code" in message
    assert "sentence_transformers failed: RuntimeError: broken remote code" in message
    assert "package failed" not in message


def test_lora_adapter_is_pushed_with_its_base_model_or_merged(make_encoder, tmp_path, api, report_texts):
    base = make_encoder()
    base.save_pretrained(tmp_path / "base")
    lora = apply_lora(make_encoder(), r=2)
    torch.manual_seed(1)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it change the outputs
            torch.nn.init.normal_(parameter, std=0.1)
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    lora.save_pretrained(tmp_path / "adapter")

    with pytest.raises(ValueError, match="--base-model ORG/NAME"):
        push_to_hub(tmp_path / "adapter", "org/adapter", dry_run=True, verify=False)
    # (verify=False keeps this test fast; the adapter's peft load is checked through merge_adapter below.)
    plan = push_to_hub(tmp_path / "adapter", "org/adapter", base_model="org/base", token=SECRET, verify=False)
    assert plan.kind == "text-adapter"
    files = committed(api)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "org/base" and card.data.library_name == "peft"

    texts = report_texts[:3]
    expected = lora.merge_and_unload().eval().encode(texts, instruction=INSTRUCTION)
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    from llm2clip4cxr import LLM2Vec4CXRModel

    torch.testing.assert_close(
        LLM2Vec4CXRModel.from_pretrained(merged).encode(texts, instruction=INSTRUCTION), expected
    )
    plan = push_to_hub(
        tmp_path / "adapter", "org/merged", base_model="org/base", merge=True, dry_run=True, verify=False
    )
    assert plan.kind == "text" and "adapter_config.json" not in plan.files and "model.safetensors" in plan.files
    assert plan.card.data.base_model == "org/base" and plan.card.data.library_name == "transformers"
    shutil.rmtree(tmp_path / "merged")


def test_dry_run_without_trust_runs_no_code_from_the_folder(tiny_checkpoint, tmp_path, capsys):
    # A stranger's checkpoint whose model file writes a file when imported.
    marker = tmp_path / "the checkpoint's code ran"
    with open(tiny_checkpoint / "modeling_llm2vec4cxr.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    assert main(["push", str(tiny_checkpoint), "--repo-id", "org/x", "--dry-run", "--json"]) == 0
    verification = json.loads(capsys.readouterr().out)["verification"]
    assert not marker.exists()
    assert verification["package"] == "ok"  # checked through the package's own classes
    assert verification["remote_code"].startswith("not tried") and "--trust-remote-code" in verification["remote_code"]
    assert verification["sentence_transformers"].startswith("not tried")

