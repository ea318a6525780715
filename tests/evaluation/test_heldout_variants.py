"""Held-out (evaluation-only) report variants: exact rewrites per family, negation scope, determinism,
disjointness from the training rules, and coverage on the real Open-I reports."""

import random

import pytest

from llm2clip4cxr.augment.variants import (
    CHANGE_STATUS_SWAPS,
    NEGATIVE_GENERATORS,
    POSITIVE_GENERATORS,
    SEVERITY_SWAPS,
    load_abbreviations,
)
from llm2clip4cxr.data import read_reports_csv
from llm2clip4cxr.evaluation.heldout_variants import (
    HELDOUT_ABBREVIATIONS,
    HELDOUT_CHANGE_SWAPS,
    HELDOUT_NEGATIVE_FAMILIES,
    HELDOUT_POSITIVE_FAMILIES,
    HELDOUT_SEVERITY_SWAPS,
    SYNONYM_LEXICON,
    build_heldout_triplets,
    heldout_abbreviations,
    heldout_change,
    heldout_laterality,
    heldout_negation,
    heldout_severity,
    make_heldout_negative,
    make_heldout_positive,
    restructure_sentences,
    synonym_rewording,
)

from ..shared_data import OPENI_REPORTS, needs_openi

ALL_FAMILIES = {**HELDOUT_POSITIVE_FAMILIES, **HELDOUT_NEGATIVE_FAMILIES}
SEEDS = range(12)


def outputs(generator, report: str) -> set:
    """Every variant the generator gives for `report` over a few seeds."""
    return {generator(report, random.Random(seed)) for seed in SEEDS}


def only_output(generator, report: str):
    """The single variant the generator gives for `report`, whatever the seed."""
    (variant,) = outputs(generator, report)
    return variant


def normalized(text: str) -> str:
    return " ".join(text.split())


# --- disjointness from the training families ----------------------------------------------


def test_families_are_not_training_generators():
    assert set(ALL_FAMILIES).isdisjoint({**POSITIVE_GENERATORS, **NEGATIVE_GENERATORS})
    assert set(ALL_FAMILIES.values()).isdisjoint({*POSITIVE_GENERATORS.values(), *NEGATIVE_GENERATORS.values()})


def test_heldout_abbreviations_are_disjoint_from_the_training_table():
    training = load_abbreviations()
    training_pairs = {(short.lower(), long.lower()) for short, long in training}
    training_shorts = {short.lower() for short, _ in training}
    assert 15 <= len(HELDOUT_ABBREVIATIONS) <= 30
    for short, long in HELDOUT_ABBREVIATIONS:
        assert (short.lower(), long.lower()) not in training_pairs, (short, long)
        assert short.lower() not in training_shorts, short
    assert len({short.lower() for short, _ in HELDOUT_ABBREVIATIONS}) == len(HELDOUT_ABBREVIATIONS)


def test_heldout_severity_pairs_are_disjoint_from_training():
    for word, targets in HELDOUT_SEVERITY_SWAPS.items():
        for target in targets:
            assert target != word
            assert target not in SEVERITY_SWAPS.get(word, ()), (word, target)
            assert word not in SEVERITY_SWAPS.get(target, ()), (target, word)


def test_heldout_change_pairs_are_disjoint_from_training():
    for phrase, targets in HELDOUT_CHANGE_SWAPS.items():
        for target in targets:
            assert target != phrase
            assert CHANGE_STATUS_SWAPS.get(phrase) != target, (phrase, target)
            assert CHANGE_STATUS_SWAPS.get(target) != phrase, (target, phrase)


def test_synonym_lexicon_size_and_flags():
    assert 40 <= len(SYNONYM_LEXICON) <= 60
    for flags, members in SYNONYM_LEXICON:
        assert set(flags.split()) <= {"end", "sentence", "negated"}
        assert len(members) >= 2


