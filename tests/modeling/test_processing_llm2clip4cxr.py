import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor

from llm2clip4cxr import LLM2CLIP4CXRImageProcessor, LLM2CLIP4CXRProcessor
from llm2clip4cxr.data.imaging import CLIP_MEAN, CLIP_STD, ImagePreprocessor, load_image

from ..conftest import INSTRUCTION
from ..shared_data import XRV, needs_samples

NON_SQUARE_JPEG = XRV / "16747_3_1.jpg"  # 1036 wide x 885 high, RGB
GRAY_PNG = XRV / "00000001_000.png"  # 512 x 512, 8-bit "L", pixels 0..255


def make_processor(tokenizer, **image_kwargs):
    image_kwargs.setdefault("size", 32)
    return LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(**image_kwargs), copy.deepcopy(tokenizer))


def unnormalize(pixel_values):
    """(B, 3, H, W) model input back to intensities on the [0, 1] scale."""
    return pixel_values * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)


# --- text ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_text_is_tokenized_exactly_as_the_encoder_does(make_encoder, tokenizer, report_texts, padding_side):
    encoder = make_encoder(max_seq_length=40)
    encoder.tokenizer.padding_side = padding_side
    processor = LLM2CLIP4CXRProcessor(LLM2CLIP4CXRImageProcessor(), encoder.tokenizer, max_seq_length=40)
    texts = ["No effusion.", report_texts[0], f"{INSTRUCTION}!@#$%^&*()Small left effusion."]
    with pytest.warns(UserWarning, match=r"1 of 2 reports exceeded max_seq_length=40"):
        batch = processor(text=texts[:2], instruction=INSTRUCTION)
    expected = encoder.tokenize(texts[:2], instruction=INSTRUCTION)
    assert set(batch) == {"input_ids", "attention_mask", "embed_mask"}
    for key, value in expected.items():
        torch.testing.assert_close(batch[key], value, rtol=0, atol=0)
    # An instruction carried inside the text, as in the published format.
    torch.testing.assert_close(processor(text=texts[2:])["embed_mask"], encoder.tokenize(texts[2:])["embed_mask"])
    assert (batch["embed_mask"].sum(1) < batch["attention_mask"].sum(1)).all()  # the instruction is pooled out


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p(text=["No effusion."], padding="max_length"), ValueError, r"`padding` must be True or 'longest'"),
        (lambda p: p(text=[]), ValueError, r"`text` is empty"),
        (lambda p: p(), ValueError, r"needs `text`, `images` or both"),
        (lambda p: p(text=["a!@#$%^&*()b"], instruction="x"), ValueError, r"Text 0 already carries an instruction"),
    ],
)
def test_bad_text_calls_are_rejected(tokenizer, call, error, match):
    with pytest.raises(error, match=match):
        call(make_processor(tokenizer))


def test_bad_processor_arguments_are_rejected(tokenizer):
    image_processor = LLM2CLIP4CXRImageProcessor()
    with pytest.raises(ValueError, match=r"`max_seq_length` must be an int of at least 2, got 1"):
        LLM2CLIP4CXRProcessor(image_processor, tokenizer, max_seq_length=1)
    with pytest.raises(ValueError, match=r"`instruction_separator` must be a non-blank string, got ' '"):
        LLM2CLIP4CXRProcessor(image_processor, tokenizer, instruction_separator=" ")
    with pytest.raises(TypeError, match=r"needs a fast tokenizer"):
        slow = copy.deepcopy(tokenizer)
        slow.__class__ = type("SlowTokenizer", (type(tokenizer),), {"is_fast": property(lambda self: False)})
        LLM2CLIP4CXRProcessor(image_processor, slow)


