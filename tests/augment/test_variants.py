import json
import random

import pytest

from llm2clip4cxr.augment.triplets import build_triplets, load_triplets_jsonl
from llm2clip4cxr.augment.variants import (
    BOILERPLATE_RULES,
    FINDING_SUBSTITUTIONS,
    NEGATIVE_GENERATORS,
    POSITIVE_GENERATORS,
    boilerplate_kind,
    change_severity,
    change_size,
    contract_abbreviations,
    drop_boilerplate,
    expand_abbreviations,
    flip_negation,
    load_abbreviations,
    make_hard_negative,
    make_positive,
    shuffle_sentences,
    split_sentences,
    substitute_finding,
    swap_change_status,
    swap_laterality,
    typo_words,
)

ALL_GENERATORS = {**POSITIVE_GENERATORS, **NEGATIVE_GENERATORS}
# A report every generator can change.
REPORT = (
    "The heart is normal in size. There is a small right pleural effusion, increased since the prior study. "
    "A 1.5 cm nodule in the RLL. No pneumothorax. Comparison: none."
)
# One-edit negatives: everything but one sentence must stay as it was.
SINGLE_EDIT = ("flip_negation", "change_severity", "change_size", "swap_change_status", "substitute_finding")


# --- sentences -------------------------------------------------------------------------------


def test_split_sentences_respects_abbreviations_decimals_and_list_markers():
    text = (
        "A 1.5 cm nodule, e.g. a granuloma. Discussed with Dr. XXXX today. 1. No PTX. "
        "2. Effusion.There is more. Opacities bilat. No effusion. Bilat. lower lobe opacities."
    )
    assert split_sentences(text) == [
        "A 1.5 cm nodule, e.g. a granuloma.",
        "Discussed with Dr. XXXX today.",
        "1. No PTX.",
        "2. Effusion.",
        "There is more.",
        "Opacities bilat.",
        "No effusion.",
        "Bilat. lower lobe opacities.",
    ]


# --- abbreviations ---------------------------------------------------------------------------


def test_packaged_abbreviation_table():
    table = dict(load_abbreviations())
    assert 60 <= len(table) <= 100
    for abbreviation, expansion in {
        "PTX": "pneumothorax", "CHF": "congestive heart failure", "ETT": "endotracheal tube", "NG": "nasogastric",
        "PICC": "peripherally inserted central catheter", "RLL": "right lower lobe", "LLL": "left lower lobe",
        "RUL": "right upper lobe", "RML": "right middle lobe", "LUL": "left upper lobe", "bilat.": "bilateral",
        "AP": "anteroposterior", "PA": "posteroanterior", "COPD": "chronic obstructive pulmonary disease",
        "ARDS": "acute respiratory distress syndrome", "CABG": "coronary artery bypass graft",
        "IVC": "inferior vena cava", "SVC": "superior vena cava", "CP": "costophrenic",
    }.items():  # fmt: skip
        assert table[abbreviation] == expansion


def test_load_abbreviations_names_the_bad_line(tmp_path):
    path = tmp_path / "table.tsv"
    path.write_text("# comment\nPTX\tpneumothorax\nCHF congestive heart failure\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 3: expected 'abbreviation<TAB>expansion'"):
        load_abbreviations(path)


def test_expand_abbreviations():
    report = "Right PTX. Opacities bilat. No effusion. AP view shows the ETT and NG tube. Lungs APPEAR clear."
    assert expand_abbreviations(report) == (
        "Right pneumothorax. Opacities bilateral. No effusion. Anteroposterior view shows the endotracheal tube "
        "and nasogastric tube. Lungs APPEAR clear."
    )
    # An all-caps sentence stays all caps; lowercase "ap" is not the abbreviation.
    assert expand_abbreviations("RECOMMEND CONTRAST ENHANCED CT FOR FURTHER EVALUATION.") == (
        "RECOMMEND CONTRAST ENHANCED COMPUTED TOMOGRAPHY FOR FURTHER EVALUATION."
    )
    assert expand_abbreviations("The lungs ap clear. No pneumothorax.") is None


