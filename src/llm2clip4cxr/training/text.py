"""Training building blocks for LLM2Vec4CXR: the MNTP stage and the supervised contrastive stage.

Both stages run on `transformers.Trainer` (and so on `accelerate launch`, DDP, DeepSpeed, FSDP); only
what no library does is written here:

* MNTP (masked next-token prediction) is masked language modelling on the *bidirectional*
  backbone with the causal LM head: `DataCollatorForLanguageModeling` masks tokens and puts the
  original ids in `labels`, and the backbone's `*ForCausalLM` loss shifts them, so the token masked
  at position i is predicted from the logits at position i-1, as LLM2Vec does.
* The contrastive stage is a `SentenceTransformerTrainer` run: the encoder is wrapped as a
  sentence-transformers model (`sentence_transformer_for`) and trained with sentence-transformers'
  `MultipleNegativesRankingLoss`, or its GradCache variant `CachedMultipleNegativesRankingLoss` when
  `mini_batch_size` is below the batch size (`contrastive_loss`): every anchor is scored against every
  positive and hard negative of the (process-gathered) batch, and the batch size is no longer bounded by
  activation memory. The instruction is the trainer's prompt: `LLM2Vec4CXRSentenceEncoder.preprocess`
  prepends it and pools it out.
* `EquivalenceAwareRankingLoss`: the same loss for rows labelled with an equivalence group (two studies with
  identical label sets), whose in-batch candidates of the anchor's own group are masked instead of counted as
  negatives; sentence-transformers has no label-aware mask.
"""

import functools

from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

from ..modeling.modeling_llm2vec4cxr import LLM2Vec4CXRModel

CONTRASTIVE_ROLES = ("anchor", "positive", "negative")


def mntp_model_for(encoder: LLM2Vec4CXRModel):
    """The backbone's `*ForCausalLM` sharing the encoder's (bidirectional) backbone module.

    Training it trains `encoder.model` in place; only the LM head is extra and stays behind.
    """
    lm = AutoModelForCausalLM.from_config(encoder.config.backbone_config)
    backbone = encoder.model
    # A LoRA-wrapped backbone (peft) is shared as it is: its base model must be the LM's backbone class.
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if type(lm.model) is not type(base):
        raise TypeError(
            f"{type(lm).__name__}.model is a {type(lm.model).__name__}, "
            f"the encoder's backbone a {type(base).__name__}."
        )
    lm.model = backbone
    return lm


def mntp_collator(tokenizer, mask_probability: float = 0.2, mask_token: str | None = None, seed: int | None = None):
    """Masking collator for MNTP. A decoder tokenizer usually has no mask token: `mask_token` names an
    existing token to use instead (LLM2Vec uses "_"); the model learns it means "masked"."""
    if not 0.0 < mask_probability < 1.0:
        raise ValueError(f"`mask_probability` must be in (0, 1), got {mask_probability}.")
    if mask_token is not None:
        if tokenizer.convert_tokens_to_ids(mask_token) in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"mask token {mask_token!r} is not in the tokenizer's vocabulary; pick an existing token."
            )
        tokenizer.mask_token = mask_token
    elif tokenizer.mask_token is None:
        raise ValueError("The tokenizer has no mask token: pass `mask_token=` (an existing token such as '_').")
    return DataCollatorForLanguageModeling(
        tokenizer,
        mlm=True,
        mlm_probability=mask_probability,
        mask_replace_prob=0.8,
        random_replace_prob=0.1,
        seed=seed,
    )