def test_processor_round_trip(tokenizer, report_texts, tmp_path):
    processor = make_processor(tokenizer, size=48, pad_value=0.25, resample=2)
    processor.max_seq_length = 64
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LLM2CLIP4CXRProcessor and type(loaded.image_processor) is LLM2CLIP4CXRImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is LLM2CLIP4CXRImageProcessor
    assert loaded.image_processor.pad_value == 0.25 and loaded.image_processor.resample == 2
    inputs = {
        "text": report_texts[:3],
        "images": [np.random.default_rng(0).random((60, 40))],
        "instruction": INSTRUCTION,
    }
    with pytest.warns(UserWarning, match=r"3 of 3 reports exceeded max_seq_length=64"):  # the setting survived
        expected, actual = processor(**inputs), loaded(**inputs)
    assert actual.keys() == expected.keys() and actual["pixel_values"].shape == (1, 3, 48, 48)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_processor_default_instruction_survives_a_round_trip_and_empty_means_none(tokenizer, report_texts, tmp_path):
    processor = make_processor(tokenizer)
    processor.default_instruction = INSTRUCTION
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.default_instruction == INSTRUCTION
    texts = report_texts[:2]
    torch.testing.assert_close(
        loaded(text=texts)["input_ids"], processor(text=texts, instruction=INSTRUCTION)["input_ids"]
    )
    without = loaded(text=texts, instruction="")
    assert without["input_ids"].shape[1] < loaded(text=texts)["input_ids"].shape[1]
    # No instruction: every token but the leading <s> is pooled.
    torch.testing.assert_close(without["embed_mask"].sum(dim=1), without["attention_mask"].sum(dim=1) - 1)


# --- images --------------------------------------------------------------------------------------------------------


@needs_samples
def test_real_non_square_jpeg_keeps_aspect_and_pads_with_pad_value(tokenizer):
    processor = make_processor(tokenizer, size=224, pad_value=0.25)
    intensities = unnormalize(processor(images=load_image(NON_SQUARE_JPEG))["pixel_values"])[0]
    assert intensities.shape == (3, 224, 224)
    # 1036 x 885 -> 224 x 191 (885 * 224 / 1036 = 191.4); 33 pad rows split 16 above, 17 below.
    torch.testing.assert_close(intensities[:, :16], torch.full((3, 16, 224), 0.25), atol=1e-5, rtol=0)
    torch.testing.assert_close(intensities[:, 207:], torch.full((3, 17, 224), 0.25), atol=1e-5, rtol=0)
    content = intensities[0, 16:207]
    assert (content - 0.25).abs().amax(dim=1).min() > 0  # no content row is padding
    assert (content.std(dim=0) > 0).all()  # the image spans every column
    assert content.min() >= -1e-6 and content.max() <= 1 + 1e-6
    torch.testing.assert_close(intensities[0], intensities[2])  # gray repeated on 3 channels


@needs_samples
def test_8_bit_pil_image_equals_its_load_image_array(tokenizer):
    processor = make_processor(tokenizer, size=64)
    with Image.open(GRAY_PNG) as image:
        from_pil = processor(images=image)["pixel_values"]
    torch.testing.assert_close(from_pil, processor(images=load_image(GRAY_PNG))["pixel_values"], atol=1e-6, rtol=0)


def test_every_input_form_gives_the_same_pixel_values(tokenizer):
    gray = np.random.default_rng(1).integers(0, 256, size=(30, 50)).astype(np.uint8)
    scaled = gray.astype(np.float32) / 255
    forms = [
        gray,  # (H, W) uint8
        gray[..., None],  # (H, W, 1)
        np.repeat(gray[..., None], 3, axis=-1),  # (H, W, 3) RGB
        Image.fromarray(gray),  # PIL "L"
        Image.fromarray(np.repeat(gray[..., None], 3, axis=-1)),  # PIL "RGB"
        scaled,  # (H, W) float in [0, 1]
        torch.from_numpy(scaled),  # (H, W) tensor
        torch.from_numpy(scaled)[None].repeat(3, 1, 1),  # (3, H, W) tensor
        np.ascontiguousarray(np.repeat(scaled[None], 3, axis=0)),  # channels-first array, found by its shape
    ]
    pixel_values = make_processor(tokenizer)(images=forms)["pixel_values"]
    assert pixel_values.shape == (len(forms), 3, 32, 32)
    for index in range(1, len(forms)):
        torch.testing.assert_close(pixel_values[index], pixel_values[0], atol=1e-6, rtol=0, msg=f"form {index}")
    batch = torch.from_numpy(scaled)[None, None].repeat(2, 3, 1, 1)  # a 4-D tensor is a batch
    torch.testing.assert_close(make_processor(tokenizer)(images=batch)["pixel_values"], pixel_values[:2])