def test_contract_abbreviations():
    report = "No pneumothorax. Right lower lobe opacity. Opacities are bilateral. Bilateral effusions."
    assert contract_abbreviations(report) == "No PTX. RLL opacity. Opacities are bilat. Bilat. effusions."
    assert contract_abbreviations("The lungs are clear.") is None
    # Contraction then expansion gives the report back.
    assert expand_abbreviations(contract_abbreviations(report)) == report


def test_custom_abbreviation_table():
    table = [("XR", "radiograph")]
    assert expand_abbreviations("Chest XR.", table=table) == "Chest radiograph."
    assert contract_abbreviations("Chest radiograph.", table=table) == "Chest XR."


# --- shuffle and boilerplate -------------------------------------------------------------------


def test_shuffle_sentences():
    report = "First finding. Second finding. Third finding."
    shuffled = shuffle_sentences(report, random.Random(0))
    assert shuffled == "First finding. Third finding. Second finding."
    assert sorted(split_sentences(shuffled)) == sorted(split_sentences(report))
    # List markers travel with their sentence; a two-sentence report always gets the other order.
    assert shuffle_sentences("1. Cardiomegaly. 2. No effusion.", 0) == "2. No effusion. 1. Cardiomegaly."
    assert shuffle_sentences("A 1.5 cm nodule, e.g. a granuloma, per Dr. XXXX.", 0) is None
    assert shuffle_sentences("Same. Same.", 0) is None


def test_drop_boilerplate():
    report = (
        "Comparison: none. The heart is normal in size. XXXX XXXX. Stable compared to prior. "
        "Findings discussed with Dr. XXXX by telephone. Critical result notification documented through Primordial. "
        "END OF REPORT."
    )
    assert drop_boilerplate(report) == "The heart is normal in size. Stable compared to prior."
    assert [boilerplate_kind(sentence) for sentence in split_sentences(report)] == [
        "comparison", None, "placeholder_only", None, "communication", "communication", "end_of_report",
    ]  # fmt: skip
    assert set(BOILERPLATE_RULES) >= {"comparison", "placeholder_only", "communication", "end_of_report"}
    assert drop_boilerplate("No comparison chest x-XXXX. Lungs are clear.") == "Lungs are clear."
    # Clinical text after "Comparison XXXX, XXXX" (no period) is kept.
    assert drop_boilerplate("Comparison XXXX, XXXX Well-expanded and clear lungs.") is None
    assert drop_boilerplate("The lungs are clear. .") is None  # a stray "." alone is not worth a variant
    assert drop_boilerplate("Comparison: none.") is None  # nothing clinical would remain


# --- hard negatives ----------------------------------------------------------------------------


def test_swap_laterality():
    report = "Left lower lobe opacity in the LLL. Right-sided effusion. Bilateral nodules. RML and RUL scarring."
    assert swap_laterality(report) == (
        "Right lower lobe opacity in the RLL. Left-sided effusion. Bilateral nodules. RML and LUL scarring."
    )
    # The right middle lobe and the lingula have no mirror image.
    assert swap_laterality("Right middle lobe and left lower lobe opacity.") == (
        "Right middle lobe and right lower lobe opacity."
    )
    assert swap_laterality("Left lingular atelectasis.") is None
    assert swap_laterality("No right pleural effusion.") is None  # mirrored, but not wrong
    assert swap_laterality("Bilateral effusions.") is None


