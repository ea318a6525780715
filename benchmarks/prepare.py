"""Images/s of the resize step of `prepare`, one worker vs all cores, on a FABRICATED layout.

The ten real files in ../shared/data/cxr-samples (PNG, JPEG up to 2373x2373, JPEG Baseline and JPEG 2000
DICOM) are copied to --count images in an R2Gen-style IU X-ray folder (annotation.json + images/, made-up
report text), then prepared with --image-size twice: --num-workers 1 (in this process) and all cores
(worker processes, start-up included). Both outputs must hold the same rows and the same image bytes.

    python benchmarks/prepare.py [--count 300] [--image-size 512]
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from llm2clip4cxr.data import load_prepared
from llm2clip4cxr.data.prepare import PrepareOptions, prepare
from llm2clip4cxr.defaults import shared_data_dir

SUFFIXES = (".png", ".jpg", ".dcm")


def fabricate(root: Path, count: int) -> Path:
    samples = sorted(p for p in (shared_data_dir() / "cxr-samples").rglob("*") if p.suffix.lower() in SUFFIXES)
    annotation = {"train": []}
    for index in range(count):
        study = f"CXR{index}_IM-{index:04d}"
        (root / "images" / study).mkdir(parents=True)
        shutil.copy(samples[index % len(samples)], root / "images" / study / "0.png")  # DICOMs are sniffed, not named
        annotation["train"].append(
            {"id": study, "report": f"Made-up findings {index}.", "image_path": [f"{study}/0.png"], "split": "train"}
        )
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=100)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = fabricate(Path(tmp) / "iu", args.count)
        options = PrepareOptions(image_size=args.image_size, shard_size=args.shard_size)
        rates = {}
        for workers in (1, cores):
            output = Path(tmp) / f"out-{workers}"
            start = time.perf_counter()
            summary = prepare(source, output, options, num_workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rates[workers] = summary["total_rows"] / seconds
            print(
                f"{workers:>2} worker(s): {summary['total_rows']} images in {seconds:.2f} s = "
                f"{rates[workers]:.1f} images/s"
            )
        one, many = (load_prepared(Path(tmp) / f"out-{w}", "train") for w in (1, cores))
        assert one["image_id"] == many["image_id"]
        assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(one["image"], many["image"]))
        print(f"speed-up with {cores} cores: {rates[cores] / rates[1]:.2f}x (outputs identical)")


if __name__ == "__main__":
    main()
