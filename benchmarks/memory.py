"""Peak memory (RSS) of the two inputs that can exhaust it: very long reports and very large images.

Each scenario runs in a fresh Python process that reports its own peak resident set size
(`ru_maxrss`), so one scenario's allocations cannot hide another's:

- encode: the shipped default encoder's `model.encode` on 100 reports of 200,000 characters each
  (real Open-I text repeated), batch size 32. Target: under 1 GB. The model's own size is printed too.
- retrieve, refused: `llm2clip4cxr retrieve report-to-image` over 16 PNGs of ~20 KB that each declare
  13000 x 13000 pixels (1.3 GB each as float32 once decoded). Target: refused before decoding, under 2 GB.
- retrieve, streamed: the same command over 16 PNGs of 8192 x 8192 (the default pixel limit), which
  must stream one image at a time. Target: under 2 GB. `--baseline` adds the old way for comparison:
  4 of these images loaded at once, as a batch, before preprocessing.

    python benchmarks/memory.py [--skip-encode] [--skip-retrieve] [--baseline]

A tiny random LLM2CLIP4CXR model stands in for a trained one (the memory at stake is the images', not the
model's); it is built from the Open-I reports' tokenizer in a temporary folder.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

GB = 1024**3
ROOT = Path(__file__).resolve().parents[1]

# Printed by every scenario as its last line: its own peak RSS (ru_maxrss is in KiB on Linux).
_PEAK = (
    "import resource; print(json.dumps({'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
)

ENCODE = textwrap.dedent("""
    import json, resource
    from llm2clip4cxr import load_default_text_encoder
    from llm2clip4cxr.data import openi_report_texts

    text = " ".join(openi_report_texts()[:2000])
    reports = [(text * (200_000 // len(text) + 1))[i : i + 200_000] for i in range(100)]
    assert all(len(report) == 200_000 for report in reports)
    model = load_default_text_encoder()
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    embeddings = model.encode(reports, batch_size=32, convert_to_numpy=True)
    print(json.dumps({"model_loaded_rss_bytes": loaded, "shape": list(embeddings.shape)}))
""") + _PEAK

RETRIEVE = textwrap.dedent("""
    import json, runpy, sys
    sys.argv = ["llm2clip4cxr", *json.loads(sys.argv[1])]
    try:
        runpy.run_module("llm2clip4cxr", run_name="__main__")
    except SystemExit as exit:
        print(json.dumps({"exit_code": exit.code}))
""") + _PEAK

BASELINE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llm2clip4cxr.data.imaging import load_image
    from llm2clip4cxr.retrieval import load_clip_model

    model, processor = load_clip_model(sys.argv[1])
    images = [load_image(path) for path in json.loads(sys.argv[2])]  # the old image_encoder: a whole batch at once
    pixel_values = processor(images=images)["pixel_values"]
    print(json.dumps({"batch": list(pixel_values.shape)}))
""") + _PEAK

MAKE_CLIP = textwrap.dedent("""
    import sys
    from transformers import CLIPVisionConfig
    from llm2clip4cxr import (LLM2CLIP4CXRConfig, LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel,
                              LLM2CLIP4CXRProcessor)
    from llm2clip4cxr.data import openi_report_texts
    from llm2clip4cxr.training.factory import build_text_encoder
    from llm2clip4cxr.training.tokenization import train_report_tokenizer

    tokenizer = train_report_tokenizer(openi_report_texts()[:800], vocab_size=600)
    text = build_text_encoder(tokenizer, family="llama", backbone_kwargs={"hidden_size": 64, "num_layers": 2})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32)
    config = LLM2CLIP4CXRConfig(text_config=text.config, vision_config=vision, projection_dim=16)
    LLM2CLIP4CXRModel(config, text_model=text).save_pretrained(sys.argv[1])
    LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(size=224), tokenizer).save_pretrained(sys.argv[1])
""")


def run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT)
    out = {}
    for line in result.stdout.splitlines():  # the scenario's one-line JSON records (the CLI's own output aside)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.update(record)
    if "peak_rss_bytes" not in out:
        raise SystemExit(f"scenario failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return out


def show(name: str, result: dict, target_gb: float) -> None:
    peak = result["peak_rss_bytes"] / GB
    verdict = "meets" if peak < target_gb else "MISSES"
    print(f"{name:<44} peak RSS {peak:6.2f} GB  ({verdict} the {target_gb:g} GB target)")


def write_images(folder: Path, side: int, count: int, mode: str) -> list[str]:
    """`count` hard links of one PNG of side x side pixels (a gradient: small file, full decode cost)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    first = folder / "image-00.png"
    if mode == "1":
        Image.new("1", (side, side)).save(first)
    else:
        row = (np.arange(side, dtype=np.uint32) * 255 // max(side - 1, 1)).astype(np.uint8)
        Image.fromarray(np.broadcast_to(row, (side, side))).save(first, compress_level=1)
    paths = [first]
    for i in range(1, count):
        (folder / f"image-{i:02d}.png").hardlink_to(first)
        paths.append(folder / f"image-{i:02d}.png")
    return [str(path) for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-encode", action="store_true")
    parser.add_argument("--skip-retrieve", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also load 4 limit-sized images at once (old way)")
    args = parser.parse_args()

    if not args.skip_encode:
        result = run(ENCODE)
        print(
            f"encode: model loaded at {result['model_loaded_rss_bytes'] / GB:.2f} GB RSS; embeddings {result['shape']}"
        )
        show("encode 100 reports x 200,000 characters", result, 1.0)

    if not args.skip_retrieve:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            subprocess.run([sys.executable, "-c", MAKE_CLIP, str(scratch / "clip")], check=True, cwd=ROOT,
                           capture_output=True)
            bombs = write_images(scratch / "bombs", 13000, 16, "1")
            result = run(RETRIEVE, json.dumps(["retrieve", "report-to-image", "Clear lungs.", "--images", *bombs,
                                               "--model", str(scratch / "clip"), "--json"]))
            print(f"retrieve, 16 x 13000^2 declared: exit code {result['exit_code']}, {result.get('kind')}: "
                  f"{result.get('error', '')[:110]}...")
            show("retrieve 16 images of 13000 x 13000 (refused)", result, 2.0)

            large = write_images(scratch / "large", 8192, 16, "L")
            result = run(RETRIEVE, json.dumps(["retrieve", "report-to-image", "Clear lungs.", "--images", *large,
                                               "--model", str(scratch / "clip"), "--json", "--batch-size", "16"]))
            print(f"retrieve, 16 x 8192^2: exit code {result['exit_code']}")
            show("retrieve 16 images of 8192 x 8192 (streamed)", result, 2.0)
            if args.baseline:
                result = run(BASELINE, str(scratch / "clip"), json.dumps(large[:4]))
                show("baseline: 4 images of 8192 x 8192 at once", result, 2.0)


if __name__ == "__main__":
    main()
