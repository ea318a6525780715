"""Saved checkpoints load without this package: from the code save_pretrained copied into them."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel

import llm2clip4cxr
from llm2clip4cxr import LLM2Vec4CXRModel

from ..conftest import INSTRUCTION

MODELING_DIR = Path(llm2clip4cxr.modeling.__file__).parent
ALLOWED_IMPORTS = {
    "torch",
    "transformers",
    "json",
    "os",
    "math",
    "warnings",
    "collections",
    "dataclasses",
    "typing",
    "concurrent",
    "pathlib",
    "shutil",
}  # stdlib, torch, transformers

# Start of every fresh-process script: importing llm2clip4cxr fails, so the checkpoint's own code must do.
REFUSE_PACKAGE = r"""
import importlib.abc, json, sys
import torch

class RefuseThisPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "llm2clip4cxr":
            raise ImportError("the checkpoint must load without llm2clip4cxr")

sys.meta_path.insert(0, RefuseThisPackage())
"""

FRESH_PROCESS = REFUSE_PACKAGE + r"""
path, texts_file, out_file, instruction = sys.argv[1:]
texts = json.load(open(texts_file))
from transformers import AutoModel
from sentence_transformers import SentenceTransformer
model = AutoModel.from_pretrained(path, trust_remote_code=True)
st = SentenceTransformer(path, trust_remote_code=True)
assert "llm2clip4cxr" not in sys.modules, "llm2clip4cxr was imported"
torch.save({
    "class_module": type(model).__module__,
    "encode": model.encode(texts, instruction=instruction),
    "sentence_transformers": st.encode(texts, prompt=instruction, convert_to_tensor=True),
}, out_file)
"""


@pytest.mark.parametrize("pooling_mode", ["mean", "latent_attention"])
def test_fresh_process_without_package_reproduces_embeddings(make_encoder, report_texts, tmp_path, pooling_mode):
    model = make_encoder(pooling_mode=pooling_mode)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    texts = report_texts[:5]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(checkpoint),
            str(tmp_path / "texts.json"),
            str(tmp_path / "out.pt"),
            INSTRUCTION,
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    result = torch.load(tmp_path / "out.pt")
    assert result["class_module"].startswith("transformers_modules.")
    expected = model.encode(texts, instruction=INSTRUCTION)
    torch.testing.assert_close(result["encode"], expected, rtol=0, atol=0)
    torch.testing.assert_close(result["sentence_transformers"], expected, rtol=0, atol=0)


def test_package_registers_auto_classes(make_encoder, tmp_path):
    make_encoder().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_llm2vec4cxr.LLM2Vec4CXRConfig",
        "AutoModel": "modeling_llm2vec4cxr.LLM2Vec4CXRModel",
    }
    assert isinstance(AutoConfig.from_pretrained(tmp_path), llm2clip4cxr.LLM2Vec4CXRConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is LLM2Vec4CXRModel  # the package's class, no remote code


def test_shipped_code_is_the_package_code(make_encoder, tmp_path):
    make_encoder().save_pretrained(tmp_path)
    for name in ("configuration_llm2vec4cxr.py", "modeling_llm2vec4cxr.py"):
        assert (tmp_path / name).read_bytes() == (MODELING_DIR / name).read_bytes()


@pytest.mark.parametrize("path", sorted(MODELING_DIR.glob("*_*.py")), ids=lambda path: path.name)
def test_modeling_files_import_only_torch_transformers_and_siblings(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: a sibling file, copied along as remote code
                assert (MODELING_DIR / f"{node.module}.py").exists()
                continue
            roots = {node.module.split(".")[0]}
        else:
            continue
        assert roots <= ALLOWED_IMPORTS, f"{path.name} imports {roots - ALLOWED_IMPORTS}"


def test_sentence_transformers_layout(make_encoder, report_texts, tmp_path):
    model = make_encoder(instructions={"findings": INSTRUCTION})
    model.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), trust_remote_code=True)
    expected = model.encode(report_texts[:4], instruction=INSTRUCTION)
    by_name = st.encode(report_texts[:4], prompt_name="findings", convert_to_tensor=True)
    torch.testing.assert_close(by_name, expected, rtol=0, atol=0)
    assert st.get_embedding_dimension() == model.config.hidden_size
    similarity = st.similarity(by_name, by_name)
    torch.testing.assert_close(
        similarity, torch.nn.functional.cosine_similarity(expected[:, None], expected[None], dim=-1)
    )
    # Saved again through sentence-transformers, it still loads and gives the same vectors.
    st.save(str(tmp_path / "resaved"))
    reloaded = SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True)
    torch.testing.assert_close(
        reloaded.encode(report_texts[:4], prompt_name="findings", convert_to_tensor=True), expected
    )
