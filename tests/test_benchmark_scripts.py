"""The GPU benchmark script runs end to end on the CPU (tiny shape), so it is ready for a GPU session; the CLI
start-up benchmark runs and times every --help."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    output = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--reports", "12", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(output.read_text())
    assert data["shape"] == "tiny" and data["reports"] == 12
    assert {"naive loop, batch 64", "encode(), batch 8", "forward only, batch 16"} <= set(data["encode"])
    assert all(row["reports_per_s"] > 0 and row["mfu"] > 0 for row in data["encode"].values())
    assert data["image"]["images_per_s"] > 0
    assert {"train 8 triplets, plain", "train 8 triplets, GradCache mb 4"} <= set(data["training"])


def test_cli_startup_benchmark_times_every_help():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cli_startup.py"), "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("--help" in line for line in lines) == 13 and lines[-1].startswith("slowest: ")
