"""The wheel (a non-editable install) carries every module and data file the editable checkout has."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> folder in the checkout (pyproject's package-dir mapping)
SOURCES = {"llm2clip4cxr": ROOT / "src" / "llm2clip4cxr", "llm2clip4cxr/modeling": ROOT / "modeling",
           "llm2clip4cxr/hub_cards": ROOT / "hub_cards"}
DATA_SUFFIXES = {".py", ".tsv", ".md", ".json", ".safetensors", ".txt"}


def checkout_files() -> set[str]:
    files = set()
    for package, folder in SOURCES.items():
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in DATA_SUFFIXES and "__pycache__" not in path.parts:
                relative = path.relative_to(folder).as_posix()
                if package == "llm2clip4cxr" and relative.split("/")[0] in ("modeling", "hub_cards"):
                    continue
                files.add(f"{package}/{relative}")
    return files


def test_wheel_contains_every_module_and_data_file(tmp_path):
    # Build from a copy: setuptools reuses the checkout's build/ folder, whose stale files would hide a
    # package missing from pyproject.toml.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", ".venv", ".git", "__pycache__", ".pytest_cache", "site", "runs"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("llm2clip4cxr-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(checkout_files() - in_wheel)
    assert not missing, f"not in the wheel (add the package or data to pyproject.toml): {missing}"