@pytest.mark.parametrize(
    "sentence, flipped",
    [
        ("No pneumothorax.", "Pneumothorax."),
        ("There is no pleural effusion.", "There is pleural effusion."),
        ("No pneumothorax or pleural effusion.", "Pneumothorax and pleural effusion."),
        ("No evidence of focal consolidation.", "Evidence of focal consolidation."),
        ("Negative for pneumothorax.", "Positive for pneumothorax."),
        ("Lungs clear without focal consolidation or effusion.", "Lungs clear with focal consolidation and effusion."),
        ("No focal consolidation, no definite effusion seen.", "Focal consolidation, no definite effusion seen."),
        ("The heart is not enlarged.", "The heart is enlarged."),
        ("Small right pleural effusion.", "No right pleural effusion."),
        ("Stable cardiomegaly.", "No cardiomegaly."),
        ("There is moderate left pleural effusion.", "There is no left pleural effusion."),
        ("The cardiac silhouette is borderline enlarged.", "The cardiac silhouette is not enlarged."),
        ("The heart is normal in size.", "The heart is not normal in size."),
        ("1. Bullous emphysema.", "1. No bullous emphysema."),
    ],
)
def test_flip_negation(sentence, flipped):
    assert flip_negation(sentence, 0) == flipped


def test_flip_negation_edits_one_sentence_and_skips_what_it_cannot_flip():
    report = "Heart size normal. No pneumothorax. Mild degenerative change of the spine."
    assert flip_negation(report, 0) == "Heart size normal. Pneumothorax. Mild degenerative change of the spine."
    assert flip_negation("No XXXX. Heart size normal.", 0) is None
    assert flip_negation("Pneumothorax is no longer seen.", 0) is None


def test_change_severity():
    assert change_severity("Small right pleural effusion.", 0) == "Large right pleural effusion."
    assert change_severity("Mild cardiomegaly.", 0) == "Severe cardiomegaly."
    assert change_severity("There is an extensive opacity.", 0) == "There is a minimal opacity."
    assert change_severity("Minimal atelectasis.", 0) in ("Extensive atelectasis.", "Marked atelectasis.")
    assert change_severity("No large pleural effusion.", 0) is None  # negated: "No small ..." is not wrong
    assert change_severity("The lungs are clear.", 0) is None


def test_change_size():
    assert change_size("A 1.5 cm nodule.", 0) == "A 4.5 cm nodule."
    assert change_size("A 5 mm nodule.", 0) == "A 15 mm nodule."
    assert change_size("There is an 8mm nodule.", 0) == "There is a 24mm nodule."
    assert change_size("A 6.8 cm mass.", 0) == "A 2.3 cm mass."
    assert change_size("Mass measuring 1.9 x 1.8 cm.", 0) == "Mass measuring 5.7 x 5.4 cm."
    assert change_size("No nodule larger than 5 mm.", 0) is None
    assert change_size("Degenerative change at T6.", 0) is None


def test_swap_change_status():
    assert swap_change_status("Interval improvement in left base opacity.", 0) == (
        "Interval worsening in left base opacity."
    )
    assert swap_change_status("Effusion has decreased.", 0) == "Effusion has increased."
    assert swap_change_status("Resolving pneumonia.", 0) == "Progressing pneumonia."
    # "stable"/"unchanged" are a different thing, and a plan is not an observed change.
    assert swap_change_status("Stable cardiomegaly, unchanged from prior.", 0) is None
    assert swap_change_status("Recommend followup to ensure resolution.", 0) is None
    assert swap_change_status("No increased opacity.", 0) is None


def test_substitute_finding():
    targets = {singular for _, singular, _ in FINDING_SUBSTITUTIONS.values() if singular}
    variant = substitute_finding("Small right pleural effusion.", 0)
    prefix, finding = variant[: len("Small right ")], variant[len("Small right ") : -1]
    assert prefix == "Small right " and finding in targets - {"pleural effusion"}
    # Plural mentions get a countable replacement; "a"/"an" follow the new word.
    plural = substitute_finding("Multiple pulmonary nodules.", 3)
    assert plural.startswith("Multiple ") and plural.endswith("s.") and "nodule" not in plural
    article = substitute_finding("There is a nodule.", 0)
    assert article.split()[2] == ("an" if article.split()[3][0] in "aeiou" else "a")
    assert substitute_finding("No pneumothorax or pleural effusion.", 0) is None
    assert substitute_finding("The heart is normal in size.", 0) is None


