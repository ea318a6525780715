"""Contrastive losses for LLM2Vec4CXR (text-text) and LLM2CLIP4CXR (image-text) training.

A functional core that works on embeddings (`gather_features`, `info_nce_loss`, `simcse_loss`,
`clip_loss`) plus thin `nn.Module`s for trainers (`InfoNCELoss`, `ClipLoss`).

Distributed convention (open_clip's `local_loss=True`): each rank keeps its own anchors (rows) and
scores them against the candidates gathered from every rank (columns), so the logits are
`(local_batch, global_batch)` rather than `(global_batch, global_batch)` and no rank recomputes
another rank's rows. The label of local row `i` is `rank * local_batch + i`. Every rank must hold
the same local batch size (use `drop_last=True`): `all_gather` needs equal shapes and the label
offset assumes them.

With `gather_with_grad=True`, averaging each rank's gradients (what DDP does) gives exactly the
gradient of the single-process loss on the concatenated global batch; `tests/test_losses.py` checks
this with two gloo processes.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["ClipLoss", "InfoNCELoss", "clip_loss", "gather_features", "info_nce_loss", "simcse_loss"]


# torch 2.13 deprecates torch.distributed.nn.functional.all_gather (a FutureWarning per process) and
# names this replacement; older torch (>= 2.4 is supported) lacks it and keeps the old function.
try:
    from torch.distributed._functional_collectives import all_gather_single_autograd as _all_gather_autograd
except ImportError:
    _all_gather_autograd = None


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(features: torch.Tensor, gather_with_grad: bool = True) -> tuple[torch.Tensor, int, int]:
    """Concatenate `features` from every torch.distributed rank along the batch dimension.

    A no-op (returns `features`, rank 0, world size 1) when torch.distributed is not initialised or
    has a single process.

    Args:
        features (`torch.Tensor` of shape `(local_batch, ...)`): this rank's features. Every rank
            must pass the same shape.
        gather_with_grad (`bool`, defaults to `True`): gather with an autograd-aware all_gather
            (`all_gather_single_autograd`, or `torch.distributed.nn.functional.all_gather` on older
            torch), whose backward sums the gradient that every rank's loss sends to each slot and
            returns it to the slot's owner. With `False`, a plain `all_gather` is used and only the
            local slot keeps its graph: cheaper, but this rank's features then miss the gradient
            from the other ranks' losses.

    Returns:
        `tuple[torch.Tensor, int, int]`: the gathered features `(world_size * local_batch, ...)` in
        rank order, this process's rank and the world size.
    """
    if not _is_distributed():
        return features, 0, 1
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if gather_with_grad:
        if _all_gather_autograd is not None:
            return _all_gather_autograd(features.contiguous(), 0, dist.group.WORLD), rank, world_size
        gathered = list(torch.distributed.nn.functional.all_gather(features))
    else:
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features.contiguous())
        # all_gather returns detached copies; put the original back so the local part keeps its graph.
        gathered[rank] = features
    return torch.cat(gathered, dim=0), rank, world_size


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    for name, tensor in ((name_a, a), (name_b, b)):
        if tensor.dim() != 2:
            raise ValueError(
                f"`{name}` must be 2-D (batch_size, dim), got shape {tuple(tensor.shape)}. "
                f"Pass pooled embeddings, not token states."
            )
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape (one {name_b} row per {name_a} row), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}."
        )


def info_nce_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard_negatives: torch.Tensor | None = None,
    scale: float = 20.0,
    gather: bool = True,
    gather_with_grad: bool = True,
) -> torch.Tensor:
    """InfoNCE / multiple-negatives ranking loss with in-batch negatives on cosine similarity.

    Anchor `i` must pick its positive `i` among all positives and all hard negatives of the global
    batch (gathered from every rank when `gather=True`). Anchors stay local: the logits are
    `(local_batch, world_size * (local_batch + num_negatives))` and the label of local anchor `i` is
    `rank * local_batch + i`. The loss is the mean over this rank's anchors.

    Args:
        anchors (`torch.Tensor` of shape `(local_batch, dim)`): query embeddings.
        positives (`torch.Tensor` of shape `(local_batch, dim)`): row `i` is the positive of anchor `i`.
        hard_negatives (`torch.Tensor` of shape `(num_negatives, dim)`, *optional*): extra candidates
            for every anchor (e.g. one mined negative per anchor). `num_negatives` must be equal on
            every rank.
        scale (`float`, defaults to 20.0): inverse temperature applied to the cosine similarities
            (20 = temperature 0.05, as in SimCSE and LLM2Vec).
        gather (`bool`, defaults to `True`): use the candidates of every rank as negatives.
        gather_with_grad (`bool`, defaults to `True`): see `gather_features`.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    _check_pair("anchors", anchors, "positives", positives)
    if hard_negatives is not None and (hard_negatives.dim() != 2 or hard_negatives.shape[1] != anchors.shape[1]):
        raise ValueError(
            f"`hard_negatives` must be 2-D with the anchors' embedding dim {anchors.shape[1]}, got shape "
            f"{tuple(hard_negatives.shape)}."
        )
    if scale <= 0:
        raise ValueError(f"`scale` must be positive (it is 1 / temperature), got {scale}.")

    anchors = F.normalize(anchors, p=2, dim=-1)
    positives = F.normalize(positives, p=2, dim=-1)
    rank = 0
    if gather:
        positives, rank, _ = gather_features(positives, gather_with_grad)
    candidates = positives
    if hard_negatives is not None:
        hard_negatives = F.normalize(hard_negatives, p=2, dim=-1)
        if gather:
            hard_negatives, _, _ = gather_features(hard_negatives, gather_with_grad)
        # Positives first, so the label offsets below index the positive block only.
        candidates = torch.cat([positives, hard_negatives], dim=0)

    logits = scale * anchors @ candidates.T  # (local_batch, num_candidates)
    local_batch = anchors.shape[0]
    labels = torch.arange(local_batch, device=anchors.device) + rank * local_batch
    return F.cross_entropy(logits, labels)


