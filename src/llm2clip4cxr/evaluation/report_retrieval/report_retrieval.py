"""Report retrieval metrics as a Hugging Face `evaluate` module (loads offline from this folder).

    import evaluate
    from llm2clip4cxr.evaluation import report_retrieval_metric_path
    metric = evaluate.load(str(report_retrieval_metric_path()))
    metric.compute(predictions=[["s2", "s1"], ["s1", "s2"]], references=[["s1"], ["s1"]], ks=[1, 5])

Same numbers as the package's harness (`llm2clip4cxr.evaluation.ranking_metrics`): per query, the rank
is the 1-based position of the first relevant id in its ranked list (a query whose list holds none is a
miss everywhere and adds 0 to MRR); recall@K is the fraction of queries with a relevant id in the top
K (the CLIP-retrieval "hit rate"), MRR the mean reciprocal rank. For the strict findings->impression
metric, rank unique impressions and give each query its one relevant id.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: per query, corpus ids ranked best first (complete, or at least max(ks) long).
    references: per query, the relevant corpus ids (at least one).
    ks: recall cut-offs (default [1, 5, 10]).
Returns:
    {"recall@K": float for each K, "mrr": float, "num_queries": int}
"""


class ReportRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        ks = [int(k) for k in ks]
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}.")
        ranks = np.empty(len(predictions), dtype=np.float64)
        for i, (ranked, relevant) in enumerate(zip(predictions, references)):
            if not relevant:
                raise ValueError(f"Query {i} has no relevant id; every query needs at least one.")
            if len(set(ranked)) != len(ranked):
                raise ValueError(f"The ranking of query {i} repeats a corpus id.")
            targets = set(relevant)
            ranks[i] = next((position for position, item in enumerate(ranked, 1) if item in targets), np.inf)
        result = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
        result["mrr"] = float((1.0 / ranks).mean())
        result["num_queries"] = len(predictions)
        return result