def set_attention_dropout(encoder: LLM2Vec4CXRModel, probability: float) -> None:
    """Attention dropout for SimCSE: the two views of a text differ only by dropout noise, and decoder
    configs usually ship with none. Attention layers copy the rate at construction, hence the walk."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {probability}.")
    encoder.config.backbone_config.attention_dropout = probability
    for module in encoder.model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = probability


def sentence_transformer_for(encoder: LLM2Vec4CXRModel, bucket_rows: int = 32):
    """`encoder` as a `SentenceTransformer` (sharing its weights) with the config's named instructions as
    prompts. `bucket_rows`: rows per length-sorted bucket of a training forward (see
    `LLM2Vec4CXRSentenceEncoder.forward`)."""
    from sentence_transformers import SentenceTransformer

    from ..modeling.modeling_llm2vec4cxr import LLM2Vec4CXRSentenceEncoder

    return SentenceTransformer(
        modules=[LLM2Vec4CXRSentenceEncoder(encoder, bucket_rows=bucket_rows)],
        prompts=dict(encoder.config.instructions) or None,
        default_prompt_name=encoder.config.default_instruction_name,
        similarity_fn_name="cosine",
    )


def contrastive_loss(
    model,
    batch_size: int,
    mini_batch_size: int | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
    gather_across_devices: bool = True,
    equivalence_groups: bool = False,
):
    """sentence-transformers' in-batch-negatives InfoNCE for a `SentenceTransformer` `model`.

    Cached (GradCache: embed in mini-batches without a graph, compute the full-batch loss, back-propagate
    through the cached embedding gradients) when `mini_batch_size` is below `batch_size`: same loss and
    gradients, memory of one mini-batch. `symmetric` adds the positive->anchor direction (for pairs whose
    two sides are both queries and documents, such as findings and impression), one softmax per direction.
    `equivalence_groups`: the rows carry a group id as `label` (`EquivalenceAwareRankingLoss`); not cached.
    """
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    if mini_batch_size is not None and mini_batch_size < 1:
        raise ValueError(f"`mini_batch_size` must be positive, got {mini_batch_size}.")
    settings = {
        "scale": scale,
        "gather_across_devices": gather_across_devices,
        "directions": ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",),
        "partition_mode": "per_direction" if symmetric else "joint",
    }
    cached = mini_batch_size is not None and mini_batch_size < batch_size
    if equivalence_groups:
        if cached:
            raise ValueError(
                "Equivalence-group masking is not available with GradCache: leave `mini_batch_size` unset (or at "
                "least the batch size) for the equivalent-studies dataset."
            )
        return _equivalence_aware_loss_class()(model, **settings)
    if cached:
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size, **settings)
    return MultipleNegativesRankingLoss(model, **settings)


@functools.cache
def _equivalence_aware_loss_class():
    # Defined on first use, like the other sentence-transformers imports of this module (slow to import).
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank

    class EquivalenceAwareRankingLoss(MultipleNegativesRankingLoss):
        """`MultipleNegativesRankingLoss` for rows whose `label` is an equivalence group (>= 0; -1: none).

        Another row of the anchor's own group is a clinically equivalent report (two normal studies), so its
        positive is no negative for the anchor (and, with `doc_to_query`, its anchor none for the positive):
        those logits are masked out of the softmax. Hard-negative columns stay negatives. sentence-transformers
        masks only an anchor's own columns (label-aware masking is not there; GISTEmbedLoss needs a guide
        model), so the mask is written here; the rest follows the parent's `query_to_doc`/`doc_to_query` maths.
        """

        def compute_loss_from_embeddings(self, embeddings, labels):
            if labels is None:
                raise ValueError("EquivalenceAwareRankingLoss needs each row's group id in a `label` column.")
            unsupported = set(self.directions) - {"query_to_doc", "doc_to_query"}
            if unsupported or (self.hardness_mode and self.hardness_strength > 0):
                raise ValueError(f"EquivalenceAwareRankingLoss supports query_to_doc/doc_to_query without hardness "
                                 f"weighting, got directions {self.directions}, hardness {self.hardness_mode}.")
            queries, docs = embeddings[0], embeddings[1:]
            batch_size = queries.size(0)
            groups = labels.to(queries.device).long()
            offset = 0
            if self.gather_across_devices:
                queries = all_gather_with_grad(queries)
                docs = [all_gather_with_grad(doc) for doc in docs]
                groups = all_gather(groups)
                offset = get_rank() * batch_size
            world_batch_size = queries.size(0)
            local = torch.arange(offset, offset + batch_size, device=queries.device)
            rows = torch.arange(batch_size, device=queries.device)
            local_groups = groups[local]
            same_group = (local_groups[:, None] == groups[None, :]) & (local_groups[:, None] >= 0)
            same_group[rows, local] = False  # the anchor's own positive
            hard_negative_columns = world_batch_size * (len(docs) - 1)
            query_mask = torch.cat([same_group, same_group.new_zeros(batch_size, hard_negative_columns)], dim=1)
            logits = {"query_to_doc": (self.similarity_fct(queries[local], torch.cat(docs)) * self.scale)
                      .masked_fill(query_mask, float("-inf"))}
            if "doc_to_query" in self.directions:
                logits["doc_to_query"] = (self.similarity_fct(queries, docs[0][local]).T * self.scale).masked_fill(
                    same_group, float("-inf"))
            positive = logits["query_to_doc"][rows, local]
            if self.partition_mode == "joint":
                log_z = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
            else:
                log_z = sum(torch.logsumexp(matrix, dim=1) for matrix in logits.values()) / len(logits)
            return -(positive - log_z).mean()

    return EquivalenceAwareRankingLoss


def __getattr__(name):
    if name == "EquivalenceAwareRankingLoss":
        return _equivalence_aware_loss_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
