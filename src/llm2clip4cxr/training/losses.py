"""Contrastive losses of the image-text (LLM2CLIP4CXR) recipe, on embeddings: `clip_loss` and
`supervised_contrastive_loss`, both gathered across processes by `gather_features`. (The text recipe trains
with sentence-transformers' own in-batch-negatives losses, see `training.text.contrastive_loss`.)

Distributed convention (open_clip's `local_loss=True`): each rank keeps its own anchors (rows) and
scores them against the candidates gathered from every rank (columns), so the logits are
`(local_batch, global_batch)` rather than `(global_batch, global_batch)` and no rank recomputes
another rank's rows. The label of local row `i` is `rank * local_batch + i`. Every rank must hold
the same local batch size (use `drop_last=True`): `all_gather` needs equal shapes and the label
offset assumes them.

With `gather_with_grad=True`, averaging each rank's gradients (what DDP does) gives exactly the
gradient of the single-process loss on the concatenated global batch; `tests/training/test_losses.py` checks
this with two gloo processes.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["clip_loss", "gather_features", "supervised_contrastive_loss"]


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


def supervised_contrastive_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, gather: bool = True
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): every other sample with the same label
    is a positive of an anchor.

    For anchor i with positives P(i) (same label, j != i) among the candidates A(i) (all j != i):
    `loss_i = -mean_{p in P(i)} log(exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t))` on
    L2-normalised features; the loss is the mean over the local anchors that have a positive (0 if none
    has). Candidates are gathered from every process (anchors stay local, as `clip_loss`).

    Args:
        features (`torch.Tensor` of shape `(local_batch, dim)`): embeddings, e.g. images and their
            reports stacked (each pair then shares its label).
        labels (`torch.Tensor` of shape `(local_batch,)`): integer class of each row.
        temperature (`float`, defaults to 0.07): softmax temperature.
        gather (`bool`, defaults to `True`): use every process's rows as candidates.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"`features` must be (batch, dim) and `labels` (batch,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    features = F.normalize(features, p=2, dim=-1)
    candidates, rank, labels_all = features, 0, labels
    if gather:
        candidates, rank, _ = gather_features(features)
        labels_all, _, _ = gather_features(labels, gather_with_grad=False)
    local = features.shape[0]
    logits = features @ candidates.T / temperature  # (local, global)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(local), torch.arange(local) + rank * local] = True
    positive = (labels[:, None] == labels_all[None, :]) & ~is_self
    log_prob = logits - torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)
    counts = positive.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return features.sum() * 0.0  # keeps the graph, so DDP sees every parameter used
    per_anchor = -(log_prob * positive).sum(dim=1)[has_positive] / counts[has_positive]
    return per_anchor.mean()
