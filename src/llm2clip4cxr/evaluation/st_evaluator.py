"""The findings -> impression task as a sentence-transformers evaluator, for monitoring during training.

`findings_to_impression_evaluator` builds sentence-transformers' own `InformationRetrievalEvaluator`
(usable as `evaluator=` of `SentenceTransformerTrainer`, or called on any `SentenceTransformer`) with the
ground truth made explicit by `relevant_with_duplicates`, the same rule the harness applies.

Numbers to report come from `llm2clip4cxr eval`: sentence-transformers ranks with `torch.topk`, which
breaks exact ties arbitrarily, where the harness breaks them pessimistically. Without ties both agree
(its accuracy@k is the harness's recall@k when each query has one relevant report).
"""

from collections.abc import Sequence

from .metrics import relevant_with_duplicates
from .tasks import studies_with_findings_and_impression

__all__ = ["findings_to_impression_evaluator"]


def findings_to_impression_evaluator(
    studies: Sequence[dict],
    duplicate_rule: str = "count_as_relevant",
    instruction: str | None = None,
    name: str = "findings-to-impression",
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
):
    """A `sentence_transformers` `InformationRetrievalEvaluator`: each study's findings retrieve its impression.

    Args:
        studies: dicts with `uid`, `findings` and `impression` (studies missing either are skipped), e.g.
            the rows of `llm2clip4cxr.data.read_reports_csv` or of a prepared dataset.
        duplicate_rule: "count_as_relevant", "collapse" or "none" (see `relevant_with_duplicates`).
        instruction: prepended to the queries (findings) and pooled out; the impressions get none.
        name: the evaluator's name (prefix of its metric keys).
        ks: cut-offs for accuracy/recall@k and MRR@max(ks).
        batch_size: encoding batch size.

    Raises:
        ValueError: no study has both sections, or `uid`s repeat.
    """
    try:
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.evaluation import InformationRetrievalEvaluator

    studies, ids = studies_with_findings_and_impression(studies)
    queries = {uid: study["findings"] for uid, study in zip(ids, studies)}
    resolution = relevant_with_duplicates(
        queries, {uid: study["impression"] for uid, study in zip(ids, studies)}, {uid: {uid} for uid in ids},
        duplicate_rule,
    )
    impressions = {uid: study["impression"] for uid, study in zip(ids, studies)}
    corpus = {uid: impressions[uid] for uid in resolution.corpus_ids}
    ks = sorted(set(ks))
    return InformationRetrievalEvaluator(
        queries, corpus, {uid: set(resolution.relevant[uid]) for uid in ids},
        accuracy_at_k=ks, precision_recall_at_k=ks, mrr_at_k=[ks[-1]], ndcg_at_k=[ks[-1]], map_at_k=[ks[-1]],
        name=name, batch_size=batch_size, write_csv=False, query_prompt=instruction,
    )