# --- heldout_abbreviations ------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("Heart size within normal limits.", "Heart size WNL."),
        ("Findings consistent with pneumonia.", "Findings c/w pneumonia."),
        ("Opacity c/w pneumonia.", "Opacity consistent with pneumonia."),
        ("WNL.", "Within normal limits."),
        ("Approx. 2 cm nodule.", "Approximately 2 cm nodule."),
        ("PA and lateral.", "PA and lat."),
        ("Opacity approximately 2 cm.", "Opacity approx. 2 cm."),
        ("Opacity approx.", "Opacity approximately."),  # the abbreviation's period ended the sentence too
        ("NORMAL CHEST.", "NL CHEST."),
        ("No acute disease.", None),
    ],
)
def test_heldout_abbreviations(report, expected):
    assert only_output(heldout_abbreviations, report) == expected


def test_heldout_abbreviations_change_one_to_three_terms():
    report = "Normal heart size. Pacemaker in place. Opacity consistent with atelectasis."
    variants = outputs(heldout_abbreviations, report)
    assert None not in variants and len(variants) > 2
    for variant in variants:
        changed = sum(a != b for a, b in zip(report.split(), variant.split(), strict=False))
        assert 1 <= changed <= 4  # "consistent with" is two words


# --- synonym_rewording ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("Mild cardiomegaly.", {"Mild cardiac enlargement.", "Mild enlargement of the cardiac silhouette."}),
        ("Clear lungs.", {"Lungs clear."}),
        # "clear lungs" is not the whole sentence here, so only "well-expanded" has synonyms
        ("Well-expanded and clear lungs.", {"Well expanded and clear lungs.", "Well-inflated and clear lungs."}),
        (
            "No pleural effusion.",
            {"No pleural fluid.", "No evidence of pleural effusion.", "No evidence of pleural fluid."},
        ),
        (
            "The mediastinum is unremarkable.",
            {"The mediastinum is normal.", "The mediastinum is within normal limits."},
        ),
        (
            "The heart is normal in size and contour.",  # never "The heart size is normal and contour."
            {
                "The heart is within normal limits in size and contour.",
                "The heart is within normal limits for size and contour.",
            },
        ),
        ("Small pleural effusion.", {None}),  # an asserted effusion is not rewritten as "pleural fluid"
        ("There are no masses seen.", {None}),  # never "There are no evidence of masses"
        (
            "Heart normal and lungs are clear.",  # no "the" inside the sentence
            {"Heart normal and lungs are clear bilaterally.", "Heart normal and both lungs are clear."},
        ),
        ("XXXX XXXX.", {None}),
    ],
)
def test_synonym_rewording(report, expected):
    variants = outputs(synonym_rewording, report)
    assert variants <= expected
    assert None in expected or len(variants) >= 1


def test_synonym_rewording_keeps_sentence_case():
    assert outputs(synonym_rewording, "Heart size normal.") == {
        "Normal heart size.",
        "Heart size within normal limits.",
        "Normal cardiac size.",
    }
    variants = outputs(synonym_rewording, "The heart size is normal.")
    assert all(variant[0].isupper() for variant in variants)
    assert "The heart is normal in size." in variants


# --- restructure_sentences ------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("There is a small left pleural effusion.", {"A small left pleural effusion is present."}),
        ("A small left pleural effusion is present.", {"There is a small left pleural effusion."}),
        ("No evidence of pneumothorax.", {"No pneumothorax is seen.", "No pneumothorax is identified."}),
        ("No pneumothorax is seen.", {"There is no pneumothorax.", "No evidence of pneumothorax."}),
        (
            "There is a calcified granuloma in the right upper lobe.",
            {"A calcified granuloma is present in the right upper lobe."},
        ),
        (
            "No pneumothorax or pleural effusion.",
            {"There is no pneumothorax or pleural effusion.", "No pleural effusion or pneumothorax."},
        ),
        ("No pleural or pericardial effusion.", {"There is no pleural or pericardial effusion."}),
        ("Lungs are clear; no effusion.", {"Lungs are clear. No effusion."}),
        (
            "The lungs are clear. The heart is normal in size.",
            {
                "The lungs are clear, and the heart is normal in size.",
                "The lungs are clear; the heart is normal in size.",
            },
        ),
        ("Cardiomegaly.", {None}),
    ],
)
def test_restructure_sentences(report, expected):
    variants = outputs(restructure_sentences, report)
    assert variants <= expected
    assert None in expected or variants


def test_restructure_merges_two_negated_sentences():
    variants = outputs(restructure_sentences, "No pneumothorax. No effusion.")
    assert "No pneumothorax or effusion." in variants
    assert variants <= {
        "No pneumothorax or effusion.",
        "There is no pneumothorax. No effusion.",
        "No pneumothorax. There is no effusion.",
    }


