"""The Ray Data engine (`llm2clip4cxr.retrieval.ray_engine`) on a local Ray started here (`ray.init(num_cpus=2)`).

Every test that runs Ray sits in one xdist group, so a `-n 2` run starts one local Ray, not two.
"""

import dataclasses
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from llm2clip4cxr.data import load_text_dataset
from llm2clip4cxr.retrieval.ray_engine import (
    SHARDS_DIR,
    ImageEncoder,
    RayWorkerError,
    TextEncoder,
    embed_with_ray,
    read_shards,
)
from llm2clip4cxr.training.factory import build_text_encoder

from ..shared_data import OPENI_REPORTS, XRV, needs_openi, needs_samples

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")

ROWS, ROWS_PER_SHARD = 2000, 500


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # The fault-injecting encoders below are defined in this test module, which the workers cannot import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tokenizer, tmp_path_factory):
    """A tiny random LLM2Vec4CXR checkpoint on disk (workers load it by path, as on a cluster)."""
    import copy

    import transformers

    transformers.set_seed(0)
    model = build_text_encoder(copy.deepcopy(tokenizer), backbone_kwargs={"hidden_size": 64, "num_layers": 2},
                               num_latents=16).eval()
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def openi():
    """The first 2,000 Open-I reports with findings, ids = study uids."""
    dataset = load_text_dataset(OPENI_REPORTS, "findings", "uid")
    return dataset.select(range(ROWS))


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_model, openi, tmp_path_factory):
    """One Ray run over the 2,000 reports with 2 workers: (output folder, summary)."""
    output = tmp_path_factory.mktemp("ray") / "embeddings"
    summary = embed_with_ray(openi, TextEncoder(tiny_model[1], batch_size=32), output, rows_per_shard=ROWS_PER_SHARD,
                             encoder_name="tiny", num_workers=2, progress=False)
    return output, summary


@dataclasses.dataclass(frozen=True)
class KillOnce:
    """Wraps an encoder: the first worker to claim `marker` is SIGKILLed mid-shard (before returning)."""

    inner: TextEncoder
    marker: str

    def __call__(self):
        encode, marker = self.inner(), self.marker

        def encode_or_die(texts):
            try:
                os.unlink(marker)  # atomic claim: exactly one call in the whole run gets here first
            except FileNotFoundError:
                return encode(texts)
            os.kill(os.getpid(), signal.SIGKILL)

        return encode_or_die


@dataclasses.dataclass(frozen=True)
class Recording:
    """Wraps an encoder: appends the number of texts of every call to `log` (one line per call)."""

    inner: TextEncoder
    log: str

    def __call__(self):
        encode, log = self.inner(), self.log

        def recorded(texts):
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(f"{len(texts)}\n")
            return encode(texts)

        return recorded


@needs_openi
def test_ray_embeddings_equal_local_encode_on_2000_openi_reports(first_run, tiny_model, openi):
    output, summary = first_run
    model, _ = tiny_model
    assert summary["written"] == [0, 1, 2, 3] and summary["skipped"] == []
    ids, vectors = read_shards(output)
    expected = model.encode(list(openi["text"]), batch_size=32, convert_to_numpy=True)
    assert ids == list(openi["id"])
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (ROWS, 64)
    assert float(np.abs(vectors - expected).max()) < 1e-5
    import hashlib

    import pyarrow.parquet as pq

    shard = pq.read_table(output / SHARDS_DIR / "shard-000001-of-000004.parquet")
    assert shard.column_names == ["id", "text_sha256", "embedding"]
    texts = openi["text"][ROWS_PER_SHARD : 2 * ROWS_PER_SHARD]
    assert shard.column("text_sha256").to_pylist() == [hashlib.sha256(t.encode()).hexdigest() for t in texts]


@needs_openi
def test_read_shards_can_fill_a_memory_map(first_run, tmp_path):
    ids, in_ram = read_shards(first_run[0])
    mapped_ids, mapped = read_shards(first_run[0], out=tmp_path / "all.npy")
    assert isinstance(mapped, np.memmap) and mapped_ids == ids
    np.testing.assert_array_equal(mapped, in_ram)


