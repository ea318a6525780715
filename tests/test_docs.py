"""The documentation site builds with `mkdocs build --strict`, and every code block of the quickstart runs.

Quickstart rule, for bash blocks: each block is split at `&&` and its commands run in order with the
venv's bin first on PATH, offline (HF_HUB_OFFLINE=1), from the repository root, except that
* `pip install ...` steps are skipped: this test runs inside the environment they install, and
  re-installing would need the network;
* `python -m pytest ...` (the README's test command, which CI runs as the test suite itself) gets
  `--collect-only -q`: running the suite from inside the suite would recurse. Even collecting takes
  ~15-30 s on 2 cores, so that block is marked slow (`-m slow`); CI runs the command itself anyway.
Python blocks run in a fresh interpreter, from the repository root; so does every Python block of
README.md.
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return [(language, body) for language, body in FENCE.findall(path.read_text(encoding="utf-8"))]


def readme_block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split(f"<!-- {marker} -->", 1)[1]
    return FENCE.search(after).group(2)


def runnable_commands(block: str) -> list[list[str]]:
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for command in (part.strip() for part in line.split("&&")):
            if not command or command.startswith("pip install"):
                continue
            words = shlex.split(command)
            if words[:3] == ["python", "-m", "pytest"]:
                words += ["--collect-only", "-q"]
            commands.append(words)
    return commands


def environment() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"}


def test_quickstart_starts_with_the_readme_commands():
    blocks = code_blocks(QUICKSTART)
    assert blocks[0] == ("bash", readme_block("main-command"))
    assert blocks[1] == ("bash", readme_block("test-command"))
    assert runnable_commands(blocks[0][1])[0][:2] == ["llm2clip4cxr", "similarity"]


@pytest.mark.parametrize("index", range(len(code_blocks(QUICKSTART))))
def test_quickstart_block_runs(index):
    language, body = code_blocks(QUICKSTART)[index]
    if language == "python":
        result = subprocess.run(
            [sys.executable, "-c", body], cwd=ROOT, env=environment(), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return
    assert language == "bash", f"block {index}: no rule to run a {language!r} block"
    commands = runnable_commands(body)
    assert commands, f"block {index} has nothing to run"
    for words in commands:
        result = subprocess.run(words, cwd=ROOT, env=environment(), capture_output=True, text=True)
        assert result.returncode == 0, f"{shlex.join(words)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if words[:2] == ["llm2clip4cxr", "similarity"]:  # the reports come back, scored
            reports = [word for word in words[2:] if not word.startswith("--") and word.endswith(".")]
            assert all(report in result.stdout for report in reports)
        if "pytest" in words:
            assert "collected" in result.stdout


README_PYTHON = [body for language, body in code_blocks(ROOT / "README.md") if language == "python"]


@pytest.mark.parametrize("index", range(len(README_PYTHON)))
def test_readme_python_block_runs(index):
    result = subprocess.run([sys.executable, "-c", README_PYTHON[index]], cwd=ROOT, env=environment(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_mkdocs_site_builds_strictly(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the docs toolchain is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api_page = (tmp_path / "site" / "api" / "hub" / "index.html").read_text(encoding="utf-8")
    assert "push_to_hub" in api_page and "verify_checkpoint" in api_page  # rendered from the docstrings
    assert 'class="mermaid"' in (tmp_path / "site" / "architecture" / "index.html").read_text(encoding="utf-8")
