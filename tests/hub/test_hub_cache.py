"""Checkpoints load by repo id from a local Hub cache, offline, as they would after a download from the Hub."""

import json
import os
import shutil
import subprocess
import sys

import torch

from llm2clip4cxr.defaults import default_model_path, load_default_text_encoder

from ..modeling.test_remote_code import REFUSE_PACKAGE

REPO_ID = "llm2clip4cxr-test/llm2vec4cxr-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPORTS = ["No acute cardiopulmonary process.", "Small left pleural effusion."]

BY_REPO_ID = r"""
import json, sys, torch
repo_id, instruction, out_file, with_package = sys.argv[1:]
from transformers import AutoModel
texts = json.loads(""" + repr(json.dumps(REPORTS)) + r""")
if with_package == "1":
    import llm2clip4cxr
    model = AutoModel.from_pretrained(repo_id)
    result = {"module": type(model).__module__, "encode": model.encode(texts, instruction=instruction)}
else:
    from sentence_transformers import SentenceTransformer
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
    st = SentenceTransformer(repo_id, trust_remote_code=True, device="cpu")
    result = {"module": type(model).__module__, "encode": model.encode(texts, instruction=instruction),
              "sentence_transformers": st.encode(texts, prompt=instruction, convert_to_tensor=True)}
torch.save(result, out_file)
"""


def populate_cache(hub_cache, repo_id, model_dir, commit=COMMIT):
    """Lay `model_dir` out as huggingface_hub's cache holds a downloaded snapshot of `repo_id` at `main`
    (written by hand because huggingface_hub fills its cache only by downloading)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_load_by_repo_id_from_an_offline_cache(tmp_path):
    hub_cache = tmp_path / "home" / "hub"
    populate_cache(hub_cache, REPO_ID, default_model_path("text"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("TRANSFORMERS_CACHE", None)
    model = load_default_text_encoder()
    instruction = model.config.default_instruction
    expected = model.encode(REPORTS, instruction=instruction)
    runs = {"package": ("1", BY_REPO_ID), "remote_code": ("0", REFUSE_PACKAGE + BY_REPO_ID)}
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-c", script, REPO_ID, instruction, str(tmp_path / f"{name}.pt"), flag],
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (flag, script) in runs.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr[-2000:]}"
    package = torch.load(tmp_path / "package.pt")
    assert package["module"] == "llm2clip4cxr.modeling.modeling_llm2vec4cxr"
    torch.testing.assert_close(package["encode"], expected)
    remote = torch.load(tmp_path / "remote_code.pt")
    assert remote["module"].startswith("transformers_modules.")  # the snapshot's own code
    torch.testing.assert_close(remote["encode"], expected)
    torch.testing.assert_close(remote["sentence_transformers"], expected)
    # Nothing else was fetched into the cache.
    assert sorted(p.name for p in hub_cache.iterdir()) == [f"models--{REPO_ID.replace('/', '--')}"]