@needs_openi
def test_a_rerun_skips_finished_shards(first_run, tiny_model, openi, tmp_path):
    output = tmp_path / "embeddings"
    shutil.copytree(first_run[0], output)
    kept = output / SHARDS_DIR / "shard-000000-of-000004.parquet"
    kept_stat = kept.stat()
    (output / SHARDS_DIR / "shard-000002-of-000004.parquet").unlink()  # as if the run was killed before it
    log = tmp_path / "calls.txt"
    summary = embed_with_ray(openi, Recording(TextEncoder(tiny_model[1], batch_size=32), str(log)), output,
                             rows_per_shard=ROWS_PER_SHARD, encoder_name="tiny", num_workers=2, progress=False)
    assert summary["written"] == [2] and summary["skipped"] == [0, 1, 3]
    assert sum(int(line) for line in log.read_text().split()) == ROWS_PER_SHARD  # only the missing shard's rows
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)
    np.testing.assert_array_equal(read_shards(output)[1], read_shards(first_run[0])[1])
    # Everything written: a third run starts no Ray job at all.
    assert embed_with_ray(openi, KillOnce(TextEncoder(tiny_model[1]), str(tmp_path / "unused")), output,
                          rows_per_shard=ROWS_PER_SHARD, encoder_name="tiny", progress=False)["written"] == []


