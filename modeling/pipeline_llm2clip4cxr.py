"""Zero-shot chest X-ray classification as a transformers pipeline for LLM2CLIP4CXR checkpoints.

Shipped inside every saved LLM2CLIP4CXR checkpoint (its config names it in `custom_pipelines`), so

    from transformers import pipeline
    classify = pipeline("zero-shot-image-classification", model=CHECKPOINT_DIR, trust_remote_code=True)
    classify(image, candidate_labels=["pleural effusion", "no acute findings"])

runs it. transformers' own pipeline calls the bare tokenizer, which gives no `embed_mask` and no instruction;
this one prompts through the checkpoint's processor, so every label is tokenized as the model was trained:
the processor's `default_instruction` (the one the model was trained with) is prepended and pooled out.
Images may be PIL images, arrays, tensors, or paths/URLs of 8-bit images; read DICOM or 16-bit files with
`llm2clip4cxr.data.imaging.load_image` and pass the array. Imports only transformers and torch.
"""

from transformers.image_utils import load_image
from transformers.pipelines import ZeroShotImageClassificationPipeline


class LLM2CLIP4CXRZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """`ZeroShotImageClassificationPipeline` whose texts and images go through `LLM2CLIP4CXRProcessor`."""

    _load_processor = True

    def _sanitize_parameters(self, instruction=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if instruction is not None:
            preprocess_params["instruction"] = instruction
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, candidate_labels=None, hypothesis_template="{}", timeout=None, tokenizer_kwargs=None,
                   instruction=None):
        if not candidate_labels or isinstance(candidate_labels, str):
            raise ValueError(f"`candidate_labels` must be a non-empty list of class names, got {candidate_labels!r}.")
        if hypothesis_template.count("{}") != 1:
            raise ValueError(
                f"`hypothesis_template` must contain one '{{}}' for the label, got {hypothesis_template!r}."
            )
        if isinstance(image, str):
            image = load_image(image, timeout=timeout)
        prompts = [hypothesis_template.format(label) for label in candidate_labels]
        # instruction None: the processor's default_instruction (the one the model was trained with).
        inputs = self.processor(images=[image], text=prompts, instruction=instruction, return_tensors="pt")
        text_inputs = {key: inputs.pop(key) for key in ("input_ids", "attention_mask", "embed_mask")}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs["candidate_labels"] = candidate_labels
        inputs["text_inputs"] = [text_inputs]
        return inputs

    def _forward(self, model_inputs):
        candidate_labels = model_inputs.pop("candidate_labels")
        text_inputs = model_inputs.pop("text_inputs")[0]
        outputs = self.model(**text_inputs, pixel_values=model_inputs["pixel_values"])
        return {"candidate_labels": candidate_labels, "logits": outputs.logits_per_image}


__all__ = ["LLM2CLIP4CXRZeroShotImageClassificationPipeline"]