# --- every generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_GENERATORS)
def test_generators_are_deterministic_and_change_the_text(name):
    generator = ALL_GENERATORS[name]
    variant = generator(REPORT, random.Random(7))
    assert variant is not None and variant != REPORT
    assert generator(REPORT, random.Random(7)) == variant
    assert generator(REPORT, 7) == variant  # an int seed is the same as Random(seed)


@pytest.mark.parametrize("name", ALL_GENERATORS)
def test_generators_return_none_when_nothing_changes(name):
    # A typo can hit any long word, so its no-op text has only short words and cues.
    unchangeable = "No left PTX." if name == "typo_words" else "Heart size normal."
    assert ALL_GENERATORS[name](unchangeable, 0) is None
    assert ALL_GENERATORS[name]("", 0) is None


@pytest.mark.parametrize("name", SINGLE_EDIT)
def test_single_edit_negatives_leave_other_sentences_alone(name):
    for seed in range(5):
        before, after = split_sentences(REPORT), split_sentences(NEGATIVE_GENERATORS[name](REPORT, seed))
        assert len(before) == len(after)
        assert sum(a != b for a, b in zip(before, after)) == 1


def test_generators_reject_non_strings():
    with pytest.raises(TypeError, match="`report` must be a str, got list"):
        flip_negation(["No pneumothorax."])
    with pytest.raises(TypeError, match="`rng` must be a random.Random, an int seed or None, got str"):
        flip_negation("No pneumothorax.", "seed")


# --- builders ----------------------------------------------------------------------------------


def test_make_positive_and_hard_negative():
    positive, positive_kind = make_positive(REPORT, random.Random(0))
    negative, negative_kind = make_hard_negative(REPORT, random.Random(0))
    assert positive_kind in POSITIVE_GENERATORS and positive != REPORT
    assert negative_kind in NEGATIVE_GENERATORS and negative != REPORT
    assert make_positive(REPORT, random.Random(0)) == (positive, positive_kind)
    assert make_hard_negative(REPORT, 0, kinds=["change_size"]) == (
        REPORT.replace("1.5 cm", "4.5 cm"), "change_size",
    )  # fmt: skip
    assert make_hard_negative("Heart size normal.", 0) is None
    with pytest.raises(ValueError, match=r"`kinds` must be a non-empty subset of .*got \['flip'\]"):
        make_hard_negative(REPORT, 0, kinds=["flip"])


def test_build_triplets_from_strings_and_sections():
    rows = [
        {"findings": "No pneumothorax. Small right pleural effusion.", "impression": "Small right effusion."},
        REPORT,
        "Heart size normal.",  # nothing to change: no triplet
        {"findings": "", "impression": ""},  # empty row: skipped
    ]
    triplets = build_triplets(rows, seed=0)
    assert triplets == build_triplets(rows, seed=0)
    assert [(t["positive_kind"] == "findings_impression") for t in triplets] == [False, True, False]
    section = triplets[1]
    assert section["anchor"] == rows[0]["findings"] and section["positive"] == rows[0]["impression"]
    for triplet in triplets:
        assert set(triplet) == {"anchor", "positive", "negative", "positive_kind", "negative_kind"}
        assert len({triplet["anchor"], triplet["positive"], triplet["negative"]}) == 3
    assert not any(t["positive_kind"] == "findings_impression" for t in build_triplets(rows, section_pairs=False))
    # Each report has its own seeded stream: earlier triplets do not depend on later reports.
    assert build_triplets(rows[:1], seed=0) == triplets[:2]


def test_build_triplets_rejects_bad_rows():
    with pytest.raises(ValueError, match=r"reports\[1\] has neither a 'findings' nor an 'impression' key"):
        build_triplets([REPORT, {"text": REPORT}])
    with pytest.raises(TypeError, match=r"reports\[0\] must be a str or a mapping"):
        build_triplets([3])
    with pytest.raises(ValueError, match="`negative_kinds` must be a non-empty subset"):
        build_triplets([REPORT], negative_kinds=[])


