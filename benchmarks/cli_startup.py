"""How long `llm2clip4cxr --help` and every `llm2clip4cxr <command> --help` take, in fresh processes.

The target is under 1 s each: building the parser imports no torch, transformers, datasets or faiss (they are
imported by the command that runs). Prints the median of --repeats runs per command, and the interpreter's
bare start-up for comparison.

    python benchmarks/cli_startup.py [--repeats 5]
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [
    [], ["similarity"], ["encode"], ["similar"], ["index", "build"], ["index", "search"],
    ["retrieve", "image-to-report"], ["retrieve", "report-to-image"], ["eval"], ["prepare"],
    ["convert", "llm2vec4cxr"], ["convert", "llm2clip4cxr"], ["push"],
]


def seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the median is printed)")
    args = parser.parse_args()
    script = shutil.which("llm2clip4cxr", path=str(Path(sys.executable).parent))
    launcher = [script] if script else [sys.executable, "-m", "llm2clip4cxr"]
    print(f"{'python -c pass (interpreter start)':<45} {seconds([sys.executable, '-c', 'pass'], args.repeats):6.3f} s")
    slowest = 0.0
    for command in COMMANDS:
        took = seconds([*launcher, *command, "--help"], args.repeats)
        slowest = max(slowest, took)
        print(f"{' '.join(['llm2clip4cxr', *command, '--help']):<45} {took:6.3f} s")
    print(f"slowest: {slowest:.3f} s ({'under' if slowest < 1.0 else 'OVER'} the 1 s target)")


if __name__ == "__main__":
    main()
