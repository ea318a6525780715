"""Chest X-ray image loading and preprocessing: files (PNG, JPEG, DICOM), PIL images or arrays to model input.

`load_image(path)` turns any supported file into a float32 grayscale array in [0, 1] with bone bright,
whatever the format or bit depth. `ImagePreprocessor` turns a batch of paths, PIL images or arrays into
the (B, 3, size, size) tensor a CLIP-style vision tower expects (aspect kept, padded to square), through
the model's own `LLM2CLIP4CXRImageProcessor`.

Pillow and pydicom are optional dependencies (`pip install "llm2clip4cxr[imaging]"`), imported only
when an image is actually read, so `import llm2clip4cxr` works without them.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..errors import LLM2CLIP4CXRError
from ..modeling.processing_llm2clip4cxr import RESAMPLE_MODES, LLM2CLIP4CXRImageProcessor

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "MAX_IMAGE_PIXELS", "ImageInput", "ImageLoadError", "ImagePreprocessor",
    "ImageTooLargeError", "load_image",
]

# OpenAI CLIP's normalisation: the statistics CLIP-style vision towers expect by default.
CLIP_MEAN = tuple(OPENAI_CLIP_MEAN)
CLIP_STD = tuple(OPENAI_CLIP_STD)
# ImagePreprocessor's resample names -> the PIL.Image.Resampling codes the image processor takes.
_RESAMPLE_CODES = {mode: code for code, mode in RESAMPLE_MODES.items()}

# ITU-R BT.601 luma, the weights Pillow's own convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# Files declaring more pixels than this are refused before they are decoded (a 200 KB PNG can declare
# 13000 x 13000 and take 1.3 GB). 8192 x 8192 is about 3.5x the largest chest detector (43 cm at 100 um);
# pass `max_pixels=` to load_image (or --max-image-pixels) to change it per call, or set this attribute.
MAX_IMAGE_PIXELS = 8192 * 8192
# RGB -> gray is done this many rows at a time, so the float32 copy of all three channels is never whole.
_GRAY_ROWS = 256
_EXTRA_HINT = 'pip install "llm2clip4cxr[imaging]"'

ImageInput = Union[str, "os.PathLike[str]", "PIL.Image.Image", np.ndarray]


class ImageLoadError(LLM2CLIP4CXRError, OSError, ValueError):
    """An image file (or in-memory image) could not be turned into a usable grayscale image.

    Subclasses both OSError and ValueError (like `io.UnsupportedOperation`), so callers that skip bad
    files with either `except OSError` or `except ValueError` catch it.
    """

    kind = "image"


class ImageTooLargeError(ImageLoadError):
    """An image file declares more pixels than the limit (`MAX_IMAGE_PIXELS` or `max_pixels=`)."""

    kind = "image-too-large"


def _check_pixels(path: str, width: int, height: int, max_pixels: int | None) -> None:
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit and width * height > limit:
        raise ImageTooLargeError(
            f"{path} declares {width} x {height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(llm2clip4cxr.data.imaging.MAX_IMAGE_PIXELS); it is refused before decoding. If it is a genuine image, "
            "raise the limit (--max-image-pixels, or max_pixels= in Python)."
        )


def _import_optional(module: str) -> Any:
    """Import an optional dependency, or fail with the pip command that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = {"PIL": "Pillow", "pydicom": "pydicom"}.get(module.split(".")[0], module)
        raise ImportError(
            f"Reading images needs {package}, which is not installed. Install it with `{_EXTRA_HINT}`."
        ) from err


