"""Zero-shot chest X-ray classification with an LLM2CLIP4CXR model: label prompts against images.

`zero_shot_classify` is the faithful path: prompts go through the processor like any report (the
instruction is attended to and pooled out, and `embed_mask` leaves the leading special tokens out).

A saved LLM2CLIP4CXR checkpoint also answers `pipeline("zero-shot-image-classification", model=DIR,
trust_remote_code=True)`: its config registers the custom pipeline class shipped beside its model code
(`modeling/pipeline_llm2clip4cxr.py`), which prompts through the processor (with its `default_instruction`)
and gives the same scores as this function with one template (tested). Use this function for prompt
ensembling over several templates and for DICOM/16-bit paths, which it reads with `data.imaging.load_image`.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .encoders import image_encoder, report_encoder

__all__ = ["zero_shot_classify"]


@torch.inference_mode()
def zero_shot_classify(
    model,
    processor,
    images,
    labels: Sequence[str],
    templates: Sequence[str] = ("{}",),
    instruction: str | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Probability of each label for each image, with prompt ensembling.

    Each label is written into every template; the label's embedding is the mean of its L2-normalised
    prompt embeddings, normalised again (CLIP's prompt ensembling). Images are scored against the labels
    with the model's own (clamped) logit scale and a softmax over the labels.

    Args:
        model (`LLM2CLIP4CXRModel`): the model.
        processor (`LLM2CLIP4CXRProcessor`): its processor.
        images: one image or a list of images, in any form the processor accepts (PIL images, arrays
            from `llm2clip4cxr.data.imaging.load_image`, tensors) or file paths (read with `load_image`).
        labels (`Sequence[str]`): class names, e.g. `["pleural effusion", "no acute findings"]`.
        templates (`Sequence[str]`, defaults to `("{}",)`): prompt templates with one `{}` for the label,
            e.g. `("There is {}.", "Findings suggest {}.")`.
        instruction (`str`, *optional*): the text tower's instruction, prepended to every prompt.
        batch_size (`int`, defaults to 32): images per forward pass of the vision tower.

    Returns:
        `torch.Tensor` of shape `(num_images, num_labels)`: float32 probabilities, each row summing to 1.
    """
    if isinstance(labels, str) or not labels:
        raise ValueError(f"`labels` must be a non-empty list of class names, got {labels!r}.")
    if isinstance(templates, str) or not templates:
        raise ValueError(f"`templates` must be a non-empty list of templates, got {templates!r}.")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"Each template must contain exactly one '{{}}' for the label, got {template!r}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    images = list(images) if isinstance(images, (list, tuple)) else [images]

    was_training = model.training
    model.eval()
    try:
        prompts = [template.format(label) for label in labels for template in templates]
        prompt_embeds = torch.from_numpy(
            report_encoder(model, processor, instruction, batch_size=len(prompts))(prompts)
        )
        label_embeds = prompt_embeds.view(len(labels), len(templates), -1).mean(dim=1)  # (L, P)
        label_embeds = F.normalize(label_embeds, dim=-1)
        image_embeds = torch.from_numpy(image_encoder(model, processor, batch_size=batch_size)(images))
        logits = model.get_logit_scale().float().cpu() * image_embeds @ label_embeds.T  # (B, L)
    finally:
        model.train(was_training)
    return logits.softmax(dim=-1)
