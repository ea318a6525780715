import multiprocessing
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip4cxr.data.imaging import CLIP_MEAN, CLIP_STD, ImageLoadError, ImagePreprocessor, load_image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from ..shared_data import HAVE_SAMPLES, SAMPLES, XRV, needs_samples  # noqa: E402

MONO2_DICOM = XRV / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
MONO1_DICOM = XRV / "Fake_MONOHR1.dcm"  # the same pixel data as MONO2_DICOM, tagged MONOCHROME1
J2K_DICOM = SAMPLES / "pydicom-data" / "RG1_J2KI.dcm"
NON_SQUARE_JPEG = XRV / "16747_3_1.jpg"  # 1036 wide x 885 high
RASTER_SAMPLES = [
    XRV / "00000001_000.png",
    XRV / "00027426_000.png",
    XRV / "tbx11k_test_data/imgs/health/h0001.png",
    XRV / "tbx11k_test_data/imgs/tb/tb0005.png",
    XRV / "tbx11k_test_data/imgs/tb/tb0007.png",
    NON_SQUARE_JPEG,
    XRV / "covid-19-pneumonia-58-prior.jpg",
]
DICOM_SAMPLES = [MONO2_DICOM, MONO1_DICOM, J2K_DICOM]


def transfer_syntax(path):
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


def has_decoder(path):
    return get_decoder(transfer_syntax(path)).is_available


