import math
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from llm2clip4cxr.training.losses import clip_loss, gather_features

WORLD_SIZE = 2
GLOBAL_BATCH = 8
IN_DIM, TEXT_IN_DIM, EMBED_DIM = 16, 12, 8
LOGIT_SCALE = 1 / 0.07

# Float32 tolerance for "the same number computed in a different order". The distributed and the
# single-process runs evaluate the same logits; only summation order differs (matmul blocking, the
# all-to-all sum in all_gather's backward, the sum over ranks). float32 eps is 1.2e-7 and no sum here
# has more than ~32 terms of order 1, so rounding differences stay around 1e-6; 1e-5 leaves headroom,
# while real mistakes (wrong label offset, a missing cross-rank gradient, a 1/world_size factor)
# move values by 1e-3 to 1 (checked below with gather_with_grad=False).
ATOL = RTOL = 1e-5


# ---------------------------------------------------------------- references


def _reference_clip(image, text, logit_scale):
    """Explicit (N, N) similarity matrix and cross-entropy in both directions."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    n = len(image)
    sims = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            sims[i, j] = logit_scale * torch.dot(image[i], text[j])
    labels = torch.arange(n)
    return (F.cross_entropy(sims, labels) + F.cross_entropy(sims.T, labels)) / 2


def _toy_embeddings(seed=0, n=6, dim=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=generator) for _ in range(3)]


def test_clip_loss_matches_reference():
    image, text, _ = _toy_embeddings(seed=2)
    scale = torch.tensor(LOGIT_SCALE)
    torch.testing.assert_close(clip_loss(image, text, scale), _reference_clip(image, text, scale))


def test_gather_is_a_no_op_without_process_group():
    features = torch.randn(3, 4)
    gathered, rank, world_size = gather_features(features)
    assert gathered is features and (rank, world_size) == (0, 1)


# ---------------------------------------------------------------- distributed equivalence
#
# Ranks hold equal halves of the global batch (n_r = N / W rows). Rank r computes loss_r, the mean of
# the per-anchor losses l_i over its own anchors, scored against the gathered global candidates; l_i
# is exactly the single-process per-anchor term. Hence, with L = (1/N) sum_i l_i the single-process
# loss on the concatenated batch:
#   loss:      L = sum_r (n_r / N) * loss_r   (= mean_r loss_r, as n_r = N / W)
#   gradient:  dL/dtheta = sum_r grad_r, where rank r backpropagates (n_r / N) * loss_r.
# The gradient identity needs gather_with_grad=True: all_gather's backward sums into rank r's
# features the gradient that every rank's loss sends to them, so rank r's parameter gradient is
# sum_s d(loss_s * n_s / N)/dtheta through rank r's inputs, and summing over r covers every path.
# Equivalently, backpropagating loss_r and averaging gradients over ranks (what DDP does) gives dL/dtheta.


def _toy_problem():
    """Identical on every process: encoders with a fixed seed and a fixed global batch."""
    torch.manual_seed(0)
    text_encoder = nn.Linear(IN_DIM, EMBED_DIM)
    image_encoder = nn.Linear(TEXT_IN_DIM, EMBED_DIM)
    log_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE)))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, TEXT_IN_DIM, generator=generator)
    texts = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator)
    return text_encoder, image_encoder, log_scale, (images, texts)


def _losses_and_grads(rows: slice, total: int, gather_with_grad: bool = True) -> dict[str, torch.Tensor]:
    """Each loss on `rows` of the global batch, weighted by len(rows) / total, with its gradients."""
    text_encoder, image_encoder, log_scale, (images, texts) = _toy_problem()
    weight = len(range(total)[rows]) / total
    out = {}

    clip = clip_loss(
        image_encoder(images[rows]), text_encoder(texts[rows]), log_scale.exp(), gather_with_grad=gather_with_grad
    )
    (weight * clip).backward()
    out["clip_loss"] = weight * clip.detach()
    out.update({f"clip_grad.text.{name}": p.grad.clone() for name, p in text_encoder.named_parameters()})
    out.update({f"clip_grad.image.{name}": p.grad.clone() for name, p in image_encoder.named_parameters()})
    out["clip_grad.log_scale"] = log_scale.grad.clone()
    return out


def _rank_worker(rank: int, world_size: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        # Keep gloo on loopback: resolving the hostname may pick an interface that is down in CI sandboxes.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    # A file rendezvous: a port picked up front could be taken by a parallel test before rank 0 binds it.
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        local = GLOBAL_BATCH // world_size
        rows = slice(rank * local, (rank + 1) * local)
        results = {}
        for gather_with_grad in (True, False):
            out = _losses_and_grads(rows, GLOBAL_BATCH, gather_with_grad=gather_with_grad)
            for value in out.values():
                dist.all_reduce(value, op=dist.ReduceOp.SUM)  # sum_r of weighted losses and of gradients
            results[gather_with_grad] = out
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks leave together: a rank tearing gloo down while its peer still uses the pair aborted
        # ("terminate called without an active exception") about once in ten runs.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold work objects with Python tensors, and
    # freeing them while the interpreter shuts down aborts the process ("terminate called without an active
    # exception", pytorch/pytorch#179291), seen in ~1 of 35 runs under load after the results were saved.
    # Exit code 0 is what mp.spawn checks; an exception above still reaches it through its error queue.
    os._exit(0)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_worker, args=(WORLD_SIZE, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_two_rank_loss_and_gradients_equal_single_process(distributed_results):
    single = _losses_and_grads(slice(None), GLOBAL_BATCH)  # no process group here: the full batch
    keys = [key for key in single if key.startswith("clip")]
    assert len(keys) > 2
    for rank, results in enumerate(distributed_results):
        for key in keys:
            torch.testing.assert_close(
                results[True][key], single[key], atol=ATOL, rtol=RTOL, msg=f"rank {rank}: {key}"
            )


def test_gather_without_grad_keeps_the_loss_but_drops_cross_rank_gradients(distributed_results):
    # Shows the equivalence test above can fail: without the autograd-aware gather, the loss value is
    # the same but each rank's features miss the gradient from the other rank's anchors.
    single = _losses_and_grads(slice(None), GLOBAL_BATCH)
    without_grad = distributed_results[0][False]
    torch.testing.assert_close(without_grad["clip_loss"], single["clip_loss"], atol=ATOL, rtol=RTOL)
    grad_keys = [key for key in single if key.startswith("clip_grad") and "log_scale" not in key]
    max_diff = max((without_grad[key] - single[key]).abs().max().item() for key in grad_keys)
    assert max_diff > 1e-3


# ---------------------------------------------------------------- input validation


def test_mismatched_shapes_raise_value_error_naming_them():
    with pytest.raises(ValueError, match=r"`image_embeds` and `text_embeds`.*\(4, 8\) and \(5, 8\)"):
        clip_loss(torch.randn(4, 8), torch.randn(5, 8), LOGIT_SCALE)
    with pytest.raises(ValueError, match=r"`logit_scale` must be a scalar.*\(2,\)"):
        clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2))
