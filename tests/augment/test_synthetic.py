"""Compositional synthetic triplets: same state -> positive, one clinical change -> negative."""

import random
import re

import pytest

from llm2clip4cxr.augment import synthetic as synth
from llm2clip4cxr.augment.synthetic import Statement, build_synthetic_triplets, realize
from llm2clip4cxr.augment.variants import TRAINING_FAMILIES


def test_same_style_and_order_give_the_same_text_and_a_new_style_rewords():
    state = [
        Statement("finding", "effusion", side="left", grade="small"),
        Statement("finding", "pneumothorax", present=False),
        Statement("normal", "bones"),
    ]
    assert realize(state, style=1, order_seed=2) == realize(state, style=1, order_seed=2)
    texts = {realize(state, style=s, order_seed=s) for s in range(40)}
    assert len(texts) > 10
    for text in texts:  # every wording keeps the side, the size and the absent pneumothorax
        assert "left" in text and "small" in text.lower()
        assert re.search(r"\b(no|not|negative)\b", text, re.IGNORECASE)


def test_a_mutation_changes_exactly_one_statement_of_the_anchor():
    rng = random.Random(0)
    for _ in range(200):
        state = synth.sample_state(rng)
        for index, statement in enumerate(state):
            for category, changed in synth._mutations(statement, random.Random(1), lungs_clear=False):
                assert changed != statement, category
                mutated = state[:index] + [changed] + state[index + 1 :]
                anchor, negative = realize(state, 7, 8), realize(mutated, 7, 8)
                anchor_sentences = set(re.split(r"(?<=\.) ", anchor))
                negative_sentences = set(re.split(r"(?<=\.) ", negative))
                assert len(anchor_sentences - negative_sentences) <= 2, (anchor, negative)  # one sentence (or a list)


@pytest.mark.parametrize(
    ("statement", "category", "check"),
    [
        (Statement("finding", "effusion", side="left", grade="small"), "laterality", lambda s: s.side == "right"),
        (Statement("finding", "effusion", side="left", grade="small"), "severity_size", lambda s: s.grade == "large"),
        (Statement("finding", "effusion", side="left", grade="small"), "negation", lambda s: not s.present),
        (
            Statement("finding", "opacity", side="right", location="rml"),
            "laterality",
            lambda s: s.location == "lingula",
        ),
        (
            Statement("finding", "nodule", side="left", location="lul", measure_mm=5.0),
            "severity_size",
            lambda s: s.measure_mm == 15.0,
        ),
        (
            Statement("finding", "edema", grade="mild", change="increased"),
            "change_over_time",
            lambda s: s.change == "decreased",
        ),
        (Statement("device", "picc", side="right", tip="svc"), "devices_lines", lambda s: s.tip != "svc"),
        (Statement("device", "chest_tube", side="left"), "devices_lines", lambda s: s.removed),
    ],
)
def test_each_category_changes_the_attribute_it_names(statement, category, check):
    changes = [changed for name, changed in synth._mutations(statement, random.Random(0), False) if name == category]
    assert changes and all(check(changed) for changed in changes)


def test_triplets_are_distinct_seeded_and_cover_every_category():
    triplets = build_synthetic_triplets(1500, seed=5)
    assert triplets == build_synthetic_triplets(1500, seed=5)
    assert len({(t["anchor"], t["negative"]) for t in triplets}) == 1500
    for triplet in triplets:
        assert len({triplet["anchor"], triplet["positive"], triplet["negative"]}) == 3
        assert triplet["positive_kind"] == synth.FAMILY
    categories = {t["negative_kind"].split(":")[1] for t in triplets}
    assert categories == {"negation", "laterality", "severity_size", "change_over_time", "devices_lines",
                          "normal_to_abnormal"}
    assert synth.FAMILY in TRAINING_FAMILIES


def test_the_negative_is_lexically_closer_to_the_anchor_than_the_positive():
    # What makes the family useful: counting shared words prefers the wrong report.
    def overlap(a, b):
        a, b = set(a.lower().split()), set(b.lower().split())
        return len(a & b) / len(a | b)

    triplets = build_synthetic_triplets(400, seed=2)
    closer = sum(overlap(t["anchor"], t["negative"]) > overlap(t["anchor"], t["positive"]) for t in triplets)
    assert closer / len(triplets) > 0.8
