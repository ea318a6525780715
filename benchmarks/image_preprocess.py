"""Images/s of ImagePreprocessor (load + resize + pad + normalise) over the real CXR sample files.

The ten files in ../shared/data/cxr-samples (PNG, JPEG up to 2373x2373, JPEG Baseline and JPEG 2000 DICOM)
are repeated to --count images and preprocessed at --size, first in this process, then by a torch
DataLoader whose --workers workers each run the preprocessor as collate_fn on a whole batch. Both runs
must give the same tensor. Worker start-up is counted (it is what a user waits for) and also reported
apart. A single-process split shows where the time goes.

    python benchmarks/image_preprocess.py [--count 200] [--size 224] [--batch-size 16] [--workers 2]
"""

import argparse
import itertools
import os
import time

import numpy as np
import torch

from llm2clip4cxr.data.imaging import ImagePreprocessor, load_image
from llm2clip4cxr.defaults import shared_data_dir

SUFFIXES = (".png", ".jpg", ".dcm")


def sample_paths() -> list[str]:
    folder = shared_data_dir() / "cxr-samples"
    return sorted(str(path) for path in folder.rglob("*") if path.suffix.lower() in SUFFIXES)


def single_process(preprocessor: ImagePreprocessor, paths: list[str], batch_size: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    batches = [preprocessor(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    return torch.cat(batches), time.perf_counter() - start


def data_loader(
    preprocessor: ImagePreprocessor, paths: list[str], batch_size: int, workers: int, context: str | None
) -> tuple[torch.Tensor, float, float]:
    """Output, total seconds, and seconds until the first batch (worker start-up + one batch)."""
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        paths, batch_size=batch_size, num_workers=workers, collate_fn=preprocessor, multiprocessing_context=context
    )
    batches, first = [], None
    for batch in loader:
        batches.append(batch)
        first = first or time.perf_counter() - start
    return torch.cat(batches), time.perf_counter() - start, first


def stage_split(preprocessor: ImagePreprocessor, paths: list[str]) -> dict[str, float]:
    """Seconds per stage over `paths`, single process, one image at a time (normalise over the whole batch)."""
    seconds = {"load": 0.0, "resize+pad": 0.0, "normalise": 0.0}
    squares = []
    for path in paths:
        start = time.perf_counter()
        image = load_image(path)
        middle = time.perf_counter()
        squares.append(preprocessor.resize_and_pad(image))
        seconds["load"] += middle - start
        seconds["resize+pad"] += time.perf_counter() - middle
    start = time.perf_counter()
    preprocessor.normalize(np.stack(squares))
    seconds["normalise"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images preprocessed per run")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--context", choices=("fork", "forkserver", "spawn"), default=None,
                        help="DataLoader start method (default: the platform's)")
    args = parser.parse_args()

    files = sample_paths()
    paths = list(itertools.islice(itertools.cycle(files), args.count))
    preprocessor = ImagePreprocessor(size=args.size)
    preprocessor(files)  # warm-up: page cache, Pillow/pydicom plugin imports
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{len(paths)} images ({len(files)} sample files repeated), size {args.size}, batch {args.batch_size}, "
          f"{cpus} CPUs available, torch {torch.__version__} with {torch.get_num_threads()} threads")

    split = stage_split(preprocessor, files)
    total = sum(split.values())
    print("single-process split over the sample files: "
          + ", ".join(f"{stage} {100 * value / total:.0f}%" for stage, value in split.items()))

    reference, single_seconds = single_process(preprocessor, paths, args.batch_size)
    output, loader_seconds, first_batch = data_loader(preprocessor, paths, args.batch_size, args.workers, args.context)
    torch.testing.assert_close(output, reference)  # workers must compute exactly what one process does
    steady = (len(paths) - args.batch_size) / (loader_seconds - first_batch)

    loader_name = f"DataLoader, {args.workers} workers"
    print(f"{'single process':<24}: {len(paths) / single_seconds:7.1f} images/s ({single_seconds:.2f} s)")
    print(f"{loader_name:<24}: {len(paths) / loader_seconds:7.1f} images/s ({loader_seconds:.2f} s, "
          f"first batch after {first_batch:.2f} s; {steady:.1f} images/s after it)")
    print(f"{'DataLoader / single':<24}: {single_seconds / loader_seconds:7.2f}x")


if __name__ == "__main__":
    main()