def decodable(path):
    """The path as a test parameter, skipped where no pydicom plugin here decodes its compression."""
    if not HAVE_SAMPLES:
        return pytest.param(path, id=path.name[:24], marks=needs_samples)
    reason = f"no pydicom plugin installed decodes {transfer_syntax(path).name}"
    return pytest.param(path, id=path.name[:24], marks=pytest.mark.skipif(not has_decoder(path), reason=reason))


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, **elements):
    """Uncompressed 16-bit single- or multi-frame DICOM with the given pixels and extra elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        "CR",
    )
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def min_max(values):
    values = np.asarray(values, dtype=np.float64)
    return (values - values.min()) / (values.max() - values.min())


def unnormalize(pixel_values, preprocessor):
    """(B, 3, S, S) model input back to intensities on the [0, 1] scale."""
    mean = torch.tensor(preprocessor.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessor.std).view(1, 3, 1, 1)
    return pixel_values * std + mean


@pytest.fixture()
def pixels12():
    """12-bit pixels spanning 0..4095, so windows and min-max have something to act on."""
    values = np.random.default_rng(0).integers(0, 4096, size=(16, 20))
    values[0, 0], values[-1, -1] = 0, 4095
    return values


# --- real sample files -------------------------------------------------------------------------------------


ALL_SAMPLES = [pytest.param(path, id=path.name[:24], marks=needs_samples) for path in RASTER_SAMPLES] + [
    decodable(p) for p in DICOM_SAMPLES
]


@pytest.mark.parametrize("path", ALL_SAMPLES)
def test_every_sample_loads_as_grayscale_in_unit_range(path):
    image = load_image(path)
    if path.suffix == ".dcm":
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert image.shape == (header.Rows, header.Columns)
    else:
        with Image.open(path) as source:
            assert image.shape == (source.height, source.width)
    assert image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert image.std() > 0.05  # a real radiograph, not a near-constant frame


@pytest.mark.parametrize("path", [decodable(MONO2_DICOM)])
def test_real_monochrome1_sample_is_the_inverse_of_its_monochrome2_twin(path):
    np.testing.assert_allclose(load_image(MONO1_DICOM), 1.0 - load_image(path), atol=1e-6)


@pytest.mark.parametrize("path", [decodable(J2K_DICOM)])
def test_15_bit_jpeg2000_monochrome1_is_windowed_and_inverted(path):
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float64)
    windowed = np.clip((raw - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(load_image(path), 1.0 - min_max(windowed), atol=1e-5)
    assert len(np.unique(load_image(path))) > 256  # 15-bit detail kept


# --- DICOM built in the test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [{}, {"WindowCenter": 2000, "WindowWidth": 1500}])
def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path, pixels12, window):
    mono2 = load_image(write_dicom(tmp_path / "m2.dcm", pixels12, "MONOCHROME2", **window))
    mono1 = load_image(write_dicom(tmp_path / "m1.dcm", pixels12, "MONOCHROME1", **window))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # c=2000, w=1500 'LINEAR' maps 1250 -> 0 and 2749 -> 1 (see the hand computation test below).
    expected = min_max(np.clip(pixels12, 1250, 2749)) if window else min_max(pixels12)
    np.testing.assert_allclose(mono2, expected, atol=1e-6)


def test_window_center_width_matches_hand_computation(tmp_path, pixels12):
    path = write_dicom(tmp_path / "w.dcm", pixels12, WindowCenter=1000, WindowWidth=801)
    # DICOM PS3.3 C.11.2.1.2 'LINEAR': (x - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1].
    expected = np.clip((pixels12 - 999.5) / 800 + 0.5, 0, 1)
    np.testing.assert_allclose(load_image(path), min_max(expected), atol=1e-6)


def test_rescale_slope_intercept_applied_before_window(tmp_path, pixels12):
    # The window is in rescaled (modality) units: ignoring the rescale would window the wrong range.
    path = write_dicom(
        tmp_path / "r.dcm", pixels12, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=3000, WindowWidth=2001
    )
    modality = 2.0 * pixels12 - 1000
    expected = np.clip((modality - 2999.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(load_image(path), min_max(expected), atol=1e-6)


def test_negative_rescale_slope_flips_intensities(tmp_path, pixels12):
    path = write_dicom(tmp_path / "n.dcm", pixels12, RescaleSlope=-1, RescaleIntercept=4095)
    np.testing.assert_allclose(load_image(path), 1.0 - min_max(pixels12), atol=1e-6)


def test_multi_frame_dicom_needs_an_explicit_frame(tmp_path, pixels12):
    path = write_dicom(tmp_path / "mf.dcm", np.stack([pixels12, 4095 - pixels12]))
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))} has 2 frames; pass `frame=`"):
        load_image(path)
    np.testing.assert_allclose(load_image(path, frame=1), 1.0 - min_max(pixels12), atol=1e-6)
    with pytest.raises(ValueError, match=r"`frame` must be an int in \[0, 1\]"):
        load_image(path, frame=2)


def test_constant_dicom_is_an_error_not_a_blank_image(tmp_path):
    path = write_dicom(tmp_path / "blank.dcm", np.full((8, 8), 7))
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))} is constant \(every pixel is 7"):
        load_image(path)


# --- PNG / JPEG ----------------------------------------------------------------------------------------------


def test_16_bit_png_keeps_its_dynamic_range(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 11 + 300).astype(np.uint16)  # 300..45353, 4096 levels
    path = tmp_path / "16bit.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really written at 16 bits
    image = load_image(path)
    assert len(np.unique(image)) == 4096  # 8-bit would leave at most 256
    np.testing.assert_allclose(image, min_max(values), atol=1e-6)


def test_rgb_png_becomes_luma(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    expected = min_max(rgb.astype(np.float64) @ [0.299, 0.587, 0.114])
    np.testing.assert_allclose(load_image(tmp_path / "rgb.png"), expected, atol=1e-5)


# --- errors name the file --------------------------------------------------------------------------------------


def make_truncated_png(tmp_path):
    data = (XRV / "00000001_000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.png"


def make_random_dcm(tmp_path):
    (tmp_path / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    return tmp_path / "random.dcm"


def make_text_png(tmp_path):
    (tmp_path / "notes.png").write_text("Findings: no acute cardiopulmonary process.\n")
    return tmp_path / "notes.png"


def make_truncated_dcm(tmp_path):
    data = MONO2_DICOM.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.dcm"


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize(
    "make_file",
    [
        pytest.param(make_truncated_png, marks=needs_samples),
        make_random_dcm,
        make_text_png,
        pytest.param(make_truncated_dcm, marks=needs_samples),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, make_file):
    path = make_file(tmp_path)
    with pytest.raises(ImageLoadError, match=re.escape(str(path))) as info:
        load_image(path)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")


@needs_samples
def test_missing_decoder_plugin_names_the_pip_command(monkeypatch):
    syntax = pydicom.dcmread(MONO2_DICOM, stop_before_pixels=True).file_meta.TransferSyntaxUID
    monkeypatch.setattr(get_decoder(syntax), "_available", {})  # as if Pillow and pylibjpeg were absent
    with pytest.raises(ImageLoadError) as info:
        load_image(MONO2_DICOM)
    message = str(info.value)
    assert str(MONO2_DICOM) in message and "JPEG Baseline" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and 'llm2clip4cxr[imaging]' in message


@needs_samples
def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "llm2clip4cxr[imaging]"')):
        load_image(J2K_DICOM)


# --- ImagePreprocessor ---------------------------------------------------------------------------------------


@needs_samples
@pytest.mark.parametrize("pad_value", [0.0, 0.5])
def test_non_square_jpeg_keeps_aspect_and_pads_centred(pad_value):
    preprocessor = ImagePreprocessor(size=224, pad_value=pad_value)
    intensities = unnormalize(preprocessor(NON_SQUARE_JPEG), preprocessor)[0]
    assert intensities.shape == (3, 224, 224)
    # 1036 x 885 -> 224 x 191 (885 * 224 / 1036 = 191.4); 33 pad rows split 16 above, 17 below.
    content_rows = slice(16, 16 + 191)
    torch.testing.assert_close(intensities[:, :16], torch.full((3, 16, 224), pad_value), atol=1e-5, rtol=0)
    torch.testing.assert_close(intensities[:, 207:], torch.full((3, 17, 224), pad_value), atol=1e-5, rtol=0)
    assert (intensities[0, content_rows] - pad_value).abs().amax(dim=1).min() > 0  # no content row is padding
    assert (intensities[0, content_rows, :].std(dim=0) > 0).all()  # the image spans every column
    torch.testing.assert_close(intensities[0], intensities[2])  # gray repeated on 3 channels


def test_tall_array_is_padded_left_and_right():
    tall = np.random.default_rng(2).random((100, 40)).astype(np.float32)
    preprocessor = ImagePreprocessor(size=50, pad_value=0.25, resample="bilinear")
    intensities = unnormalize(preprocessor(tall), preprocessor)[0, 0]
    assert torch.allclose(intensities[:, :15], torch.tensor(0.25), atol=1e-5)  # 40 * 50 / 100 = 20 wide
    assert torch.allclose(intensities[:, 35:], torch.tensor(0.25), atol=1e-5)
    assert intensities[:, 15:35].min() >= -1e-6 and intensities[:, 15:35].max() <= 1 + 1e-6


@needs_samples
def test_mixed_batch_shape_and_inputs_agree(tmp_path):
    png = RASTER_SAMPLES[0]
    preprocessor = ImagePreprocessor(size=64)
    gray = load_image(png)
    batch = [
        png,  # path
        str(png),  # str path
        Image.open(png),  # PIL image
        gray,  # (H, W) float array
        (np.stack([gray] * 3, axis=-1) * 255).astype(np.uint8),  # (H, W, 3) uint8 array
        write_dicom(tmp_path / "small.dcm", np.arange(30 * 50).reshape(30, 50)),  # DICOM path
    ]
    pixel_values = preprocessor(batch)
    assert pixel_values.shape == (6, 3, 64, 64) and pixel_values.dtype == torch.float32
    for i in (1, 2, 3):  # the same image as a path, PIL image or loaded array gives the same input
        torch.testing.assert_close(pixel_values[i], pixel_values[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pixel_values[4], pixel_values[0], atol=0.02, rtol=0)  # 8-bit round trip
    assert preprocessor(png).shape == (1, 3, 64, 64)  # a single image is a batch of one


def test_default_normalisation_is_clip():
    preprocessor = ImagePreprocessor()
    assert preprocessor.mean == CLIP_MEAN and preprocessor.std == CLIP_STD and preprocessor.size == 224
    zeros = preprocessor.normalize(np.zeros((2, 224, 224), dtype=np.float32))
    torch.testing.assert_close(zeros[:, :, 0, 0], (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).expand(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, r"`size` must be a positive int, got 0"),
        ({"mean": (0.5,)}, r"`mean` and `std` need 3 values"),
        ({"std": (0.2, 0.0, 0.2)}, r"`image_std` must be positive"),  # checked by the image processor itself
        ({"resample": "nearest"}, r"`resample` must be one of \('bicubic', 'bilinear'\), got 'nearest'"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocessor(**kwargs)


def test_invalid_inputs_are_rejected():
    preprocessor = ImagePreprocessor(size=32)
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \(H, W\) or \(H, W, 3\), got \(2, 3, 4, 5\)"):
        preprocessor(np.zeros((2, 3, 4, 5)))
    with pytest.raises(TypeError, match=r"got Tensor \(call .numpy\(\) on tensors\)"):
        preprocessor(torch.rand(10, 10))
    with pytest.raises(ImageLoadError, match=r"images\[1\] is constant"):
        preprocessor([np.eye(5), np.zeros((5, 5))])
    with pytest.raises(ValueError, match="`images` is empty"):
        preprocessor([])


def test_preprocessor_pickles_and_round_trips_its_config():
    preprocessor = ImagePreprocessor(size=96, pad_value=0.1, resample="bilinear")
    clone = pickle.loads(pickle.dumps(preprocessor))
    assert clone.get_config_dict() == preprocessor.get_config_dict()
    assert ImagePreprocessor(**preprocessor.get_config_dict()).get_config_dict() == preprocessor.get_config_dict()


@needs_samples
def test_dataloader_workers_preprocess_the_samples():
    """The preprocessor as collate_fn of 2 DataLoader workers, over the real samples.

    forkserver pickles the collate_fn into the workers as spawn does (fork would not test pickling), and
    preloading the package in the server makes the workers fork from it instead of each importing
    transformers again (~4 s each), keeping this test to a few seconds.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["llm2clip4cxr.data.imaging"])
    paths = RASTER_SAMPLES + [path for path in DICOM_SAMPLES if has_decoder(path)]
    preprocessor = ImagePreprocessor(size=32)
    loader = torch.utils.data.DataLoader(
        paths, batch_size=3, num_workers=2, collate_fn=preprocessor, multiprocessing_context=context,
        timeout=30,  # a hung worker fails the test instead of hanging the suite
    )
    batches = list(loader)
    assert sum(len(batch) for batch in batches) == len(paths)
    torch.testing.assert_close(torch.cat(batches), preprocessor(paths))


def test_invalid_window_width_names_the_file(tmp_path, pixels12):
    path = write_dicom(tmp_path / "bad_window.dcm", pixels12, WindowCenter=100, WindowWidth=0)
    with pytest.raises(ImageLoadError, match=rf"window of {re.escape(str(path))} .*Window Width"):
        load_image(path)
