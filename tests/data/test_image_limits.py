"""Images that would take too much memory are refused before decoding, retrieval holds one full-size image
at a time, and a truncated DICOM is called truncated."""

import json
import weakref

import numpy as np
import pytest
from PIL import Image, ImageFile

import llm2clip4cxr.data.imaging as imaging
from llm2clip4cxr.cli import main
from llm2clip4cxr.data.imaging import ImageLoadError, ImageTooLargeError, load_image
from llm2clip4cxr.retrieval import image_encoder

from ..shared_data import XRV, needs_samples
from .test_imaging import MONO2_DICOM, write_dicom

PNG = XRV / "00000001_000.png"


def refuse_decoding(monkeypatch):
    """Make any attempt to decode pixel data fail the test: the limit must act on the header alone."""
    def decode(self):
        pytest.fail("the image was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)


def test_a_small_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(path)  # 1-bit zeros: a ~20 KB file that would decode to 1.3 GB as float32
    assert path.stat().st_size < 200_000
    refuse_decoding(monkeypatch)
    with pytest.raises(
        ImageTooLargeError,
        match=r"bomb.png declares 13000 x 13000 = 169,000,000 pixels, over the limit "
        r"of 67,108,864",
    ):
        load_image(path)


@needs_samples
def test_the_pixel_limit_is_configurable_per_call_and_per_process(tmp_path, monkeypatch):
    width, height = Image.open(PNG).size
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000"):
        load_image(PNG, max_pixels=1000)
    assert load_image(PNG, max_pixels=width * height).shape == (height, width)  # the limit itself is allowed
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", width * height - 1)
    with pytest.raises(ImageTooLargeError):
        load_image(PNG)
    assert load_image(PNG, max_pixels=0).shape == (height, width)  # 0: no limit
    dicom = write_dicom(tmp_path / "large.dcm", np.arange(64 * 48).reshape(64, 48))
    with pytest.raises(ImageTooLargeError, match="large.dcm declares 48 x 64"):
        load_image(dicom, max_pixels=48 * 64 - 1)


@needs_samples
def test_retrieve_refuses_an_oversized_image_in_one_line(make_model, processor, tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    code = main(
        [
            "retrieve",
            "report-to-image",
            "Clear lungs.",
            "--images",
            str(PNG),
            "--model",
            str(tmp_path / "clip"),
            "--max-image-pixels",
            "1000",
            "--json",
        ]
    )
    error = json.loads(capsys.readouterr().out)
    assert code == 1 and error["kind"] == "image-too-large" and str(PNG) in error["error"]


@needs_samples
def test_image_encoder_reads_and_shrinks_one_image_at_a_time(make_model, processor, monkeypatch):
    model, events, loaded = make_model(), [], []
    real_load = imaging.load_image

    def load(path, **kwargs):
        events.append("read")
        # Every image read before has already been released: only one full-resolution image is alive.
        assert all(ref() is None for ref in loaded), "a full-resolution image was kept while reading the next"
        image = real_load(path, **kwargs)
        loaded.append(weakref.ref(image))
        return image

    def preprocess(**kwargs):
        events.append(f"preprocess {len(kwargs['images'])}")
        return processor(**kwargs)

    monkeypatch.setattr(imaging, "load_image", load)
    embeddings = image_encoder(model, preprocess, batch_size=4)([PNG] * 5)
    assert events == ["read", "preprocess 1"] * 5
    assert embeddings.shape == (5, model.config.projection_dim)


@needs_samples
def test_a_truncated_dicom_is_reported_as_truncated(tmp_path):
    data = MONO2_DICOM.read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageLoadError, match=r"cut.dcm is truncated: the file ends inside its data"):
        load_image(path)