# --- heldout_laterality ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("Small right-sided pleural effusion.", {"Small left-sided pleural effusion."}),
        ("Opacity on the left.", {"Opacity on the right."}),
        ("Free air in the right hemithorax.", {"Free air in the left hemithorax."}),
        ("Bibasilar atelectasis.", {"Right basilar atelectasis.", "Left basilar atelectasis."}),
        (
            "There are small bilateral pleural effusions.",  # one side: singular noun, verb and article
            {
                f"There is a small {side} pleural effusion."
                for side in ("right-sided", "left-sided", "unilateral right", "unilateral left")
            },
        ),
        (
            "Bilateral pleural effusions are present.",
            {
                f"{side} pleural effusion is present."
                for side in ("Right-sided", "Left-sided", "Unilateral right", "Unilateral left")
            },
        ),
        (
            "Interstitial opacities bilaterally.",
            {"Interstitial opacities on the right.", "Interstitial opacities on the left."},
        ),
        ("No right-sided effusion.", {None}),  # negated
        ("Lungs are clear bilaterally.", {None}),  # normal: "clear on the left" would not be wrong
        ("Right-sided effusion, greater than left.", {None}),  # the sentence already names the other side
        ("Right lower lobe pneumonia.", {None}),  # plain left/right is the training rule's
        ("The bilateral apices are excluded from the image.", {None}),  # no finding
    ],
)
def test_heldout_laterality(report, expected):
    variants = outputs(heldout_laterality, report)
    assert variants <= expected
    assert None in expected or variants


def test_heldout_laterality_changes_one_occurrence_and_skips_negated_ones():
    report = "Right-sided pleural effusion. Right-sided chest tube."
    assert outputs(heldout_laterality, report) == {
        "Left-sided pleural effusion. Right-sided chest tube.",
        "Right-sided pleural effusion. Left-sided chest tube.",
    }
    report = "No left-sided pleural effusion. Small right-sided pneumothorax."
    assert only_output(heldout_laterality, report) == "No left-sided pleural effusion. Small left-sided pneumothorax."


# --- heldout_negation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("There is no pleural effusion or pneumothorax.", "There is a pleural effusion, but no pneumothorax."),
        ("There is no pneumothorax.", "There is a pneumothorax."),
        ("No acute cardiopulmonary abnormality.", "An acute cardiopulmonary abnormality is present."),
        ("No pleural effusion or pneumothorax is seen.", "A pleural effusion is seen, but no pneumothorax."),
        ("No acute findings.", "Acute findings are present."),
        ("No evidence of pneumothorax.", "There is evidence of pneumothorax."),
        ("The lungs are free of focal airspace disease.", "The lungs show focal airspace disease."),
        (
            "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
            "The lungs show focal airspace disease, but no pneumothorax or pleural effusion.",
        ),
        (
            "Lungs are clear without focal consolidation, effusion or pneumothorax.",
            "Lungs are clear with focal consolidation, but without effusion or pneumothorax.",
        ),
        (
            "Visualized osseous structures of the thorax are without acute abnormality.",
            "Visualized osseous structures of the thorax show acute abnormality.",
        ),
        ("Negative for acute abnormality.", "Positive for acute abnormality."),
        ("Absence of pleural effusion.", "Presence of pleural effusion."),
        ("Calcified granuloma is present.", "Calcified granuloma is absent."),
        (
            "Mild cardiomegaly with pulmonary vascular congestion.",
            "Mild cardiomegaly without pulmonary vascular congestion.",
        ),
        ("The effusion has resolved.", "The effusion persists."),
        ("Consolidation persists.", "Consolidation has resolved."),
        ("Findings consistent with pneumonia.", None),  # "consistent with" is not a presence cue
        ("Heart size is normal.", None),
        ("No pleural or pericardial effusion.", None),  # "pleural" alone is not a finding to assert
        ("If symptoms persist, repeat radiograph.", None),  # advice, not a finding
        ("No change.", None),
    ],
)
def test_heldout_negation(report, expected):
    assert only_output(heldout_negation, report) == expected


