import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm2clip4cxr.data.imaging import load_image
from llm2clip4cxr.retrieval import find_images, image_encoder, rank, report_encoder

from ..cli.test_cli import write_csv
from ..shared_data import XRV as SAMPLES
from ..shared_data import needs_samples

REPORTS = [("a", "Small right pleural effusion."), ("b", "No acute cardiopulmonary process."),
           ("c", "Heart size is enlarged."), ("d", "Left lower lobe opacity.")]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llm2clip4cxr", *args], capture_output=True, text=True)


@pytest.fixture()
def saved_clip(make_model, processor, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return model, processor, str(tmp_path / "clip")


def model_cosines(model, processor, images, texts):
    """Cosine similarities image x report, from the model's own logits_per_image."""
    inputs = processor(images=[load_image(path) for path in images], text=texts)
    with torch.no_grad():
        return (model(**inputs).logits_per_image / model.get_logit_scale()).numpy()


@needs_samples
def test_encoders_reproduce_the_model_logits(saved_clip):
    model, processor, _ = saved_clip
    images = find_images([SAMPLES])[:3]
    texts = [text for _, text in REPORTS]
    cosines = (
        image_encoder(model, processor, batch_size=2)(images) @ report_encoder(model, processor, batch_size=3)(texts).T
    )
    np.testing.assert_allclose(cosines, model_cosines(model, processor, images, texts), rtol=1e-4, atol=1e-5)


def test_rank_is_exact_top_k_with_stable_ties():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    corpus = np.array([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    order, scores = rank(queries, corpus, k=3)
    assert order.tolist() == [[1, 0, 2], [3, 0, 2]]  # rows 0 and 2 tie: lower index first
    np.testing.assert_allclose(scores, [[1.0, 0.5, 0.5], [1.0, 0.5, 0.5]])
    assert rank(queries, corpus, k=10)[0].shape == (2, 4)
    with pytest.raises(ValueError, match="k must be positive"):
        rank(queries, corpus, k=0)


@needs_samples
def test_find_images_searches_folders_and_rejects_missing_paths(tmp_path):
    found = find_images([SAMPLES])
    assert {path.suffix for path in found} == {".png", ".jpg", ".dcm"}
    assert found == sorted(found) and all(path.parent.name != "LICENSE" for path in found)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        find_images([tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="no image files"):
        find_images([tmp_path])


@needs_samples
def test_cli_image_to_report_and_report_to_image_match_the_model(saved_clip, tmp_path):
    model, processor, path = saved_clip
    images = [SAMPLES / "00000001_000.png", SAMPLES / "16747_3_1.jpg", SAMPLES / "Fake_MONOHR1.dcm"]
    csv_path = write_csv(tmp_path / "reports.csv", rows=[(uid, text, "PA") for uid, text in REPORTS])
    expected = model_cosines(model, processor, images, [text for _, text in REPORTS])

    result = run_cli("retrieve", "image-to-report", *map(str, images), "--csv", str(csv_path), "--id-column", "uid",
                     "--model", path, "--top-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    for entry, row in zip(json.loads(result.stdout)["results"], expected):
        best = np.argsort(-row, kind="stable")[:2]
        assert [hit["id"] for hit in entry["hits"]] == [REPORTS[i][0] for i in best]
        np.testing.assert_allclose([hit["score"] for hit in entry["hits"]], row[best], rtol=1e-4, atol=1e-5)

    query = REPORTS[2][1]
    result = run_cli("retrieve", "report-to-image", query, "--images", *map(str, images), "--model", path, "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["results"][0]["hits"]
    column = expected[:, 2]
    assert [hit["image"] for hit in hits] == [str(images[i]) for i in np.argsort(-column, kind="stable")]


def test_cli_retrieve_errors_are_clear(saved_clip, make_encoder, tmp_path):
    _, _, path = saved_clip
    csv_path = write_csv(tmp_path / "reports.csv", rows=[(uid, text, "PA") for uid, text in REPORTS])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    result = run_cli("retrieve", "image-to-report", str(tmp_path / "broken.png"), "--csv", str(csv_path),
                     "--model", path)
    assert result.returncode == 1 and "broken.png" in result.stderr
    make_encoder().save_pretrained(tmp_path / "text")
    result = run_cli(
        "retrieve", "report-to-image", "query", "--images", str(tmp_path), "--model", str(tmp_path / "text")
    )
    assert result.returncode == 1 and "needs an LLM2CLIP4CXR checkpoint" in result.stderr
    assert run_cli("retrieve", "report-to-image", "query", "--model", path).returncode == 2  # --images missing