def test_resize_and_pad_match_a_hand_computation(tokenizer):
    tall = torch.rand(100, 40, generator=torch.Generator().manual_seed(0))
    image_processor = LLM2CLIP4CXRImageProcessor(size=50, pad_value=0.5, resample=2, do_normalize=False)
    pixel_values = image_processor(tall)["pixel_values"][0]
    # 100 x 40 -> 50 x 20, centred: columns 15..34.
    resized = F.interpolate(tall[None, None], size=(50, 20), mode="bilinear", antialias=True, align_corners=False)
    expected = torch.full((50, 50), 0.5)
    expected[:, 15:35] = resized[0, 0].clamp(0, 1)
    for channel in range(3):
        torch.testing.assert_close(pixel_values[channel], expected, rtol=0, atol=0)


def test_image_preprocessor_delegates_to_the_image_processor():
    images = [np.random.default_rng(i).random((40 + 7 * i, 33)).astype(np.float32) for i in range(3)]
    for image in images:  # already spanning [0, 1], as load_image returns, so that its min-max changes nothing
        image[0, 0], image[-1, -1] = 0.0, 1.0
    preprocessor = ImagePreprocessor(size=32, pad_value=0.1, resample="bilinear")
    image_processor = LLM2CLIP4CXRImageProcessor(size=32, pad_value=0.1, resample=2)
    torch.testing.assert_close(preprocessor(images), image_processor(images)["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (np.zeros(5), ValueError, r"images\[0\] must have shape \(H, W\) or \(H, W, C\) with C = 1 or 3, got \(5,\)"),
        (
            [torch.zeros(4, 4), torch.zeros(1, 2, 4, 4)],
            ValueError,
            r"images\[1\] must have shape \(H, W\) or \(C, H, W\)",
        ),
        (
            np.zeros((8, 8, 4), np.uint8),
            ValueError,
            r"images\[0\] must have 1 \(gray\) or 3 \(RGB\) channels, got shape \(8, 8, 4\)",
        ),
        (
            np.full((4, 4), 255.0),
            ValueError,
            r"images\[0\] has values in \[255, 255\]: floating-point images must be intensities on \[0, 1\]",
        ),
        (
            np.full((4, 4), 4095, np.uint16),
            ValueError,
            r"integer pixels times rescale_factor=0.00392157 leave \[0, 1\]",
        ),
        (
            np.zeros((4, 4), bool),
            TypeError,
            r"images\[0\] must have an integer or floating-point dtype, got torch.bool",
        ),
        ([3], TypeError, r"images\[0\] must be a PIL image, a numpy array or a torch tensor, got int"),
        ([], ValueError, r"`images` is empty"),
    ],
)
def test_bad_images_are_rejected_naming_the_image(images, error, match):
    with pytest.raises(error, match=match):
        LLM2CLIP4CXRImageProcessor(size=16)(images)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"resample": 0}, r"`resample` must be one of \[2, 3\] \(PIL BILINEAR, BICUBIC\), got 0"),
        ({"size": {"shortest_edge": 32}}, r"`size` must give the canvas `height` and `width`"),
        ({"image_std": [0.2, 0.0, 0.2]}, r"`image_std` must be positive"),
        ({"pad_value": float("nan")}, r"`pad_value` must be a finite intensity"),
        ({"do_center_crop": True, "crop_size": 16}, r"`do_center_crop` is not supported"),
    ],
)
def test_bad_image_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM2CLIP4CXRImageProcessor(**kwargs)(np.eye(8))