def test_heldout_negation_leaves_negated_assertion_cues_alone():
    # "is present" inside a negation is not flipped to "is absent" ("No pneumothorax is absent").
    variants = outputs(heldout_negation, "No pneumothorax is present.")
    assert variants == {"A pneumothorax is present."}
    # "with" after a negation cue is not flipped to "without".
    assert only_output(heldout_negation, "Lungs clear. Heart normal without cardiomegaly with effusion.") == (
        "Lungs clear. Heart normal with cardiomegaly with effusion."
    )


# --- heldout_severity -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("Mild cardiomegaly.", {"Marked cardiomegaly.", "Pronounced cardiomegaly."}),
        ("Heart is mildly enlarged.", {"Heart is significantly enlarged.", "Heart is grossly enlarged."}),
        ("Small left pleural effusion.", {"Sizable left pleural effusion.", "Substantial left pleural effusion."}),
        ("A 4 mm nodule.", {"A 1.6 cm nodule."}),  # x4, rewritten in cm
        ("A 1.5 cm nodule.", {"A 6 cm nodule."}),
        ("An 8 mm nodule.", {"A 3.2 cm nodule."}),  # article fixed
        ("A 3 x 4 cm mass.", {"A 0.8 x 1 cm mass."}),  # large: /4
        (
            "No large effusion. Small pneumothorax.",
            {"No large effusion. Sizable pneumothorax.", "No large effusion. Substantial pneumothorax."},
        ),
        ("No large effusion.", {None}),  # negated
        ("No 5 mm nodule.", {None}),
        ("Mild to moderate cardiomegaly.", {None}),  # a range
        ("Moderate-sized effusion.", {None}),
        ("The heart is large.", {None}),  # predicative adjective: no grade to change
        ("Small bowel gas pattern is normal.", {None}),
        ("Lungs are clear.", {None}),
        ("Opacities more marked on the right.", {None}),
    ],
)
def test_heldout_severity(report, expected):
    variants = outputs(heldout_severity, report)
    assert variants <= expected
    assert None in expected or variants


# --- heldout_change -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "report, expected",
    [
        ("Stable calcified granuloma.", "New calcified granuloma."),
        ("Calcified granulomas are stable.", "Calcified granulomas are new."),
        ("The effusion is unchanged from prior.", "The effusion is new since prior."),
        ("Persistent cardiomegaly.", "New cardiomegaly."),
        ("Surgical clips are again seen.", "Surgical clips are newly seen."),
        ("Old healed left rib fractures.", "Acute left rib fractures."),
        ("Chronic interstitial lung disease.", "Acute interstitial lung disease."),
        ("Interval removal of the chest tube.", "Interval placement of the chest tube."),
        ("There has been interval increase in the effusion.", "There has been no interval change in the effusion."),
        ("There is significant interval decrease in the effusion.", "There is no interval change in the effusion."),
        ("Improving left basilar opacity.", "Progressing left basilar opacity."),
        ("Pneumothorax is no longer seen.", "Pneumothorax is still seen."),
        ("The mediastinum is stable.", None),  # normal anatomy
        ("Stable chest.", None),
        ("Heart size is normal and stable.", None),
        ("Old rib fractures, healed.", None),  # "Acute rib fractures, healed." is incoherent, not wrong
        ("No new nodule.", None),  # negated
        ("Chronic obstructive pulmonary disease.", None),
        ("Acute exacerbation of chronic lung disease.", None),  # "acute on acute" is incoherent, not wrong
        ("Recommend follow-up to document resolution of the opacity.", None),  # a plan
    ],
)
def test_heldout_change(report, expected):
    assert only_output(heldout_change, report) == expected


# --- registries, builders, determinism ------------------------------------------------------

REPORTS = [
    "There is a small right-sided pleural effusion. No pneumothorax. Stable calcified granuloma.",
    "Heart size within normal limits. Lungs are clear. No acute cardiopulmonary abnormality.",
    "Mild cardiomegaly with pulmonary vascular congestion. Small bilateral pleural effusions.",
    "A 4 mm nodule in the left upper lobe is again seen. No pleural effusion.",
    "XXXX XXXX.",
]


