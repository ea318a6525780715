"""Processor of LLM2CLIP4CXR: chest X-rays to `pixel_values`, reports to LLM2Vec4CXR inputs with their `embed_mask`.

Shipped inside every saved checkpoint as Hub remote code: imports only torch, transformers and the
sibling files.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    SizeDict,
    is_pil_image,
    to_numpy_array,
)
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import is_numpy_array

from .configuration_llm2vec4cxr import DEFAULT_INSTRUCTION_SEPARATOR, EMBED_MASK_RULES
from .modeling_llm2vec4cxr import prepare_report_tokenizer, tokenize_reports

# PIL.Image.Resampling codes (what `resample` holds in transformers image processor configs) -> the
# torch modes that antialias when shrinking.
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}
# PIL modes read as they are; any other mode (palette, alpha, CMYK, 16-bit big-endian...) is converted first.
_PIL_NATIVE_MODES = {"L", "I", "I;16", "F", "RGB"}


class LLM2CLIP4CXRImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    pad_value (`float`, *optional*, defaults to `self.pad_value`):
        Intensity of the padding on the [0, 1] image scale, before normalisation (0 = black, like air).
    """

    pad_value: float | int


class LLM2CLIP4CXRImageProcessor(BaseImageProcessor):
    r"""
    Chest X-rays to square, normalised `pixel_values` of shape `(batch_size, 3, height, width)`.

    Each image is brought to intensities on [0, 1], resized so that it fits `size` with its aspect ratio
    kept (the longer side fills the canvas), centred on a `size` canvas of `pad_value`, repeated to 3
    channels when grayscale and normalised with `image_mean` / `image_std`. Stretching a chest X-ray to
    a square would distort heart and lung proportions, and cropping could cut off a costophrenic
    angle, hence the padding.

    Images can be PIL images, numpy arrays of shape `(H, W)` or `(H, W, C)`, torch tensors of shape
    `(H, W)` or `(C, H, W)` (C = 1 or 3), a list of them, or a 4-D batch. Intensities:

    - integer images (8-bit PIL images, `uint8` arrays...) are multiplied by `rescale_factor` (1/255)
      when `do_rescale`;
    - floating-point images are taken to be intensities on [0, 1] already, as
      `llm2clip4cxr.data.imaging.load_image` returns for PNG, JPEG and DICOM files at any bit depth (use it
      for DICOM and 16-bit files).

    An image that ends up outside [0, 1] is an error rather than silently clipped.

    Args:
        size (`dict[str, int]` or `int`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Size of the output canvas; an int gives a square.
        resample (`int`, *optional*, defaults to 3):
            `PIL.Image.Resampling.BICUBIC` (3) or `BILINEAR` (2); both antialias when shrinking.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply integer images by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to 1/255):
            Scale of integer images.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` and `image_std`.
        image_mean, image_std (`list[float]`, *optional*, default to OpenAI CLIP's):
            Per-channel statistics of the normalisation.
        pad_value (`float`, *optional*, defaults to 0.0):
            Intensity of the padding on the [0, 1] scale, before normalisation.
    """

    valid_kwargs = LLM2CLIP4CXRImageProcessorKwargs
    model_input_names = ["pixel_values"]
    size = {"height": 224, "width": 224}
    resample = 3  # PIL.Image.Resampling.BICUBIC, as CLIP
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    pad_value = 0.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def check_settings(self) -> None:
        """Raise ValueError if the processor's own settings are unusable: the check every call makes, done now
        (for a caller that wants bad settings refused at construction)."""
        settings = {name: getattr(self, name, None) for name in self._valid_kwargs_names}
        self._validate_preprocess_kwargs(**self._standardize_kwargs(**settings))

    def _validate_preprocess_kwargs(
        self,
        size=None,
        resample=None,
        do_normalize=None,
        image_mean=None,
        image_std=None,
        pad_value=None,
        do_center_crop=None,
        **kwargs,
    ):
        super()._validate_preprocess_kwargs(
            size=size, resample=resample, do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
            **kwargs,
        )
        if size is None or not size.height or not size.width:
            raise ValueError(f"`size` must give the canvas `height` and `width`, got {dict(size or {})}.")
        if resample not in RESAMPLE_MODES:
            raise ValueError(
                f"`resample` must be one of {sorted(RESAMPLE_MODES)} (PIL BILINEAR, BICUBIC), got {resample!r}."
            )
        if do_normalize:
            for name, values in (("image_mean", image_mean), ("image_std", image_std)):
                values = [values] if isinstance(values, (int, float)) else list(values)
                if len(values) not in (1, 3) or not all(math.isfinite(value) for value in values):
                    raise ValueError(f"`{name}` must be 1 or 3 finite values, got {values}.")
                if name == "image_std" and not all(value > 0 for value in values):
                    raise ValueError(f"`image_std` must be positive, got {values}.")
        if pad_value is None or not math.isfinite(pad_value):
            raise ValueError(f"`pad_value` must be a finite intensity on the [0, 1] scale, got {pad_value!r}.")
        if do_center_crop:
            raise ValueError(
                "`do_center_crop` is not supported: LLM2CLIP4CXRImageProcessor pads to keep the whole chest."
            )

    def _preprocess_image_like_inputs(
        self,
        images,
        *,
        size: SizeDict,
        resample: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        pad_value: float,
        input_data_format=None,
        device=None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        images = self._as_list(images)
        canvases = []
        for index, image in enumerate(images):
            image = self.process_image(
                image, do_rescale=do_rescale, rescale_factor=rescale_factor, input_data_format=input_data_format,
                device=device, name=f"images[{index}]",
            )
            canvas = self.resize_and_pad(image, size=size, resample=resample, pad_value=pad_value)
            canvases.append(canvas.expand(3, -1, -1))  # grayscale repeated on 3 channels
        pixel_values = torch.stack(canvases)  # (B, 3, height, width)
        if do_normalize:
            pixel_values = self.normalize(pixel_values, mean=image_mean, std=image_std)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def _as_list(self, images) -> list:
        """A single image, a list of images or a 4-D batch as a list of images."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("`images` is empty; pass at least one image.")
            return list(images)
        if (is_numpy_array(images) or isinstance(images, torch.Tensor)) and images.ndim == 4:
            return list(images)
        return [images]

    def process_image(
        self,
        image,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        input_data_format: str | ChannelDimension | None = None,
        device=None,
        name: str = "image",
        **kwargs,
    ) -> torch.Tensor:
        """One PIL image, array or tensor as a float32 `(C, H, W)` tensor of intensities in [0, 1], C = 1 or 3."""
        if isinstance(image, str):
            image = self.fetch_images(image)
        if is_pil_image(image):
            if image.mode not in _PIL_NATIVE_MODES:
                image = image.convert("I" if image.mode.startswith("I;16") else "RGB")
            image, channels_last = torch.as_tensor(to_numpy_array(image)), True
        elif is_numpy_array(image):
            image, channels_last = torch.as_tensor(image), True
        elif isinstance(image, torch.Tensor):
            channels_last = False
        else:
            raise TypeError(
                f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}."
            )
        if device is not None:
            image = image.to(device)
        if image.ndim == 2:
            image = image[None]
        elif image.ndim == 3:
            image = self._to_channels_first(image, channels_last, input_data_format, name)
        else:
            layout = "(H, W) or (H, W, C)" if channels_last else "(H, W) or (C, H, W)"
            raise ValueError(f"{name} must have shape {layout} with C = 1 or 3, got {tuple(image.shape)}.")

        if image.dtype == torch.bool or image.is_complex():
            raise TypeError(f"{name} must have an integer or floating-point dtype, got {image.dtype}.")
        is_integer = not image.is_floating_point()
        image = image.to(torch.float32)
        if is_integer and do_rescale:
            image = image * rescale_factor
        if not torch.isfinite(image).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
        low, high = image.aminmax()
        if low < 0 or high > 1:
            if is_integer:
                hint = (
                    f"its integer pixels times rescale_factor={rescale_factor:.6g} leave [0, 1]; set "
                    "`rescale_factor` to 1 / (its maximum value), or load the file with "
                    "`llm2clip4cxr.data.imaging.load_image`"
                    if do_rescale
                    else "integer pixels need `do_rescale=True`"
                )
            else:
                hint = (
                    "floating-point images must be intensities on [0, 1], as `llm2clip4cxr.data.imaging.load_image` "
                    "returns"
                )
            raise ValueError(f"{name} has values in [{low.item():.6g}, {high.item():.6g}]: {hint}.")
        return image

    @staticmethod
    def _to_channels_first(image: torch.Tensor, channels_last: bool, input_data_format, name: str) -> torch.Tensor:
        if input_data_format is not None:
            channels_last = ChannelDimension(input_data_format) == ChannelDimension.LAST
        elif image.shape[-1 if channels_last else 0] not in (1, 3):
            channels_last = not channels_last  # the other layout, e.g. a channels-first numpy array
        channels = image.shape[-1] if channels_last else image.shape[0]
        if channels not in (1, 3):
            raise ValueError(
                f"{name} must have 1 (gray) or 3 (RGB) channels, got shape {tuple(image.shape)}; "
                "pass `input_data_format` if its layout is ambiguous."
            )
        return image.permute(2, 0, 1) if channels_last else image

    def resize_and_pad(
        self,
        image: torch.Tensor,
        size: SizeDict | dict[str, int] | None = None,
        resample: int | None = None,
        pad_value: float | None = None,
    ) -> torch.Tensor:
        """Fit `image` (C, H, W) in [0, 1] into a `size` canvas with its aspect ratio kept, centred on `pad_value`.
        Settings left as None are this processor's.

        Returns:
            `torch.Tensor` of shape `(C, size["height"], size["width"])`, in [0, 1] where the image is.
        """
        size = self.size if size is None else size
        resample = self.resample if resample is None else resample
        pad_value = self.pad_value if pad_value is None else pad_value
        target_height, target_width = size["height"], size["width"]
        height, width = image.shape[-2:]
        scale = min(target_height / height, target_width / width)
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        if (new_height, new_width) != (height, width):
            image = F.interpolate(
                image[None], size=(new_height, new_width), mode=RESAMPLE_MODES[resample], antialias=True,
                align_corners=False,
            )[0]
            # Bicubic overshoots at sharp edges; clip so that the image stays on the [0, 1] scale.
            image = image.clamp(0.0, 1.0)
        canvas = image.new_full((image.shape[0], target_height, target_width), float(pad_value))
        top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
        canvas[:, top : top + new_height, left : left + new_width] = image
        return canvas

    def normalize(self, image: torch.Tensor, mean=None, std=None, **kwargs) -> torch.Tensor:
        """`(image - mean) / std` per channel, on a `(..., C, H, W)` tensor; this processor's statistics by default."""
        mean = self.image_mean if mean is None else mean
        std = self.image_std if std is None else std
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        return (image - mean) / std


class LLM2CLIP4CXRProcessor(ProcessorMixin):
    r"""
    Wraps an [`LLM2CLIP4CXRImageProcessor`] and the text tower's (fast) tokenizer.

    Texts are tokenized by the encoder's own `tokenize_reports`, as [`LLM2Vec4CXRModel.tokenize`] does:
    `instruction.strip() + " " + report`, with an `embed_mask` over the report tokens only (the instruction is
    attended to, not pooled), reports cut at their end beyond `max_seq_length` tokens, padded on the tokenizer's
    side.
    A text may carry its own instruction as `"instruction" + instruction_separator + "report"`.

    Args:
        image_processor (`LLM2CLIP4CXRImageProcessor`): the image processor.
        tokenizer (`PreTrainedTokenizerFast`): the text tower's tokenizer; without a pad token it pads
            with eos.
        instruction_separator (`str`, *optional*, defaults to `"!@#$%^&*()"`):
            The text tower's `config.instruction_separator`.
        max_seq_length (`int`, *optional*, defaults to 512):
            The text tower's `config.max_seq_length`.
        embed_mask_rule (`str`, *optional*, defaults to `"offsets"`):
            The text tower's `config.embed_mask_rule`.
        default_instruction (`str`, *optional*):
            The instruction the model was trained with: used when a call gives no `instruction=` (`""` means
            none), like the text tower's `config.default_instruction`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        instruction_separator: str = DEFAULT_INSTRUCTION_SEPARATOR,
        max_seq_length: int = 512,
        embed_mask_rule: str = "offsets",
        default_instruction: str | None = None,
        **kwargs,
    ):
        if not isinstance(instruction_separator, str) or not instruction_separator.strip():
            raise ValueError(
                f"`instruction_separator` must be a non-blank string, got {instruction_separator!r}."
            )
        if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
            raise ValueError(f"`max_seq_length` must be an int of at least 2, got {max_seq_length!r}.")
        if embed_mask_rule not in EMBED_MASK_RULES:
            raise ValueError(f"`embed_mask_rule` must be one of {EMBED_MASK_RULES}, got {embed_mask_rule!r}.")
        self.instruction_separator = instruction_separator
        self.max_seq_length = max_seq_length
        self.embed_mask_rule = embed_mask_rule
        self.default_instruction = default_instruction
        super().__init__(image_processor, tokenizer, **kwargs)
        prepare_report_tokenizer(tokenizer, instruction_separator)

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        instruction: str | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **images_kwargs,
    ) -> BatchFeature:
        r"""
        Prepare reports and/or chest X-rays for [`LLM2CLIP4CXRModel`].

        Args:
            images: one image or a list (see [`LLM2CLIP4CXRImageProcessor`]).
            text (`str` or `list[str]`): reports.
            instruction (`str`, *optional*): prepended to every report (attended to, not pooled); default
                `default_instruction`, `""` for none.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.
            padding (`bool` or `str`, *optional*, defaults to `True`): `True` or `"longest"`; reports are
                always padded to the longest of the batch, since `embed_mask` is built with the same layout.
            images_kwargs: per-call overrides of the image processor's settings (e.g. `pad_value`).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `embed_mask` (each `(batch_size, seq_len)`)
            when `text` is given, and `pixel_values` `(batch_size, 3, height, width)` when `images` are.
        """
        if images is None and text is None:
            raise ValueError("LLM2CLIP4CXRProcessor needs `text`, `images` or both.")
        if padding not in (True, "longest"):
            raise ValueError(
                "`padding` must be True or 'longest' (reports are padded to the longest of the batch), "
                f"got {padding!r}."
            )
        data = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("`text` is empty; pass at least one report.")
            batch, truncated = tokenize_reports(
                self.tokenizer,
                texts,
                instruction,
                instruction_separator=self.instruction_separator,
                max_seq_length=self.max_seq_length,
                embed_mask_rule=self.embed_mask_rule,
                default_instruction=self.default_instruction,
            )
            if truncated:
                warnings.warn(
                    f"{truncated} of {len(texts)} reports exceeded max_seq_length={self.max_seq_length} "
                    "tokens and were truncated at their end.",
                    stacklevel=2,
                )
            data.update(batch)
        if images is not None:
            data.update(self.image_processor(images, **images_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "embed_mask", "pixel_values"]


LLM2CLIP4CXRImageProcessor.register_for_auto_class("AutoImageProcessor")
LLM2CLIP4CXRProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["LLM2CLIP4CXRImageProcessor", "LLM2CLIP4CXRProcessor", "RESAMPLE_MODES"]