@needs_openi
def test_a_rerun_with_another_encoder_dtype_or_data_is_refused(first_run, tiny_model, openi, tmp_path):
    output = tmp_path / "embeddings"
    shutil.copytree(first_run[0], output)
    encoder = TextEncoder(tiny_model[1])
    settings = {"rows_per_shard": ROWS_PER_SHARD, "encoder_name": "tiny", "progress": False}
    with pytest.raises(ValueError, match="encoder: 'tiny' there, 'other' now"):
        embed_with_ray(openi, encoder, output, **{**settings, "encoder_name": "other"})
    with pytest.raises(ValueError, match="dtype: 'float32' there, 'float16' now"):
        embed_with_ray(openi, encoder, output, dtype="float16", **settings)
    with pytest.raises(ValueError, match="data_fingerprint"):
        embed_with_ray(openi.select(range(1, ROWS)), encoder, output, **settings)
    with pytest.raises(ValueError, match="holds no manifest.json"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        embed_with_ray(openi, encoder, tmp_path / "other", **settings)


@needs_openi
def test_a_killed_worker_is_retried_and_the_output_is_complete_and_identical(first_run, tiny_model, openi,
                                                                             tmp_path):
    marker = tmp_path / "kill-me"
    marker.touch()
    output = tmp_path / "embeddings"
    half = openi.select(range(2 * ROWS_PER_SHARD))  # the first two shards of the first run
    summary = embed_with_ray(half, KillOnce(TextEncoder(tiny_model[1], batch_size=32), str(marker)), output,
                             rows_per_shard=ROWS_PER_SHARD, encoder_name="tiny", num_workers=2, progress=False)
    assert not marker.exists()  # a worker was killed
    assert summary["written"] == [0, 1]
    ids, vectors = read_shards(output)
    expected_ids, expected = read_shards(first_run[0])
    assert ids == expected_ids[: len(half)]
    np.testing.assert_array_equal(vectors, expected[: len(half)])


@pytest.fixture()
def saved_clip(make_encoder, tokenizer, tmp_path):
    from transformers import CLIPVisionConfig

    from llm2clip4cxr import LLM2CLIP4CXRConfig, LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRModel, LLM2CLIP4CXRProcessor

    encoder = make_encoder()
    vision = CLIPVisionConfig(intermediate_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    config = LLM2CLIP4CXRConfig(text_config=encoder.config, vision_config=vision, projection_dim=16)
    model = LLM2CLIP4CXRModel(config, text_model=encoder).eval()
    processor = LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(size=32), tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return model, processor, str(tmp_path / "clip")


@needs_samples
def test_images_are_decoded_in_the_workers_and_equal_local_encoding(ray_local, saved_clip, tmp_path):
    import datasets

    from llm2clip4cxr.retrieval import find_images, image_encoder

    model, processor, path = saved_clip
    images = [str(image) for image in find_images([XRV])][:6]
    dataset = datasets.Dataset.from_dict({"image_id": [f"img{i}" for i in range(len(images))], "image": images})
    summary = embed_with_ray(dataset, ImageEncoder(path, batch_size=2), tmp_path / "images", column="image",
                             id_column="image_id", rows_per_shard=3, num_workers=1, progress=False)
    assert summary["dim"] == 16
    ids, vectors = read_shards(tmp_path / "images")
    assert ids == list(dataset["image_id"])
    np.testing.assert_allclose(vectors, image_encoder(model, processor, batch_size=2)(images), atol=1e-5, rtol=0)


def test_cli_encode_with_the_ray_engine_writes_the_shards_folder(ray_local, tiny_model, tmp_path, capsys):
    from llm2clip4cxr.cli import main

    csv_path = tmp_path / "reports.csv"
    csv_path.write_text("uid,findings\nr1,Small right pleural effusion.\nr2,\nr3,No pneumothorax.\n"
                        "r4,Heart size is normal.\n", encoding="utf-8")
    common = ["--csv", str(csv_path), "--id-column", "uid", "--model", tiny_model[1], "--instruction", "Find"]
    assert main(["encode", *common, "--output", str(tmp_path / "local.npy")]) == 0
    assert main(["encode", *common, "--engine", "ray", "--chunk-size", "2", "--output", str(tmp_path / "emb"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"output": str(tmp_path / "emb"), "num_texts": 3, "dim": 64}
    ids, vectors = read_shards(tmp_path / "emb")
    assert ids == ["r1", "r3", "r4"]
    assert float(np.abs(vectors - np.load(tmp_path / "local.npy")).max()) < 1e-5
    # Another instruction into the same folder is refused in one line.
    code = main(["encode", *common[:-1], "Other", "--engine", "ray", "--output", str(tmp_path / "emb")])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1 and "holds embeddings of another run" in error
    # --engine ray only options without --engine ray are refused.
    assert main(["encode", *common, "--num-workers", "2", "--output", str(tmp_path / "x.npy")]) == 1
    assert "--num-workers needs --engine ray" in capsys.readouterr().err


def test_ray_engine_module_does_not_import_ray_until_used():
    import subprocess

    code = "import sys, llm2clip4cxr.retrieval.ray_engine, llm2clip4cxr.cli; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent).returncode == 0


def test_cli_index_build_with_the_ray_engine_equals_the_local_engine(ray_local, tiny_model, tmp_path, capsys,
                                                                     monkeypatch):
    from llm2clip4cxr.cli import main

    monkeypatch.chdir(tmp_path)  # where a Qdrant build keeps its chunks by default

    csv_path = tmp_path / "reports.csv"
    rows = ["Small right pleural effusion.", "No pneumothorax.", "Heart size is normal.", "Left basilar opacity.",
            "Stable cardiomegaly.", "No acute cardiopulmonary process."]
    csv_path.write_text("uid,findings\n" + "".join(f"r{i},{text}\n" for i, text in enumerate(rows)), encoding="utf-8")
    common = ["index", "build", "--csv", str(csv_path), "--id-column", "uid", "--model", tiny_model[1],
              "--backend", "qdrant", "--qdrant-path", str(tmp_path / "qdrant"), "--json"]
    assert main([*common, "--collection", "local"]) == 0
    assert main([*common, "--collection", "ray", "--engine", "ray", "--chunk-size", "4",
                 "--work-dir", str(tmp_path / "work")]) == 0
    assert not (tmp_path / "work").exists()  # the shards are removed once the vectors are in the collection
    capsys.readouterr()
    search = ["index", "search", "--backend", "qdrant", "--qdrant-path", str(tmp_path / "qdrant"), "--json",
              "--top-k", "6", "Pleural effusion on the right."]
    hits = {}
    for collection in ("local", "ray"):
        assert main([*search, "--collection", collection]) == 0
        hits[collection] = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert [hit["id"] for hit in hits["ray"]] == [hit["id"] for hit in hits["local"]]
    np.testing.assert_allclose([hit["score"] for hit in hits["ray"]], [hit["score"] for hit in hits["local"]],
                               atol=1e-5)


@needs_openi
def test_float16_shards_and_a_model_missing_on_the_workers(ray_local, tiny_model, openi, tmp_path):
    model, path = tiny_model
    small = openi.select(range(40))
    embed_with_ray(small, TextEncoder(path), tmp_path / "half", rows_per_shard=20, dtype="float16", num_workers=1,
                   progress=False)
    ids, vectors = read_shards(tmp_path / "half")
    assert ids == list(small["id"]) and vectors.dtype == np.float16
    expected = model.encode(list(small["text"]), convert_to_numpy=True)
    np.testing.assert_allclose(vectors.astype(np.float32), expected, rtol=1e-3, atol=1e-3)
    # The model loads in the workers: a folder they cannot find stops the run with its message, not a retry loop.
    missing = r"shard \[0\]: FileNotFoundError: model .*absent: no such directory"
    with pytest.raises(RayWorkerError, match=missing) as caught:
        embed_with_ray(small, TextEncoder(str(tmp_path / "absent")), tmp_path / "none", rows_per_shard=40,
                       num_workers=1, progress=False)
    assert "\n" not in str(caught.value) and "finished shards are kept" in str(caught.value)