def simcse_loss(
    embeddings_a: torch.Tensor,
    embeddings_b: torch.Tensor,
    scale: float = 20.0,
    gather: bool = True,
    gather_with_grad: bool = True,
) -> torch.Tensor:
    """Unsupervised SimCSE: the same texts encoded twice with dropout on are each other's positives.

    `info_nce_loss(embeddings_a, embeddings_b)` without hard negatives: the other texts of the
    (global) batch are the negatives.

    Args:
        embeddings_a (`torch.Tensor` of shape `(local_batch, dim)`): first dropout view.
        embeddings_b (`torch.Tensor` of shape `(local_batch, dim)`): second dropout view of the same texts.
        scale (`float`, defaults to 20.0): inverse temperature (SimCSE uses temperature 0.05).
        gather (`bool`, defaults to `True`): use the other ranks' texts as negatives too.
        gather_with_grad (`bool`, defaults to `True`): see `gather_features`.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    _check_pair("embeddings_a", embeddings_a, "embeddings_b", embeddings_b)
    return info_nce_loss(embeddings_a, embeddings_b, scale=scale, gather=gather, gather_with_grad=gather_with_grad)


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    gather: bool = True,
    gather_with_grad: bool = True,
) -> torch.Tensor:
    """Symmetric CLIP loss (image->text and text->image cross-entropy, averaged).

    Features are L2-normalised here (a no-op for already normalised ones). Local rows are scored
    against the global batch of the other modality; labels are offset by `rank * local_batch`
    (open_clip's `local_loss=True`).

    Args:
        image_embeds (`torch.Tensor` of shape `(local_batch, dim)`): projected image features.
        text_embeds (`torch.Tensor` of shape `(local_batch, dim)`): projected text features; row `i`
            describes image `i`.
        logit_scale (`torch.Tensor` scalar or `float`): the multiplier of the cosine similarities,
            already exponentiated (pass `model.logit_scale.exp()`, as open_clip does).
        gather (`bool`, defaults to `True`): use every rank's pairs as negatives.
        gather_with_grad (`bool`, defaults to `True`): see `gather_features`.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    _check_pair("image_embeds", image_embeds, "text_embeds", text_embeds)
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
        raise ValueError(
            f"`logit_scale` must be a scalar, got shape {tuple(logit_scale.shape)}. Pass `model.logit_scale.exp()`."
        )

    image_embeds = F.normalize(image_embeds, p=2, dim=-1)
    text_embeds = F.normalize(text_embeds, p=2, dim=-1)
    all_image, rank, all_text = image_embeds, 0, text_embeds
    if gather:
        all_image, rank, _ = gather_features(image_embeds, gather_with_grad)
        all_text, _, _ = gather_features(text_embeds, gather_with_grad)

    logits_per_image = logit_scale * image_embeds @ all_text.T  # (local_batch, global_batch)
    logits_per_text = logit_scale * text_embeds @ all_image.T  # (local_batch, global_batch)
    local_batch = image_embeds.shape[0]
    labels = torch.arange(local_batch, device=image_embeds.device) + rank * local_batch
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class InfoNCELoss(nn.Module):
    """InfoNCE over a text encoder's pooled embeddings (supervised pairs, optional hard negatives,
    or unsupervised SimCSE when anchor and positive are the same texts and dropout is on).

    Args:
        model (`nn.Module`): an `LLM2Vec4CXRModel` (or a PEFT wrapper of one) whose output has a
            `pooler_output` of shape `(batch_size, dim)`.
        scale (`float`, defaults to 20.0): inverse temperature of the cosine similarities.
        gather (`bool`, defaults to `True`): use every rank's candidates as negatives.
        gather_with_grad (`bool`, defaults to `True`): see `gather_features`.

    Inputs:
        Each `features_*` is a tokenized batch from `model.tokenize(texts, instruction=...)`
        (`input_ids`, `attention_mask`, `embed_mask`). Anchor and positive batches have the same
        size; the negative batch may have any size.

    Example:
        >>> loss_fn = InfoNCELoss(model)
        >>> loss = loss_fn(model.tokenize(queries, instruction=INSTRUCTION), model.tokenize(reports))
    """

    config_keys = ("scale", "gather", "gather_with_grad")

    def __init__(self, model: nn.Module, scale: float = 20.0, gather: bool = True, gather_with_grad: bool = True):
        super().__init__()
        if scale <= 0:
            raise ValueError(f"`scale` must be positive (it is 1 / temperature), got {scale}.")
        self.model = model
        self.scale = scale
        self.gather = gather
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        features_anchor: dict[str, torch.Tensor],
        features_positive: dict[str, torch.Tensor],
        features_negative: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Encode the batches and return the scalar InfoNCE loss."""
        anchors = self.model(**features_anchor).pooler_output
        positives = self.model(**features_positive).pooler_output
        negatives = None if features_negative is None else self.model(**features_negative).pooler_output
        return self.compute_loss_from_embeddings(anchors, positives, negatives)

    def compute_loss_from_embeddings(
        self, anchors: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`info_nce_loss` with this module's settings; testable without a model."""
        return info_nce_loss(
            anchors, positives, hard_negatives, scale=self.scale, gather=self.gather,
            gather_with_grad=self.gather_with_grad,
        )

    def get_config_dict(self) -> dict:
        """The constructor arguments other than the model (shown on model cards)."""
        return {key: getattr(self, key) for key in self.config_keys}

    @property
    def citation(self) -> str:
        return """
@article{behnamghader2024llm2vec,
    title={LLM2Vec: Large Language Models Are Secretly Powerful Text Encoders},
    author={Parishad BehnamGhader and Vaibhav Adlakha and Marius Mosbach and Dzmitry Bahdanau and Nicolas Chapados and Siva Reddy},
    journal={arXiv preprint arXiv:2404.05961},
    year={2024}
}
"""


class ClipLoss(nn.Module):
    """Symmetric CLIP loss on projected image and text features (see `clip_loss`).

    Args:
        gather (`bool`, defaults to `True`): use every rank's pairs as negatives.
        gather_with_grad (`bool`, defaults to `True`): see `gather_features`.

    Inputs:
        `forward(image_embeds, text_embeds, logit_scale)`: `(batch_size, dim)` features of matching
        rows and the exponentiated logit scale.
    """

    config_keys = ("gather", "gather_with_grad")

    def __init__(self, gather: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.gather = gather
        self.gather_with_grad = gather_with_grad

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """Return the scalar symmetric CLIP loss."""
        return clip_loss(
            image_embeds, text_embeds, logit_scale, gather=self.gather, gather_with_grad=self.gather_with_grad
        )

    def get_config_dict(self) -> dict:
        """The constructor arguments (shown on model cards)."""
        return {key: getattr(self, key) for key in self.config_keys}

    @property
    def citation(self) -> str:
        return """
@inproceedings{radford2021learning,
    title={Learning Transferable Visual Models From Natural Language Supervision},
    author={Alec Radford and Jong Wook Kim and Chris Hallacy and Aditya Ramesh and Gabriel Goh and Sandhini Agarwal and Girish Sastry and Amanda Askell and Pamela Mishkin and Jack Clark and Gretchen Krueger and Ilya Sutskever},
    booktitle={International Conference on Machine Learning},
    year={2021}
}
"""