def test_build_triplets_on_real_openi_reports(report_texts):
    reports = report_texts[:200]
    triplets = build_triplets(reports, seed=0)
    for triplet in triplets:
        assert triplet["positive"] != triplet["anchor"] and triplet["negative"] != triplet["anchor"]
        assert triplet["positive_kind"] in POSITIVE_GENERATORS
        assert triplet["negative_kind"] in NEGATIVE_GENERATORS
    anchors = {triplet["anchor"] for triplet in triplets}
    assert sum(report in anchors for report in reports) / len(reports) >= 0.95
    # Every generator fires on some real reports.
    kinds = {t["positive_kind"] for t in triplets} | {t["negative_kind"] for t in triplets}
    assert kinds >= {"shuffle_sentences", "contract_abbreviations", "flip_negation", "swap_laterality"}


# --- LLM-made triplets -------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def test_load_triplets_jsonl(tmp_path):
    good = {"anchor": "No pneumothorax.", "positive": "Pneumothorax absent.", "negative": "Pneumothorax."}
    path = _write_jsonl(tmp_path / "llm.jsonl", [good, "", {**good, "negative_kind": "llm_laterality"}])
    triplets = load_triplets_jsonl(path)
    assert triplets == [
        {**good, "positive_kind": "llm_paraphrase", "negative_kind": "llm_error"},
        {**good, "positive_kind": "llm_paraphrase", "negative_kind": "llm_laterality"},
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ({"anchor": "A.", "positive": "B."}, r"line 2: missing key\(s\) \['negative'\]"),
        ('{"anchor": "A.",', r"line 2: not valid JSON"),
        (["A.", "B.", "C."], r"line 2: expected a JSON object"),
        ({"anchor": "A.", "positive": "", "negative": "C."}, r"line 2: 'positive' must be a non-empty string, got ''"),
    ],
)
def test_load_triplets_jsonl_names_the_bad_line(tmp_path, bad_line, message):
    good = {"anchor": "A.", "positive": "B.", "negative": "C."}
    path = _write_jsonl(tmp_path / "llm.jsonl", [good, bad_line])
    with pytest.raises(ValueError, match=message):
        load_triplets_jsonl(path)


def test_load_triplets_jsonl_drops_unchanged_variants(tmp_path):
    path = _write_jsonl(
        tmp_path / "llm.jsonl",
        [{"anchor": "A.", "positive": "B.", "negative": "C."}, {"anchor": "A.", "positive": " A. ", "negative": "C."}],
    )
    with pytest.warns(UserWarning, match=r"dropped 1 line\(s\).*lines \[2\]"):
        assert len(load_triplets_jsonl(path)) == 1


# --- typos -----------------------------------------------------------------------------------


def _one_slip(original: str, misspelt: str) -> bool:
    """Whether `misspelt` is `original` with two neighbouring letters swapped, one dropped or one doubled."""
    if original[0] != misspelt[0]:
        return False
    swaps = {original[:i] + original[i + 1] + original[i] + original[i + 2 :] for i in range(len(original) - 1)}
    drops = {original[:i] + original[i + 1 :] for i in range(len(original))}
    doubles = {original[: i + 1] + original[i:] for i in range(len(original))}
    return misspelt in swaps | drops | doubles


def test_typo_words_misspells_one_or_two_words_by_one_slip_and_never_a_clinical_cue():
    report = "Small left pleural effusion, improved. No pneumothorax without bilateral consolidation. Heart normal."
    cues = {"Small", "left", "improved", "No", "without", "bilateral", "normal"}
    counts = set()
    for seed in range(200):
        variant = typo_words(report, seed)
        assert variant is not None and variant != report
        changed = [(a, b) for a, b in zip(report.split(), variant.split()) if a != b]
        assert len(report.split()) == len(variant.split())
        counts.add(len(changed))
        for original, misspelt in changed:
            assert original.strip(".,") not in cues
            assert _one_slip(original.strip(".,"), misspelt.strip(".,")), (original, misspelt)
    assert counts == {1, 2}
    assert typo_words(report, 3) == typo_words(report, 3)
    assert typo_words("No left PTX. Mild, stable.", 0) is None  # nothing but short words and cues