def _min_max(image: np.ndarray, source: str) -> np.ndarray:
    """Scale to [0, 1] (darkest pixel 0, brightest 1) as float32; a constant image is an error, not a blank."""
    if image.size == 0:
        raise ImageLoadError(f"{source} has no pixels (shape {image.shape}).")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ImageLoadError(f"{source} contains NaN or infinite pixel values; replace them before loading.")
    low, high = image.min(), image.max()
    if high <= low:
        raise ImageLoadError(
            f"{source} is constant (every pixel is {low.item()!r}), so it carries no image; "
            "check the file is not blank or its windowing does not clip everything."
        )
    # float64 keeps rescaled DICOM values exact; 8/16-bit pixels are exact in float32 and twice as fast.
    work_dtype = np.float64 if image.dtype in (np.float64, np.int32, np.uint32, np.int64, np.uint64) else np.float32
    low, high = work_dtype(low), work_dtype(high)
    scaled = image.astype(work_dtype)  # a copy: the ops below are in place (one image-sized buffer, not three)
    scaled -= low
    # Divide, not multiply by a reciprocal: x / x is exactly 1 in IEEE arithmetic, x * (1 / x) may be 1 - ulp.
    scaled /= high - low
    return scaled.astype(np.float32, copy=False)


def _rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) luma in float32 (no 8-bit rounding, unlike Pillow's convert("L"))."""
    gray = np.empty(rgb.shape[:2], dtype=np.float32)
    for start in range(0, rgb.shape[0], _GRAY_ROWS):
        rows = rgb[start : start + _GRAY_ROWS, :, :3]
        gray[start : start + _GRAY_ROWS] = rows.astype(np.float32, copy=False) @ _LUMA
    return gray


def _pil_to_gray(image: PIL.Image.Image) -> np.ndarray:
    """A PIL image as an (H, W) array at its native bit depth (not yet scaled); alpha is ignored."""
    if image.mode in ("L", "I", "F") or image.mode.startswith("I;16"):
        return np.asarray(image)
    if image.mode in ("1", "LA", "La"):
        return np.asarray(image.convert("L"))
    # Palette, RGB(A), CMYK, YCbCr...: via RGB, as a viewer would show them.
    return _rgb_to_gray(np.asarray(image.convert("RGB")))


def _check_frame(frame: int | None, n_frames: int, path: str) -> None:
    """Multi-frame files need an explicit frame: silently taking the first could pick the wrong view."""
    if frame is None:
        if n_frames > 1:
            raise ImageLoadError(
                f"{path} has {n_frames} frames; pass `frame=` (0 to {n_frames - 1}) to load_image to pick one."
            )
    elif not isinstance(frame, int) or not 0 <= frame < n_frames:
        raise ValueError(f"`frame` must be an int in [0, {n_frames - 1}] for {path}, got {frame!r}.")


def _read_with_pillow(path: str, frame: int | None, max_pixels: int | None) -> np.ndarray:
    Image = _import_optional("PIL.Image")
    ImageOps = _import_optional("PIL.ImageOps")
    try:
        with warnings.catch_warnings():  # our own limit is checked below; Pillow's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{path} is refused as too large to decode safely ({err}).") from err
    except Exception as err:
        raise ImageLoadError(f"Could not read {path} as an image ({type(err).__name__}: {err}).") from err
    with image:
        _check_pixels(path, image.width, image.height, max_pixels)  # from the header, before decoding
        # MPO is a JPEG with camera preview images appended; frame 0 is the photograph itself.
        n_frames = 1 if image.format == "MPO" else getattr(image, "n_frames", 1)
        _check_frame(frame, n_frames, path)
        try:
            if frame:
                image.seek(frame)
            image.load()  # decoding happens here: truncated or corrupt data raises now, not later
            if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: show it the way viewers do
                image = ImageOps.exif_transpose(image)
            pixels = _pil_to_gray(image)
        except Exception as err:
            raise ImageLoadError(
                f"Could not decode {path} ({image.format} {image.mode}, {type(err).__name__}: {err}); "
                "the file is probably truncated or corrupt."
            ) from err
    return _min_max(pixels, str(path))


def _missing_decoder_message(path: str, transfer_syntax: Any, decoder: Any) -> str:
    import pydicom.uid as uids

    if transfer_syntax in uids.JPEG2000TransferSyntaxes:
        pip = "pip install pylibjpeg pylibjpeg-openjpeg"
    elif transfer_syntax in uids.JPEGTransferSyntaxes or transfer_syntax in uids.JPEGLSTransferSyntaxes:
        pip = "pip install pylibjpeg pylibjpeg-libjpeg"
    else:
        pip = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"
    missing = "; ".join(decoder.missing_dependencies) or "no plugin registered"
    return (
        f"Cannot decode the pixel data of {path}: it is compressed as '{transfer_syntax.name}' ({transfer_syntax}) "
        f"and no installed pydicom decoder plugin supports it. Install one with `{pip}` "
        f"(included in `{_EXTRA_HINT}`). pydicom's plugins for it: {missing}."
    )


def _read_dicom(path: str, frame: int | None, has_preamble: bool, max_pixels: int | None) -> np.ndarray:
    ds = _open_dicom(path, has_preamble)
    transfer_syntax = _decodable_transfer_syntax(path, ds)
    _check_frame(frame, int(ds.get("NumberOfFrames") or 1), path)
    _check_pixels(path, int(ds.get("Columns") or 0), int(ds.get("Rows") or 0), max_pixels)
    from pydicom.pixels import pixel_array

    try:
        pixels = pixel_array(ds, index=frame)
    except Exception as err:
        raise ImageLoadError(
            f"Could not decode the '{transfer_syntax.name}' pixel data of {path} "
            f"({type(err).__name__}: {err}); the file is probably truncated or corrupt."
        ) from err
    return _dicom_gray(path, ds, pixels)


def _open_dicom(path: str, has_preamble: bool):
    """The DICOM dataset of `path`, which must hold pixel data (a truncated file is called truncated)."""
    pydicom = _import_optional("pydicom")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # force=True only for .dcm files without the 'DICM' marker (old or non-conformant exports).
            ds = pydicom.dcmread(path, force=not has_preamble)
    except Exception as err:
        raise ImageLoadError(f"Could not read {path} as DICOM ({type(err).__name__}: {err}).") from err
    if "PixelData" not in ds:
        # pydicom stops quietly at the end of a truncated file, dropping the element it was reading: say
        # that, rather than that the file has no pixel data.
        with open(path, "rb") as handle:
            cut_off = b"\xe0\x7f\x10\x00" in handle.read() or any("End of file" in str(w.message) for w in caught)
        if cut_off:
            raise ImageLoadError(
                f"{path} is truncated: the file ends inside its data ({os.path.getsize(path):,} bytes), before the "
                "(7FE0,0010) Pixel Data is complete; copy or download it again."
            )
        hint = "" if has_preamble else " It has no 'DICM' marker at byte 128 either: is it a DICOM file at all?"
        raise ImageLoadError(
            f"{path} has no (7FE0,0010) Pixel Data, so there is no image to load "
            f"(SOP class {ds.get('SOPClassUID', 'unknown')}).{hint}"
        )
    return ds


def _decodable_transfer_syntax(path: str, ds):
    """The dataset's transfer syntax, if an installed pydicom decoder reads it (else which plugin to install)."""
    from pydicom.pixels import get_decoder

    transfer_syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if transfer_syntax is None:
        raise ImageLoadError(f"{path} has no (0002,0010) Transfer Syntax UID, so its pixel data cannot be decoded.")
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError as err:
        raise ImageLoadError(
            f"{path} uses transfer syntax '{transfer_syntax.name}' ({transfer_syntax}), which pydicom cannot decode "
            "(video or unsupported compression); convert it to an image DICOM, PNG or JPEG first."
        ) from err
    if not decoder.is_available:
        raise ImageLoadError(_missing_decoder_message(path, transfer_syntax, decoder))
    return transfer_syntax


def _dicom_gray(path: str, ds, pixels: np.ndarray) -> np.ndarray:
    """Decoded DICOM pixels as [0, 1] grayscale, bone bright: Modality and VOI LUTs (or window) for monochrome
    images, MONOCHROME1 inverted; palette and RGB images as luma."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        try:
            pixels = apply_modality_lut(pixels, ds)  # Modality LUT or RescaleSlope/Intercept
            if ds.get("VOILUTSequence") and pixels.dtype.kind == "f" and np.array_equal(pixels, np.round(pixels)):
                pixels = pixels.astype(np.int64)  # a VOI LUT indexes by integer; pydicom warns on float input
            pixels = apply_voi_lut(pixels, ds)  # VOI LUT, else the first WindowCenter/WindowWidth pair
        except Exception as err:
            raise ImageLoadError(
                f"Could not apply the Modality/VOI LUT or window of {path} ({type(err).__name__}: {err}); "
                "its Rescale, LUT or Window Center/Width elements are invalid."
            ) from err
        image = _min_max(pixels, path)
        # MONOCHROME1 stores bone dark; invert so every image shows bone bright. Presentation LUT Shape is
        # not applied on top: DX files pair MONOCHROME1 with INVERSE, which means this same single inversion.
        return 1.0 - image if photometric == "MONOCHROME1" else image
    if photometric == "PALETTE COLOR":
        return _min_max(_rgb_to_gray(apply_color_lut(pixels, ds)), path)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB, or YBR already converted to RGB by pydicom
        return _min_max(_rgb_to_gray(pixels), path)
    raise ImageLoadError(
        f"{path} has Photometric Interpretation {photometric!r} with {ds.get('SamplesPerPixel')} samples per pixel; "
        "supported are MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB and YBR."
    )


def load_image(path: str | os.PathLike[str], *, frame: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Load a chest X-ray file as a float32 grayscale array of shape (H, W) in [0, 1], bone bright.

    Formats: PNG, JPEG (and other raster formats Pillow reads, e.g. TIFF), 8- or 16-bit, grayscale or colour
    (colour becomes BT.601 luma, alpha is ignored); DICOM (detected by its 'DICM' marker or a .dcm/.dicom/.dic
    suffix) with the Modality LUT or Rescale Slope/Intercept, then the VOI LUT or first Window Center/Width,
    then MONOCHROME1 inverted so bone is bright as in MONOCHROME2.

    Every format is then min-max scaled (darkest pixel 0, brightest 1), so the model sees the same input
    whatever bit depth the file was stored at.

    Args:
        path: The image file.
        frame: Which frame of a multi-frame file (DICOM, TIFF, GIF) to load, from 0. Multi-frame files
            require it: picking the first frame silently could return the wrong view.
        max_pixels: Refuse a file whose header declares more pixels (width x height) than this, before
            decoding it. None: `MAX_IMAGE_PIXELS` (8192 x 8192); 0: no limit.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageLoadError: The file is corrupt, truncated, not an image, constant, multi-frame without `frame`,
            or a compressed DICOM whose decoder plugin is missing (the message names the pip command).
        ImageTooLargeError: The file declares more pixels than `max_pixels`.
        ImportError: Pillow or pydicom is needed and not installed.
    """
    path = os.fspath(path)
    with open(path, "rb") as handle:  # FileNotFoundError / IsADirectoryError name the path themselves
        header = handle.read(132)
    has_preamble = header[128:132] == b"DICM"
    if has_preamble or os.path.splitext(path)[1].lower() in _DICOM_SUFFIXES:
        return _read_dicom(path, frame, has_preamble, max_pixels)
    return _read_with_pillow(path, frame, max_pixels)


def _to_gray(image: ImageInput, source: str) -> np.ndarray:
    """Any accepted input as an (H, W) float32 array in [0, 1], scaled the same way as load_image."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "biuf":
            raise TypeError(f"{source} must have a bool, integer or float dtype, got {image.dtype}.")
        if image.dtype == np.bool_:
            image = image.astype(np.float32)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 3 and image.shape[-1] == 3:
            image = _rgb_to_gray(image)
        elif image.ndim != 2:
            raise ValueError(f"{source} must have shape (H, W) or (H, W, 3), got {image.shape}.")
        return _min_max(image, source)
    Image = _import_optional("PIL.Image")
    if isinstance(image, Image.Image):
        return _min_max(_pil_to_gray(image), source)
    raise TypeError(
        f"{source} must be a path, a PIL image or a numpy array of shape (H, W) or (H, W, 3), "
        f"got {type(image).__name__}" + (" (call .numpy() on tensors)." if isinstance(image, torch.Tensor) else ".")
    )


class ImagePreprocessor:
    """Chest X-rays to normalised square model input: (B, 3, size, size) float32 tensors.

    Each image is loaded as grayscale in [0, 1] (`load_image` for paths; PIL images and arrays are scaled the
    same way), then handed to `LLM2CLIP4CXRImageProcessor`, the model's own image processor: longer side
    resized to `size` keeping the aspect ratio, centred on a `size` x `size` canvas of `pad_value`, repeated
    to 3 channels and normalised with `mean`/`std`. Stretching a CXR to a square would distort heart and lung
    proportions, hence the padding.

    The instance holds plain Python values and that image processor, so it pickles into DataLoader workers;
    it can be the `collate_fn` itself, which moves decoding and resizing into the workers:
    `DataLoader(paths, batch_size=32, num_workers=4, collate_fn=ImagePreprocessor())`.

    Args:
        size: Side of the square output in pixels.
        mean: Per-channel mean subtracted after padding (CLIP's by default).
        std: Per-channel standard deviation divided by (CLIP's by default).
        pad_value: Intensity of the padding on the [0, 1] image scale, before normalisation (0 = black, like air).
        resample: Resize filter, "bicubic" or "bilinear" (torch's, antialiased when shrinking).

    Example:
        >>> preprocessor = ImagePreprocessor(size=224)
        >>> pixel_values = preprocessor(["a.dcm", "b.png"])  # (2, 3, 224, 224)
    """

    config_keys = ("size", "mean", "std", "pad_value", "resample")
    _RESAMPLE = tuple(sorted(_RESAMPLE_CODES))

    def __init__(
        self,
        size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        pad_value: float = 0.0,
        resample: str = "bicubic",
    ) -> None:
        # What this class adds to the image processor's settings: an int size, three channels, resample by name.
        # The values themselves (finite mean, positive std, finite pad_value) are the image processor's to check.
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"`size` must be a positive int, got {size!r}.")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` need 3 values (one per channel), got mean={mean}, std={std}.")
        if resample not in self._RESAMPLE:
            raise ValueError(f"`resample` must be one of {self._RESAMPLE}, got {resample!r}.")
        self.size = int(size)
        self.mean = mean
        self.std = std
        self.pad_value = float(pad_value)
        self.resample = resample
        self.image_processor = LLM2CLIP4CXRImageProcessor(
            size=self.size,
            resample=_RESAMPLE_CODES[resample],
            image_mean=list(mean),
            image_std=list(std),
            pad_value=self.pad_value,
        )
        self.image_processor.check_settings()  # refused now, not at the first image

    def get_config_dict(self) -> dict[str, Any]:
        """Constructor arguments, so `ImagePreprocessor(**config)` rebuilds an identical preprocessor."""
        return {key: getattr(self, key) for key in self.config_keys}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())
        return f"{type(self).__name__}({arguments})"

    def resize_and_pad(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1] -> (size, size) float32: longer side to `size`, centred on `pad_value`."""
        image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        return self.image_processor.resize_and_pad(image[None])[0].numpy()

    def normalize(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, size, size) intensities in [0, 1] -> (B, 3, size, size) normalised float32."""
        batch = torch.as_tensor(batch, dtype=torch.float32)
        return self.image_processor.normalize(batch.unsqueeze(1).expand(-1, 3, -1, -1))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess one image or a sequence of them (paths, PIL images, (H, W) or (H, W, 3) arrays, mixed).

        Returns:
            Float32 tensor of shape (B, 3, size, size); B = 1 for a single image.
        """
        Image = _import_optional("PIL.Image")
        if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image, torch.Tensor)):
            images = [images]
        elif not isinstance(images, Sequence):
            images = list(images) if hasattr(images, "__iter__") else [images]
        if len(images) == 0:
            raise ValueError("`images` is empty; pass at least one path, PIL image or array.")
        # One image at a time: only one full-resolution image is in memory, whatever the batch size.
        return torch.cat([self.image_processor([_to_gray(image, f"images[{i}]")])["pixel_values"]
                          for i, image in enumerate(images)])