@pytest.mark.parametrize("name", sorted(ALL_FAMILIES))
def test_families_are_deterministic_and_accept_int_seeds(name):
    generator = ALL_FAMILIES[name]
    for report in REPORTS:
        assert generator(report, random.Random(5)) == generator(report, random.Random(5)) == generator(report, 5)
    with pytest.raises(TypeError):
        generator(None, 0)


def test_make_heldout_variants_name_their_family():
    variant, family = make_heldout_positive(REPORTS[0], random.Random(0))
    assert family in HELDOUT_POSITIVE_FAMILIES and normalized(variant) != normalized(REPORTS[0])
    variant, family = make_heldout_negative(REPORTS[0], random.Random(0))
    assert family in HELDOUT_NEGATIVE_FAMILIES and normalized(variant) != normalized(REPORTS[0])
    assert make_heldout_negative(REPORTS[0], 0, kinds="heldout_laterality") == (
        "There is a small left-sided pleural effusion. No pneumothorax. Stable calcified granuloma.",
        "heldout_laterality",
    )
    assert make_heldout_negative("XXXX XXXX.", 0) is None
    assert make_heldout_positive("XXXX XXXX.", 0) is None
    with pytest.raises(ValueError, match="kinds"):
        make_heldout_positive(REPORTS[0], 0, kinds=["shuffle_sentences"])  # a training family
    with pytest.raises(ValueError, match="negative_kinds"):
        build_heldout_triplets(REPORTS, negative_kinds=["flip_negation"])


def test_build_heldout_triplets():
    triplets = build_heldout_triplets(REPORTS, seed=0)
    assert len(triplets) == 4  # "XXXX XXXX." gives none
    assert triplets == build_heldout_triplets(REPORTS, seed=0)
    assert triplets != build_heldout_triplets(REPORTS, seed=1)
    for triplet in triplets:
        assert set(triplet) == {"anchor", "positive", "negative", "positive_kind", "negative_kind"}
        assert triplet["positive_kind"] in HELDOUT_POSITIVE_FAMILIES
        assert triplet["negative_kind"] in HELDOUT_NEGATIVE_FAMILIES
        assert len({normalized(triplet[key]) for key in ("anchor", "positive", "negative")}) == 3
    # Rows with findings/impression work too; each report's draws do not depend on the reports after it.
    rows = [{"findings": report, "impression": ""} for report in REPORTS]
    assert build_heldout_triplets(rows, seed=0) == triplets
    assert build_heldout_triplets(REPORTS[:2], seed=0) == triplets[:2]
    only_laterality = build_heldout_triplets(REPORTS, negative_kinds=["heldout_laterality"])
    assert {triplet["negative_kind"] for triplet in only_laterality} == {"heldout_laterality"}


# --- real Open-I reports ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def openi_texts():
    if not OPENI_REPORTS.is_file():
        pytest.skip(needs_openi.kwargs["reason"])
    rows = read_reports_csv(OPENI_REPORTS)
    return [" ".join(part for part in (row["findings"], row["impression"]) if part) for row in rows]


def test_every_family_changes_openi_reports(openi_texts):
    coverage = {}
    for name, generator in ALL_FAMILIES.items():
        changed = 0
        for index, report in enumerate(openi_texts):
            variant = generator(report, random.Random(index))
            if variant is not None:
                assert normalized(variant) != normalized(report), (name, report)
                changed += 1
        coverage[name] = changed / len(openi_texts)
    print("Open-I coverage:", {name: round(fraction, 3) for name, fraction in coverage.items()})
    for name in HELDOUT_POSITIVE_FAMILIES:
        assert coverage[name] >= 0.3, (name, coverage[name])
    for name in HELDOUT_NEGATIVE_FAMILIES:
        assert coverage[name] >= 0.02, (name, coverage[name])


def test_heldout_triplets_on_openi(openi_texts):
    triplets = build_heldout_triplets(openi_texts, seed=0)
    fraction = len(triplets) / len(openi_texts)
    print(f"Open-I held-out triplets: {len(triplets)}/{len(openi_texts)} = {fraction:.3f}")
    assert fraction >= 0.4
    assert {triplet["positive_kind"] for triplet in triplets} == set(HELDOUT_POSITIVE_FAMILIES)
    assert {triplet["negative_kind"] for triplet in triplets} == set(HELDOUT_NEGATIVE_FAMILIES)
