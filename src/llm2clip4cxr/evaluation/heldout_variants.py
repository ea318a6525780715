"""Held-out report variants: rewrites and errors the text encoder never sees in training.

EVALUATION ONLY. Nothing in this module may feed training data (`augment.triplets.build_triplets`,
text or CLIP training, tokenizer training): its whole point is to be unseen. An evaluation built
from the training generators (`augment.variants`) only measures how well the model learned those
rules; these families are written differently, with their own word lists, so a model that only
learned "left <-> right" or "No X. <-> X." gets no credit for it here.

Every generator takes `(report, rng)` (a seeded `random.Random`, an int seed or None) and returns
the variant, or None when it cannot change the text; a variant equal to its input is never returned.

Held-out positive families (same clinical content):
    heldout_abbreviations  1-3 terms abbreviated or expanded with `HELDOUT_ABBREVIATIONS`, a table
                           disjoint from `resources/abbreviations.tsv` ("within normal limits" <-> "WNL",
                           "consistent with" <-> "c/w", "pacemaker" <-> "pacer"); training rewrites
                           every listed term of its own table.
    synonym_rewording      1-3 phrases replaced by a radiological synonym from `SYNONYM_LEXICON`
                           ("cardiomegaly" <-> "cardiac enlargement", "stable" <-> "unchanged",
                           "The heart size is normal." <-> "The cardiac silhouette is normal in size.").
                           Training has no synonym family.
    restructure_sentences  one sentence rebuilt: "There is a small effusion." <-> "A small effusion is
                           present.", "No evidence of X." <-> "No X is seen.", "No X." -> "There is no X.",
                           "No A or B" <-> "No B or A",
                           two short sentences merged with ";" / ", and", or one split at ";" / ", no".
                           Training only shuffles or drops whole sentences.

Held-out negative families (one clinically wrong edit, asserted text only):
    heldout_laterality     one side expression changed: "right-sided" <-> "left-sided", "on the right" <->
                           "on the left", "right hemithorax" <-> "left hemithorax", "bilateral"/"bibasilar"/
                           "biapical"/"bilaterally" -> one side. Training swaps every bare left/right word
                           and leaves "bilateral" alone.
    heldout_negation       presence/absence flipped with other cues than training's "No X." <-> "X.":
                           "There is no A or B." -> "There is an A, but no B.", "No A." -> "An A is present.",
                           "free of X" / "clear of X" / "is without X" -> "shows X", "negative for" ->
                           "positive for", "absence of" <-> "presence of", "X is present" <-> "X is absent",
                           "with X" -> "without X", "X has resolved" <-> "X persists".
    heldout_severity       one severity word from `HELDOUT_SEVERITY_SWAPS` (no pair shared with training's
                           `SEVERITY_SWAPS`: "mild" -> "marked", "small" -> "sizable", "focal" <-> "diffuse"),
                           or one measurement x4 (or /4 when already large) and rewritten in the other unit
                           when it crosses 1 cm ("4 mm" -> "1.6 cm"); training scales by 3 in the same unit.
    heldout_change         one change-over-time expression from `HELDOUT_CHANGE_SWAPS` (no pair shared with
                           `CHANGE_STATUS_SWAPS`): "stable"/"unchanged"/"persistent" finding -> "new",
                           "again seen" -> "newly seen", "old healed fracture" -> "acute fracture", "chronic"
                           -> "acute", "interval removal" <-> "interval placement", "improving" <->
                           "progressing". Training never edits stable/unchanged.

Like training, negatives edit only asserted mentions ("No large effusion" is not made "No small
effusion"); the negation family instead edits the negation cue itself.

`HELDOUT_POSITIVE_FAMILIES` / `HELDOUT_NEGATIVE_FAMILIES` name the families; `make_heldout_positive` and
`make_heldout_negative` take the first family (in seeded order) that changes a report, and
`build_heldout_triplets` makes (anchor, positive, negative) evaluation triplets from them.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Mapping

from ..augment.triplets import report_triplet, seeded_reports
from ..augment.variants import (
    _CLAUSE_BREAK,
    _LIST_MARKER_PREFIX,
    Generator,
    RandomLike,
    _as_rng,
    _at_sentence_start,
    _capitalize_first,
    _changed,
    _check_report,
    _first_variant,
    _indefinite_article,
    _is_negated,
    _lower_first,
    _match_case,
    _normalized,
    _select,
    _sentence_spans,
    _sentence_start,
    _splice,
)

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _phrase(text: str) -> str:
    """Regex for a literal phrase whose words may be separated by any whitespace."""
    return r"\s+".join(re.escape(word) for word in text.split())


@functools.lru_cache(maxsize=64)
def _spans(report: str) -> tuple[tuple[int, int], ...]:
    """The training module's sentence spans, cached: every family looks them up many times per report."""
    return tuple(_sentence_spans(report))


@functools.lru_cache(maxsize=64)
def _bodies(report: str) -> tuple[tuple[int, int, int, int], ...]:
    """(sentence start, body start, body end, sentence end) per sentence.

    The body leaves out a "1." list marker and the final punctuation.
    """
    bodies = []
    for start, end in _spans(report):
        marker = _LIST_MARKER_PREFIX.match(report[start:end])
        body_start = start + (marker.end() if marker else 0)
        body_end = body_start + re.search(r"[\s.!?]*$", report[body_start:end]).start()
        if body_end > body_start:
            bodies.append((start, body_start, body_end, end))
    return tuple(bodies)


def _apply(report: str, start: int, end: int, text: str) -> str:
    return report[:start] + text + report[end:]


# Cues the training module's negation scope does not know: "clear of X", "to rule out X", "X is excluded".
_EXTRA_NEGATION_CUE = re.compile(r"\b(?:clear\s+of|rule\s+out|ruled\s+out|excluded?|exclusion\s+of)\b", re.I)


def _is_asserted(report: str, position: int, spans=None) -> bool:
    """Whether `position` is outside a negation's scope (the training module's cues and `_EXTRA_NEGATION_CUE`)."""
    spans = _spans(report) if spans is None else spans
    sentence_start = _sentence_start(spans, position)
    if _is_negated(report, sentence_start, position):
        return False
    prefix = report[sentence_start:position]
    breaks = list(_CLAUSE_BREAK.finditer(prefix))
    return not _EXTRA_NEGATION_CUE.search(prefix[breaks[-1].end() :] if breaks else prefix)


def _asserted(report: str, pattern: re.Pattern) -> list[re.Match]:
    """Matches of `pattern` outside a negation's scope ("No large effusion", "clear of focal disease")."""
    spans = _spans(report)
    return [match for match in pattern.finditer(report) if _is_asserted(report, match.start(), spans)]


def _sentence_of(report: str, spans: list[tuple[int, int]], position: int) -> str:
    start = _sentence_start(spans, position)
    end = next((span_end for span_start, span_end in spans if span_start == start), len(report))
    return report[start:end]


def _pick_disjoint(candidates: list, rng: random.Random, count: int) -> list:
    """Up to `count` seeded candidates (start, end, ...) that do not overlap, in text order."""
    order = candidates[:]
    rng.shuffle(order)
    chosen = []
    for candidate in order:
        if len(chosen) == count:
            break
        if all(candidate[1] <= other[0] or candidate[0] >= other[1] for other in chosen):
            chosen.append(candidate)
    return sorted(chosen, key=lambda candidate: candidate[0])


# Findings (own list, not the training module's): a clause mentioning one of these describes a finding
# rather than normal anatomy, so a change or presence edit makes it clinically wrong.
_FINDINGS = (
    r"effusions?|pneumothora(?:x|ces)|consolidations?|atelectasis|atelectatic|edema|cardiomegaly|nodules?|nodular"
    r"|mass(?:es)?|opacit(?:y|ies)|opacification|infiltrates?|pneumonia|emphysema(?:tous)?|granulomas?|granulomatous"
    r"|fractures?|scars?|scarring|fibrosis|fibrotic|thickening|hyperinflation|hyperexpansion|calcifications?"
    r"|calcified|congestion|(?:lymph)?adenopathy|deformit(?:y|ies)|densit(?:y|ies)|scoliosis|kyphosis|lesions?"
    r"|blunting|hernia|elevation|bronchiectasis|air\s?space\s+disease|changes|tortuosity|ectasia|enlargement"
    r"|prominence|markings|collapse|cavit(?:y|ies|ary)|metasta\w+|spondylosis|osteophytes?|bullae|blebs?"
)
_FINDING = re.compile(rf"\b(?:{_FINDINGS})\b", re.IGNORECASE)

# Head nouns that take "a"/"an" when a negation is removed ("no pneumothorax" -> "a pneumothorax").
_COUNTABLE = frozenset(
    [
        "effusion",
        "pneumothorax",
        "nodule",
        "mass",
        "opacity",
        "infiltrate",
        "lesion",
        "fracture",
        "granuloma",
        "abnormality",
        "process",
        "density",
        "hernia",
        "collection",
        "deformity",
        "finding",
        "abscess",
        "cavity",
        "catheter",
        "tube",
        "line",
        "pacemaker",
    ]
)
_DETERMINER = re.compile(r"^(?:a|an|the|any|some|one|two|several|multiple|numerous|\d+)\b", re.IGNORECASE)
# Where a noun phrase's head ends: a preposition, a participle or a relative word.
_NP_END = re.compile(
    r"\s+(?:in|at|within|of|on|along|to|from|for|involving|overlying|over|near|seen|identified|noted|with|without"
    r"|which|that|projecting|suggest\w*|is|are)\b",
    re.IGNORECASE,
)
# Text that is not a plain noun phrase (or a list of them).
_NOT_PLAIN = re.compile(
    r"[;:()\[\]&<>=]|\b(?:is|are|was|were|be|been|has|have|had|appears?|may|might|could|can|would|should|will"
    r"|which|that|this|these|those|there|if|than|but|however|although|though|whereas|otherwise|suggest\w*"
    r"|represent\w*|consistent|compatible|likely|possibl\w*|probabl\w*|versus|vs|measur\w*|recommend\w*)\b",
    re.IGNORECASE,
)


def _head(noun_phrase: str) -> str:
    end = _NP_END.search(noun_phrase)
    words = re.findall(r"[A-Za-z][A-Za-z-]*", noun_phrase[: end.start()] if end else noun_phrase)
    return words[-1].lower() if words else ""


def _is_plural(word: str) -> bool:
    word = word.lower()
    if re.search(r"(?:ss|us|is|ax|ex|ix|ys)$", word):  # mass, atelectasis, pneumothorax
        return False
    return word.endswith("s")


def _with_article(noun_phrase: str) -> str:
    """Article added: "pneumothorax" -> "a pneumothorax"; mass nouns, plurals and determined phrases unchanged."""
    if _DETERMINER.match(noun_phrase) or _head(noun_phrase) not in _COUNTABLE:
        return noun_phrase
    return f"{_indefinite_article(noun_phrase)} {noun_phrase}"


def _has_content(text: str) -> bool:
    return re.search(r"[A-Za-z]{3,}", text.replace("XXXX", "")) is not None


_ADJECTIVE_END = re.compile(r"(?:al|ic|ar|ary|ous|ive)$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Positive: heldout_abbreviations
# ---------------------------------------------------------------------------------------------

# (abbreviation, expansion): none of these pairs is in resources/abbreviations.tsv. As in that table, an
# abbreviation without lowercase letters matches case-sensitively, one with lowercase letters in any case.
# No abbreviation ends in a period the sentence splitter would take for a sentence end ("approx." it knows).
HELDOUT_ABBREVIATIONS: tuple[tuple[str, str], ...] = (
    ("WNL", "within normal limits"),
    ("nl", "normal"),
    ("abnl", "abnormal"),
    ("c/w", "consistent with"),
    ("w/o", "without"),
    ("w/", "with"),
    ("approx.", "approximately"),
    ("hx", "history"),
    ("pt", "patient"),
    ("pulm", "pulmonary"),
    ("vasc", "vascular"),
    ("lat", "lateral"),
    ("LN", "lymph node"),
    ("LNs", "lymph nodes"),
    ("HTN", "hypertension"),
    ("CAD", "coronary artery disease"),
    ("MI", "myocardial infarction"),
    ("PPM", "permanent pacemaker"),
    ("pacer", "pacemaker"),
    ("fx", "fracture"),
    ("fxs", "fractures"),
    ("mets", "metastases"),
    ("PNX", "pneumothorax"),
    ("atx", "atelectasis"),
    ("eval", "evaluation"),
    ("dx", "diagnosis"),
)


@functools.lru_cache(maxsize=1)
def _abbreviation_patterns():
    expansions = {short.lower(): long for short, long in HELDOUT_ABBREVIATIONS}
    contractions = {long.lower(): short for short, long in HELDOUT_ABBREVIATIONS}

    def alternation(terms: Iterable[str]) -> str:
        return "|".join(_phrase(term) for term in sorted(terms, key=len, reverse=True))

    exact = [short for short, _ in HELDOUT_ABBREVIATIONS if not any(ch.islower() for ch in short)]
    caseless = [short for short, _ in HELDOUT_ABBREVIATIONS if any(ch.islower() for ch in short)]
    short_pattern = re.compile(rf"(?<![\w/.-])(?:{alternation(exact)}|(?i:{alternation(caseless)}))(?![\w/-])")
    long_pattern = re.compile(rf"(?<![\w/-])(?:{alternation(contractions)})(?![\w/-])", re.IGNORECASE)
    return short_pattern, expansions, long_pattern, contractions


def heldout_abbreviations(report: str, rng: RandomLike = None) -> str | None:
    """1-3 seeded terms abbreviated or expanded with `HELDOUT_ABBREVIATIONS`.

    "Heart size within normal limits." -> "Heart size WNL.", "c/w scarring" -> "consistent with scarring".
    """
    report, rng = _check_report(report), _as_rng(rng)
    short_pattern, expansions, long_pattern, contractions = _abbreviation_patterns()
    spans = _spans(report)
    candidates = [(m.start(), m.end(), "expand") for m in short_pattern.finditer(report)]
    candidates += [(m.start(), m.end(), "contract") for m in long_pattern.finditer(report)]
    if not candidates:
        return None
    chosen = _pick_disjoint(candidates, rng, rng.randint(1, min(3, len(candidates))))
    variant = report
    for start, end, direction in reversed(chosen):
        source = report[start:end]
        if direction == "expand":
            short = next(s for s, _ in HELDOUT_ABBREVIATIONS if s.lower() == source.lower())
            text = expansions[source.lower()]
            if any(ch.islower() for ch in short) and len(source) > 1 and source.isupper():
                text = text.upper()
            elif _at_sentence_start(report, spans, start) or (
                any(ch.islower() for ch in short) and source[0].isupper()
            ):
                text = _capitalize_first(text)
            rest = report[end:].lstrip()
            if source.endswith(".") and (not rest or rest[:1].isupper()):
                text += "."  # "... approx." ended the sentence too
        else:
            text = contractions[_normalized(source).lower()]
            if any(ch.islower() for ch in text):
                text = _match_case(source, text)
            if text.endswith(".") and report[end : end + 1] == ".":
                text = text[:-1]
        variant = _apply(variant, start, end, text)
    return _changed(report, variant)


# ---------------------------------------------------------------------------------------------
# Positive: synonym_rewording
# ---------------------------------------------------------------------------------------------

# Words after which "no"/"without" introduces a finding, so "no X" <-> "no evidence of X" is safe.
_NEGATED_FINDING_AHEAD = (
    rf"(?=\s+(?:(?:focal|acute|large|small|visible|definite|significant|pleural|pulmonary|lung|airspace|new)\s+)*"
    rf"(?:{_FINDINGS})\b)"
)

# "There are no masses" must not become "There are no evidence of masses".
_NOT_AFTER_PLURAL_VERB = r"(?<!\bare\s)(?<!\bwere\s)"

# Groups of interchangeable phrases. Each member is written as it is put in (a leading "the " is optional
# when matching) or is a (regex, written form) pair. Flags: "end" the phrase must end its clause;
# "sentence" it must be the whole sentence; "negated" it must lie in a negation's scope.
SYNONYM_LEXICON: tuple[tuple[str, tuple], ...] = (
    ("end", ("the heart size is normal", "the heart is normal in size", "the cardiac silhouette is normal in size",
             "heart size is within normal limits")),
    ("sentence", ("heart size normal", "normal heart size", "heart size within normal limits", "normal cardiac size")),
    ("end", ("the lungs are clear", "both lungs are clear", "the lungs are clear bilaterally")),
    ("sentence", ("clear lungs", "lungs clear")),
    ("", ("no acute cardiopulmonary abnormality", "no acute cardiopulmonary process",
          "no acute cardiopulmonary disease")),
    ("", ("no acute cardiopulmonary abnormalities", "no acute cardiopulmonary findings")),
    ("", ("no acute abnormality", "no acute process", "no acute disease")),
    ("", (("no\\s+evidence\\s+of" + _NEGATED_FINDING_AHEAD, "no evidence of"),
          (_NOT_AFTER_PLURAL_VERB + "no" + _NEGATED_FINDING_AHEAD, "no"))),
    ("", (("without\\s+evidence\\s+of" + _NEGATED_FINDING_AHEAD, "without evidence of"),
          ("without" + _NEGATED_FINDING_AHEAD, "without"))),
    ("", ("bony", "osseous")),
    ("", ("skeletal structures", "bony structures", "osseous structures")),
    ("", ("pulmonary vascularity", "pulmonary vasculature")),
    ("", ("cardiomegaly", "cardiac enlargement", "enlargement of the cardiac silhouette")),
    ("negated", ("pleural effusion", "pleural fluid")),
    ("end", ("is within normal limits", "is normal", "is unremarkable")),
    ("end", ("are within normal limits", "are normal", "are unremarkable")),
    ("end", ("appears within normal limits", "appears normal", "appears unremarkable")),
    ("end", ("appear within normal limits", "appear normal", "appear unremarkable")),
    ("", ("within normal limits in size", "normal in size")),
    ("", ("within normal limits for size and contour", "normal in size and contour")),
    ("", ("consistent with", "compatible with")),
    ("", (("(?<!hemodynamically\\s)stable", "stable"), "unchanged")),
    ("", ("again seen", "again noted", "again demonstrated", "again identified")),
    ("", ("lymphadenopathy", "adenopathy")),
    ("", ("hiatal hernia", "hiatus hernia")),
    ("", ("sternotomy wires", "sternal wires")),
    ("", ("postoperative changes", "postsurgical changes", "post-surgical changes")),
    ("", ("hyperinflation", "hyperexpansion", "overinflation")),
    ("", ("hyperinflated", "hyperexpanded", "overinflated")),
    ("", ("focal consolidation", "focal airspace consolidation", "focal alveolar consolidation")),
    ("", ("focal airspace disease", "focal airspace opacity")),
    ("", ("pulmonary nodule", "lung nodule")),
    ("", ("pulmonary nodules", "lung nodules")),
    ("", ("pulmonary mass", "lung mass")),
    ("", (("cardio\\s?mediastinal\\s+silhouette", "cardiomediastinal silhouette"), "cardiomediastinal contour")),
    ("", ("mediastinal contour", "mediastinal silhouette")),
    ("", ("mediastinal contours", "mediastinal silhouettes")),
    ("", ("heart and mediastinum", "cardiac and mediastinal contours")),
    ("", ("trachea is midline", "trachea is in the midline")),
    ("", ("aortic atherosclerosis", "atherosclerosis of the aorta")),
    ("", ("aortic calcification", "calcification of the aorta")),
    ("", ("calcified granuloma", "calcified granulomatous nodule")),
    ("", ("calcified granulomas", "calcified granulomatous nodules")),
    ("", ("is seen", "is identified", "is noted")),
    ("", ("are seen", "are identified", "are noted")),
    ("", ("low lung volumes", "diminished lung volumes")),
    ("", ("emphysematous changes", "changes of emphysema")),
    ("sentence", ("tortuous aorta", "tortuosity of the aorta", "aortic tortuosity")),
    ("", ("interstitial markings", "interstitial lung markings")),
    ("", ("chest radiograph", "chest film")),
    ("", ("platelike atelectasis", "plate-like atelectasis", "discoid atelectasis")),
    ("", ("bibasilar", "bibasal")),
    ("", ("free of", "clear of")),
    ("", ("well-expanded", "well expanded", "well-inflated")),
)  # fmt: skip
_CLAUSE_END_AHEAD = r"(?=\s*(?:[.,;:]|$))"


@functools.lru_cache(maxsize=1)
def _synonym_patterns() -> list[tuple[re.Pattern, str | None, int, int, str]]:
    """(pattern, a word the text must contain or None, group index, member index, flags) per lexicon member."""
    patterns = []
    for group_index, (flags, members) in enumerate(SYNONYM_LEXICON):
        for member_index, member in enumerate(members):
            if isinstance(member, tuple):
                regex = member[0]
            else:
                bare = member[4:] if member.startswith("the ") else member
                regex = (
                    r"(?:the\s+)?" + _phrase(bare) if member.startswith("the ") or "end" in flags else _phrase(bare)
                )
            if "end" in flags:
                regex += _CLAUSE_END_AHEAD
            key = None if isinstance(member, tuple) else max(member.lower().split(), key=len)
            pattern = re.compile(rf"(?<![\w-])(?:{regex})(?![\w-])", re.IGNORECASE)
            patterns.append((pattern, key, group_index, member_index, flags))
    return patterns


def _written(member) -> str:
    return member[1] if isinstance(member, tuple) else member


def _without_the(text: str) -> str:
    return re.sub(r"^the\s+", "", _normalized(text).lower())


def _synonym_candidates(report: str) -> list[tuple[int, int, int, int]]:
    spans = _spans(report)
    bodies = {(body_start, body_end) for _, body_start, body_end, _ in _bodies(report)}
    candidates = []
    lowered = report.lower()
    for pattern, key, group_index, member_index, flags in _synonym_patterns():
        if key is not None and key not in lowered:
            continue
        for match in pattern.finditer(report):
            if "sentence" in flags and (match.start(), match.end()) not in bodies:
                continue
            if "negated" in flags and _is_asserted(report, match.start(), spans):
                continue
            candidates.append((match.start(), match.end(), group_index, member_index))
    return candidates


def synonym_rewording(report: str, rng: RandomLike = None) -> str | None:
    """1-3 seeded phrases replaced by a synonym from `SYNONYM_LEXICON`.

    "Mild cardiomegaly. Lungs clear." -> "Mild cardiac enlargement. Clear lungs."
    """
    report, rng = _check_report(report), _as_rng(rng)
    spans = _spans(report)
    candidates = _synonym_candidates(report)
    if not candidates:
        return None
    chosen = _pick_disjoint(candidates, rng, rng.randint(1, min(3, len(candidates))))
    variant = report
    for start, end, group_index, member_index in reversed(chosen):
        members = SYNONYM_LEXICON[group_index][1]
        source = report[start:end]
        others = [_written(m) for i, m in enumerate(members) if i != member_index]
        others = [text for text in others if _without_the(text) != _without_the(source)]
        if not others:
            continue
        text = rng.choice(others)
        if (
            text.startswith("the ")
            and not re.match(r"the\s", source, re.I)
            and not _at_sentence_start(report, spans, start)
        ):
            text = text[4:]  # "The otherwise lungs are clear" must not get a second "the"
        variant = _splice(variant, start, end, _match_case(source, text))
    return _changed(report, variant)


# ---------------------------------------------------------------------------------------------
# Positive: restructure_sentences
# ---------------------------------------------------------------------------------------------

_PARTICIPLE = r"(?:seen|identified|noted|demonstrated|visualized|present|evident|appreciated)"
_THERE_IS = re.compile(
    r"^there\s+(?P<verb>is|are)\s+(?P<negation>no\s+(?P<evidence>evidence\s+of\s+)?)?(?P<np>.+)$", re.IGNORECASE
)
_IS_PRESENT = re.compile(
    rf"^(?P<np>.+?)\s+(?P<verb>is|are)\s+(?P<participle>{_PARTICIPLE})(?P<tail>\s+(?:in|at|within|along|overlying"
    rf"|over|on|throughout)\s.+)?$",
    re.IGNORECASE,
)
_NO_SENTENCE = re.compile(
    rf"^no\s+(?!longer\b|evidence\b)(?P<np>.+?)(?:\s+(?:(?:is|are)\s+)?{_PARTICIPLE})?$", re.IGNORECASE
)
_NO_EVIDENCE = re.compile(r"^no\s+evidence\s+of\s+(?P<np>.+)$", re.IGNORECASE)
# A locative tail that reads better after the verb: "A small effusion is present in the left base."
_LOCATIVE = re.compile(r"\s+(?:in|at|within|along|overlying|over|throughout)\s+(?:the|both)\b", re.IGNORECASE)
_ORDER_SWAP = re.compile(
    r"\b(?P<cue>no|without)\s+(?P<first>(?:[a-z-]+\s+){0,3}[a-z-]+)\s+or\s+(?P<second>(?:[a-z-]+\s+){0,3}[a-z-]+)"
    r"(?=\s*(?:[.,;]|$)|\s+(?:is|are|seen|identified|noted|present|demonstrated)\b)",
    re.IGNORECASE,
)
_NOT_LIST_WORD = re.compile(r"\b(?:no|or|and|the|of|in|is|are|seen|with|without|evidence|xxxx)\b", re.IGNORECASE)


def _restructure_there_is(body: str) -> str | None:
    """Noun phrase moved before the verb: "There is a small effusion" -> "A small effusion is present".

    "There is no X" -> "No X is seen". Sentence bodies come without their final period.
    """
    match = _THERE_IS.match(body)
    if not match or _NOT_PLAIN.search(match.group("np")) or not _has_content(match.group("np")):
        return None
    noun_phrase, verb = match.group("np"), match.group("verb").lower()
    if match.group("negation"):
        if match.group("evidence"):
            verb = "are" if _is_plural(_head(noun_phrase)) else "is"
        return f"No {noun_phrase} {verb} seen"
    if not _FINDING.search(noun_phrase):
        return None
    tail = ""
    locative = _LOCATIVE.search(noun_phrase)
    if locative:
        noun_phrase, tail = noun_phrase[: locative.start()], noun_phrase[locative.start() :]
    return f"{_capitalize_first(_lower_first(noun_phrase))} {verb} present{tail}"


def _restructure_present(body: str, rng: random.Random) -> str | None:
    """Noun phrase moved after "there is": "A small effusion is present" -> "There is a small effusion".

    "No X is seen" -> "There is no X" or "No evidence of X".
    """
    match = _IS_PRESENT.match(body)
    if not match:
        return None
    noun_phrase, verb = match.group("np"), match.group("verb").lower()
    if _NOT_PLAIN.search(noun_phrase) or not _has_content(noun_phrase) or "," in noun_phrase:
        return None
    if re.match(r"(?:the|this|that|these|those|its|his|her|their|it)\b", noun_phrase, re.IGNORECASE):
        return None
    negated = re.match(r"no\s+", noun_phrase, re.IGNORECASE)
    if negated:
        rest = noun_phrase[negated.end() :]
        if rng.random() < 0.5:
            return f"No evidence of {rest}{match.group('tail') or ''}"
        return f"There {verb} no {rest}{match.group('tail') or ''}"
    if not _FINDING.search(noun_phrase) or re.match(r"no\b|not\b", noun_phrase, re.IGNORECASE):
        return None
    return f"There {verb} {_lower_first(noun_phrase)}{match.group('tail') or ''}"


def _restructure_no(body: str, rng: random.Random) -> str | None:
    """A bare negation made a clause: "No pneumothorax" -> "There is no pneumothorax".

    "No evidence of X" -> "No X is seen".
    """
    evidence = _NO_EVIDENCE.match(body)
    if evidence:
        noun_phrase = evidence.group("np")
        if _NOT_PLAIN.search(noun_phrase) or not _has_content(noun_phrase):
            return None
        verb = "are" if _is_plural(_head(noun_phrase)) else "is"
        return f"No {noun_phrase} {verb} {rng.choice(('seen', 'identified'))}"
    match = _NO_SENTENCE.match(body)
    if not match:
        return None
    noun_phrase = match.group("np")
    if _NOT_PLAIN.search(noun_phrase) or not _has_content(noun_phrase) or re.search(r"\bno\b", noun_phrase, re.I):
        return None
    first = re.split(r",|\s+or\s+|\s+and\s+", noun_phrase)[0]
    verb = "are" if _is_plural(_head(first)) else "is"
    return f"There {verb} no {noun_phrase}"


def _restructure_order(body: str) -> str | None:
    """Two negated findings swapped: "No pneumothorax or effusion" <-> "No effusion or pneumothorax"."""
    match = _ORDER_SWAP.search(body)
    if not match:
        return None
    first, second = match.group("first"), match.group("second")
    for item in (first, second):
        # Each item must end in a finding: "No pleural or pericardial effusion" has no items to swap.
        if _NOT_LIST_WORD.search(item) or not re.search(rf"\b(?:{_FINDINGS})$", item, re.IGNORECASE):
            return None
    if first.lower() == second.lower():
        return None
    swapped = f"{match.group('cue')} {_lower_first(second)} or {_lower_first(first)}"
    return body[: match.start()] + swapped + body[match.end() :]


def _restructure_split(body: str) -> str | None:
    """Split at ";", ", no" or ", and <clause>": "Lungs are clear; no effusion" -> "Lungs are clear. No effusion"."""
    match = re.search(r"\s*;\s+|,\s+(?=no\s)|,\s+and\s+(?=(?:the\s+)?[a-z-]+\s+(?:is|are)\b)", body, re.IGNORECASE)
    if not match:
        return None
    first, second = body[: match.start()], body[match.end() :]
    if len(first.split()) < 2 or len(second.split()) < 2 or not _has_content(second):
        return None
    return f"{first}. {_capitalize_first(second)}"


def restructure_sentences(report: str, rng: RandomLike = None) -> str | None:
    """One seeded sentence (or pair of sentences) rebuilt without changing its meaning.

    "There is a small left pleural effusion." <-> "A small left pleural effusion is present.",
    "No evidence of pneumothorax." -> "No pneumothorax is seen.", "No pneumothorax." -> "There is no pneumothorax.",
    "No A or B." -> "No B or A.", "Lungs are clear; no effusion." -> "Lungs are clear. No effusion.", and two
    short sentences merged: "No pneumothorax. No effusion." -> "No pneumothorax or effusion.".
    """
    report, rng = _check_report(report), _as_rng(rng)
    candidates = []  # (start, end, replacement)
    bodies = _bodies(report)
    for _, body_start, body_end, _ in bodies:
        body = report[body_start:body_end]
        for rewrite in (
            _restructure_there_is(body),
            _restructure_present(body, rng),
            _restructure_no(body, rng),
            _restructure_order(body),
            _restructure_split(body),
        ):
            if rewrite is not None and _normalized(rewrite) != _normalized(body):
                rewrite = _match_case(body, rewrite) if body[:1].isupper() else rewrite
                candidates.append((body_start, body_end, rewrite))
    # Merges of two short neighbouring sentences that both end in a period and have no list marker.
    for (start, body_start, body_end, end), (next_start, next_body_start, next_body_end, next_end) in zip(
        bodies, bodies[1:], strict=False
    ):
        first, second = report[body_start:body_end], report[next_body_start:next_body_end]
        if (
            start != body_start
            or next_start != next_body_start
            or report[body_end:end] != "."
            or report[next_body_end:next_end] != "."
            or len(first.split()) > 8
            or len(second.split()) > 8
            or not (_has_content(first) and _has_content(second))
        ):
            continue
        first_no, second_no = _NO_SENTENCE.match(first), _NO_SENTENCE.match(second)
        if (
            first_no
            and second_no
            and not re.search(rf"\b(?:or|and|{_PARTICIPLE})\b|,", first + " " + second, re.IGNORECASE)
        ):
            merged = f"{first} or {_lower_first(second_no.group('np'))}"
        else:
            # ", and" joins two clauses; telegraphic fragments ("Cardiomegaly.") only take ";".
            clauses = all(re.search(r"\b(?:is|are|was|were|appears?)\b", text, re.I) for text in (first, second))
            merged = f"{first}{rng.choice(('; ', ', and ')) if clauses else '; '}{_lower_first(second)}"
        candidates.append((body_start, next_body_end, merged))
    if not candidates:
        return None
    start, end, replacement = rng.choice(candidates)
    return _changed(report, _apply(report, start, end, replacement))


# ---------------------------------------------------------------------------------------------
# Negative: heldout_laterality
# ---------------------------------------------------------------------------------------------

_SIDED = re.compile(r"\b(?P<side>right|left)(?P<sep>[\s-])sided\b", re.IGNORECASE)
_ON_THE_SIDE = re.compile(r"\bon\s+the\s+(?P<side>right|left)\b(?!\s+(?:side\s+)?of\b)", re.IGNORECASE)
_HEMITHORAX = re.compile(r"\b(?P<side>right|left)\s+hemithorax\b", re.IGNORECASE)
_BILATERAL = re.compile(r"\bbilateral\b", re.IGNORECASE)
_BILATERALLY = re.compile(r"\bbilaterally\b", re.IGNORECASE)
_BI_REGION = re.compile(r"\b(?:bibasilar|bibasal|biapical)\b", re.IGNORECASE)
_SIDE_WORD = re.compile(r"\b(?:right|left)\b", re.IGNORECASE)
_NORMAL_WORDS = re.compile(r"\b(?:clear|normal|unremarkable|expanded|inflated|intact|symmetric\w*)\b", re.I)
_NOUN_PHRASE_END = re.compile(r"[,;.:]|\b(?:with|and|or|which|that|but|are|is)\b", re.IGNORECASE)
_UNILATERAL_FORMS = ("right-sided", "left-sided", "unilateral right", "unilateral left")
# Plurals that become singular when a bilateral finding is moved to one side.
_ONE_SIDE_SINGULAR = {
    "effusions": "effusion", "pneumothoraces": "pneumothorax", "hemidiaphragms": "hemidiaphragm", "apices": "apex",
    "bases": "base", "hila": "hilum", "lungs": "lung", "angles": "angle", "sulci": "sulcus", "shadows": "shadow",
    "implants": "implant", "mastectomies": "mastectomy", "lobes": "lobe", "hemithoraces": "hemithorax",
    "breasts": "breast", "clavicles": "clavicle", "shoulders": "shoulder",
}  # fmt: skip


def _other_side(word: str) -> str:
    return _match_case(word, "left" if word.lower() == "right" else "right")


def _one_sided(report: str, match: re.Match, replacement: str, spans) -> tuple[int, int, str] | None:
    """The edit for "bilateral X" -> "<one side> X", singularizing X and its verb; None if unsafe."""
    sentence_start = _sentence_start(spans, match.start())
    after = report[match.end() :]
    clause_end = re.search(r"[,;.:]|\b(?:with|and|or|which|that|but)\b", after)
    noun_phrase = after[: clause_end.start()] if clause_end else after
    words = list(re.finditer(r"[A-Za-z]+", noun_phrase))[:5]
    plural = next((word for word in words if word.group(0).lower() in _ONE_SIDE_SINGULAR), None)
    if plural is None:
        return match.start(), match.end(), replacement
    end = match.end() + plural.end()
    text = (
        replacement
        + after[: plural.start()]
        + _match_case(plural.group(0), _ONE_SIDE_SINGULAR[plural.group(0).lower()])
    )
    verb = re.match(r"\s+(are|were|have)\b", report[end:], re.IGNORECASE)
    if verb:
        text += report[end : end + verb.start(1)] + _match_case(
            verb.group(1), {"are": "is", "were": "was", "have": "has"}[verb.group(1).lower()]
        )
        end += verb.end()
    start = match.start()
    before = report[sentence_start : match.start()]
    there = re.search(r"\bthere\s+(are|were)\s+(?P<modifiers>(?:[a-z-]+\s+){0,4})$", before, re.IGNORECASE)
    if there:
        if re.search(r"\b(?:and|or)\b", there.group("modifiers")):
            return None
        verb_word = {"are": "is", "were": "was"}[there.group(1).lower()]
        modifiers = there.group("modifiers")
        start = sentence_start + there.start(1)
        lead = f"{_indefinite_article(modifiers or text)} " if not _DETERMINER.match(modifiers) else ""
        text = f"{_match_case(there.group(1), verb_word)} {lead}{modifiers}{text}"
    elif re.search(r"\b(?:are|were)\s+(?:[a-z-]+\s+){0,3}$", before, re.IGNORECASE):
        return None  # "There are small bilateral effusions" handled above; other plural verbs are unsafe
    return start, end, text


def heldout_laterality(report: str, rng: RandomLike = None) -> str | None:
    """One asserted side expression changed; the rest of the report keeps its sides.

    "Small right-sided pleural effusion." -> "Small left-sided pleural effusion.",
    "Small bilateral pleural effusions." -> "Small left-sided pleural effusion.",
    "Bibasilar atelectasis." -> "Right basilar atelectasis.", "on the right" -> "on the left".
    Sentences that already name the other side ("right greater than left") are left alone.
    """
    report, rng = _check_report(report), _as_rng(rng)
    spans = _spans(report)
    candidates = []  # (start, end, replacement)
    for pattern in (_SIDED, _ON_THE_SIDE, _HEMITHORAX):
        for match in _asserted(report, pattern):
            sentence = _sentence_of(report, spans, match.start())
            other = _other_side(match.group("side"))
            if re.search(rf"\b{other}\b", sentence, re.IGNORECASE):
                continue
            side_start, side_end = match.span("side")
            candidates.append((side_start, side_end, other))
    for match in _asserted(report, _BILATERAL):
        if _SIDE_WORD.search(_sentence_of(report, spans, match.start())):
            continue
        noun_phrase = _NOUN_PHRASE_END.split(report[match.end() :], maxsplit=1)[0]
        if not _FINDING.search(noun_phrase):
            continue  # "The bilateral apices are excluded" describes no finding
        if re.search(r"\b(?:two|2|both|several|multiple)\s+(?:\S+\s+){0,2}$", report[: match.start()], re.I):
            continue  # "Two bilateral effusions" cannot become one-sided
        edit = _one_sided(report, match, _match_case(match.group(0), rng.choice(_UNILATERAL_FORMS)), spans)
        if edit is not None:
            candidates.append(edit)
    for match in _asserted(report, _BILATERALLY):
        sentence = _sentence_of(report, spans, match.start())
        if _SIDE_WORD.search(sentence) or _NORMAL_WORDS.search(sentence):
            continue
        candidates.append((match.start(), match.end(), f"on the {rng.choice(('right', 'left'))}"))
    for match in _asserted(report, _BI_REGION):
        if _SIDE_WORD.search(_sentence_of(report, spans, match.start())):
            continue
        region = "apical" if match.group(0).lower() == "biapical" else "basilar"
        candidates.append(
            (match.start(), match.end(), _match_case(match.group(0), f"{rng.choice(('right', 'left'))} {region}"))
        )
    if not candidates:
        return None
    start, end, replacement = rng.choice(candidates)
    return _changed(report, _splice(report, start, end, replacement))


# ---------------------------------------------------------------------------------------------
# Negative: heldout_negation
# ---------------------------------------------------------------------------------------------

# A list item ends at a comma or "or"/"nor" (", and no", "and no" too); a leading "no" of the next item goes.
_LIST_SEPARATOR = re.compile(
    r"\s*,\s*(?:(?:and|or|nor)\s+)?(?:no\s+)?|\s+(?:or|nor)\s+(?:no\s+)?|\s+and\s+no\s+", re.I
)
_CLAUSE_VERB = re.compile(r"\b(?:is|are|was|were|has|have|had|appears?|may|could|which|that)\b", re.IGNORECASE)
_NEGATION_SCOPE_END = re.compile(r";|\b(?:but|however|although|though|otherwise|except|whereas)\b", re.IGNORECASE)
_EXCLUDED_SUBJECTS = re.compile(r"^(?:change|changes|interval|significant|comparison|prior|previous|xxxx)\b", re.I)


def _split_first(scope: str) -> tuple[str, str, str] | None:
    """(first item, rest of the list, text kept verbatim) of a negated list; None when the first item is unsafe.

    "pleural effusion, pneumothorax, or consolidation" -> ("pleural effusion", "pneumothorax or consolidation", "").
    """
    separator = _LIST_SEPARATOR.search(scope)
    if separator is None:
        first, rest, tail = scope, "", ""
    else:
        first, rest, tail = scope[: separator.start()], scope[separator.end() :], ""
        if separator.group(0).lstrip().startswith(",") and _CLAUSE_VERB.search(rest):
            first, rest, tail = scope[: separator.start()], "", scope[separator.start() :]  # ", the heart is normal"
        elif rest.count(",") == 1:
            rest = re.sub(r"\s*,\s+(or|nor|and)\s+", r" \1 ", rest)
    words = first.split()
    if not words or not _has_content(first) or _ADJECTIVE_END.search(words[-1]) or _EXCLUDED_SUBJECTS.match(first):
        return None
    if rest and not _has_content(rest):
        return None
    return first, rest, tail


def _scope_end(body: str, position: int) -> int:
    end = _NEGATION_SCOPE_END.search(body, position)
    return end.start() if end else len(body)


def _whole_no_sentence(body: str) -> str | None:
    """The whole "No A, B or C [is seen]" sentence affirmed: "An A is seen, but no B or C".

    "No evidence of A" becomes "There is evidence of A".
    """
    whole = _WHOLE_NO_SENTENCE.match(body)
    if not whole or _NOT_PLAIN.search(whole.group("list")):
        return None
    parts = _split_first(whole.group("list"))
    if parts is None or parts[2]:
        return None
    first, rest, _ = parts
    if whole.group("evidence"):
        text = f"There is evidence of {first}"
    else:
        verb = "are" if _is_plural(_head(first)) else "is"
        participle = (whole.group("participle") or "present").lower()
        text = f"{_capitalize_first(_with_article(first))} {verb} {participle}"
    return text + (f", but no {rest}" if rest else "")


def _affirmed_cue(cue: re.Match, first: str) -> tuple[str, str]:
    """(the cue and first item affirmed, the cue that keeps the rest of the list negated)."""
    kind = cue.lastgroup
    if kind == "there":
        there = cue.group("there_verb")
        evidence = "evidence of " if cue.group("there_evidence") else ""
        singular = there.lower() in ("is", "was")
        noun_phrase = _with_article(first) if singular and not evidence else first
        return f"{cue.group(0).split()[0]} {there} {evidence}{noun_phrase}", "no"
    if kind == "negative_for":
        return f"{_match_case(cue.group(0), 'positive for')} {first}", "negative for"
    if kind == "absence":
        return f"{_match_case(cue.group(0), 'presence of')} {first}", "no"
    # "without X" -> "with X"; "is without X", "are free of X", "are clear of X" -> "shows X", "show X"
    evidence = "evidence of " if cue.group(f"{kind}_evidence") else ""
    verb = cue.group(f"{kind}_verb")
    if verb:
        shows = {"is": "shows", "are": "show", "was": "showed", "were": "showed"}[verb.lower()]
        return f"{_match_case(verb, shows)} {evidence}{first}", "no"
    return f"{_match_case(cue.group(0), 'with')} {evidence}{first}", "without" if kind == "without" else "no"


def _negation_edits(report: str) -> list[tuple[int, int, str]]:
    """Every single presence/absence flip of the report, as (start, end, replacement) edits."""
    edits = []
    spans = _spans(report)
    # Absent -> present: the negation cue itself is rewritten, so its scope is the edit.
    for _, body_start, body_end, _ in _bodies(report):
        body = report[body_start:body_end]
        whole = _whole_no_sentence(body)
        if whole is not None:
            edits.append((body_start, body_end, whole))
        for cue in _INNER_NEGATION_CUES.finditer(body):
            if cue.start() > 0 and _is_negated(body, 0, cue.start()):
                continue  # a second cue in a negated clause ("no X without Y")
            scope_end = _scope_end(body, cue.end())
            parts = _split_first(body[cue.end() : scope_end])
            if parts is None:
                continue
            first, rest, tail = parts
            affirmed, rest_cue = _affirmed_cue(cue, first)
            replacement = affirmed + (f", but {rest_cue} {rest}" if rest else "") + tail
            edits.append((body_start + cue.start(), body_start + scope_end, replacement))
        for match in _ABSENT_PREDICATE.finditer(body):
            edits.append((body_start + match.start(), body_start + match.end(), f"{match.group(1)} present"))
    # Present -> absent: only asserted mentions.
    for match in _asserted(report, _PRESENT_PREDICATE):
        edits.append((match.start(), match.end(), f"{match.group(1)} absent"))
    for match in _asserted(report, _POSITIVE_FOR):
        edits.append((match.start(), match.end(), _match_case(match.group(0), "negative for")))
    for match in _asserted(report, _RESOLVED):
        edits.append((match.start(), match.end(), "persist" if match.group(1).lower() == "have" else "persists"))
    for match in _asserted(report, _PERSISTS):
        if re.search(
            r"\b(?:if|symptoms?|concerns?|complaints?|pain)\b", _sentence_of(report, spans, match.start()), re.I
        ):
            continue  # "If symptoms persist, ..." is advice, not a finding
        edits.append(
            (match.start(), match.end(), "has resolved" if match.group(0).lower().endswith("s") else "have resolved")
        )
    for match in _asserted(report, _WITH_FINDING):
        edits.append((match.start(), match.end(), _match_case(match.group(0), "without")))
    return edits


_WHOLE_NO_SENTENCE = re.compile(
    rf"^no\s+(?!longer\b)(?P<evidence>evidence\s+of\s+)?(?:any\s+)?(?P<list>.+?)"
    rf"(?:\s+(?:(?:is|are)\s+)?(?P<participle>{_PARTICIPLE}))?$",
    re.IGNORECASE,
)
_INNER_NEGATION_CUES = re.compile(
    r"\b(?:(?P<there>there\s+(?P<there_verb>is|are|was|were)\s+no\s+(?P<there_evidence>evidence\s+of\s+)?(?:any\s+)?)"
    r"|(?P<negative_for>negative\s+for\s+(?:any\s+)?)"
    r"|(?P<without>(?:(?P<without_verb>is|are|was|were)\s+)?without\s+(?P<without_evidence>evidence\s+of\s+)?"
    r"(?:any\s+)?)"
    r"|(?P<free_of>(?:(?P<free_of_verb>is|are|was|were)\s+)?(?:free|clear)\s+of\s+(?P<free_of_evidence>evidence\s+of"
    r"\s+)?(?:any\s+)?)"
    r"|(?P<absence>absence\s+of\s+(?:any\s+)?))(?=\w)",
    re.IGNORECASE,
)
_PRESENT_PREDICATE = re.compile(r"\b(is|are)\s+present\b", re.IGNORECASE)
_ABSENT_PREDICATE = re.compile(r"\b(is|are)\s+absent\b", re.IGNORECASE)
_POSITIVE_FOR = re.compile(r"\bpositive\s+for\b", re.IGNORECASE)
_RESOLVED = re.compile(r"\b(has|have)\s+(?:since\s+|now\s+)?resolved\b", re.IGNORECASE)
_PERSISTS = re.compile(r"(?<!\bto\s)\bpersists?\b", re.IGNORECASE)
# "with" + a finding within four words ("cardiomegaly with pulmonary vascular congestion"), but not
# "consistent with", "compared with", "with no", "discussed with" and the like.
_WITH_FINDING = re.compile(
    rf"(?<!consistent\s)(?<!compatible\s)(?<!compared\s)(?<!associated\s)(?<!along\s)(?<!discussed\s)"
    rf"(?<!keeping\s)(?<!correlation\s)(?<!communicated\s)(?<!patient\s)\bwith\b"
    rf"(?!\s+(?:no|a\s+history|history|its|the\s+tip|tip)\b)(?=\s+(?:[a-z-]+\s+){{0,3}}(?:{_FINDINGS})\b)",
    re.IGNORECASE,
)


def heldout_negation(report: str, rng: RandomLike = None) -> str | None:
    """One presence/absence statement flipped with cues other than training's "No X." <-> "X.".

    "There is no pleural effusion or pneumothorax." -> "There is a pleural effusion, but no pneumothorax.",
    "No acute cardiopulmonary abnormality." -> "An acute cardiopulmonary abnormality is present.",
    "The lungs are free of focal airspace disease." -> "The lungs show focal airspace disease.",
    "Calcified granuloma is present." -> "Calcified granuloma is absent.",
    "Cardiomegaly with pulmonary vascular congestion." -> "Cardiomegaly without pulmonary vascular congestion.".
    """
    report, rng = _check_report(report), _as_rng(rng)
    edits = [
        edit for edit in _negation_edits(report) if _normalized(report[edit[0] : edit[1]]) != _normalized(edit[2])
    ]
    if not edits:
        return None
    start, end, replacement = rng.choice(edits)
    return _changed(report, _apply(report, start, end, replacement))


# ---------------------------------------------------------------------------------------------
# Negative: heldout_severity
# ---------------------------------------------------------------------------------------------

# No (word, replacement) pair here, in either direction, is a pair of training's SEVERITY_SWAPS.
HELDOUT_SEVERITY_SWAPS: dict[str, tuple[str, ...]] = {
    "mild": ("marked", "pronounced"), "mildly": ("significantly", "grossly"),
    "marked": ("mild",), "markedly": ("subtly",),
    "small": ("sizable", "substantial"), "tiny": ("sizable",), "trace": ("moderate",),
    "large": ("minimal", "subtle"), "massive": ("mild", "trace"), "sizable": ("tiny",), "substantial": ("minimal",),
    "moderate": ("slight",), "moderately": ("slightly",),
    "severe": ("slight", "minimal"), "severely": ("slightly",),
    "minimal": ("severe", "advanced"), "minimally": ("severely",),
    "extensive": ("subtle", "limited"), "subtle": ("extensive", "prominent"),
    "slight": ("severe", "pronounced"), "slightly": ("severely",),
    "advanced": ("mild",), "pronounced": ("subtle",),
    "focal": ("diffuse",), "diffuse": ("focal",),
}  # fmt: skip
# Not in a range ("mild to moderate", "small-to-moderate") or a compound ("moderate-sized", "small bowel"),
# and adjectives only before a word: "The heart is large." or "more marked on the right" has no grade to change.
_ADVERBS = "|".join(word for word in HELDOUT_SEVERITY_SWAPS if word.endswith("ly"))
_ADJECTIVES = "|".join(word for word in HELDOUT_SEVERITY_SWAPS if not word.endswith("ly"))
_HELDOUT_SEVERITY = re.compile(
    rf"(?<![\w-])(?<!to\s)(?<!more\s)(?<!less\s)(?<!most\s)(?:(?:{_ADVERBS})|(?:{_ADJECTIVES})(?=\s+[\w(]))"
    rf"(?![\w-])(?!\s*-?\s*to\b)(?![\s-]+sized?\b)(?!\s+(?:bowel|intestin\w*|cell|airways?|bore)\b)",
    re.IGNORECASE,
)
_NUMBER = r"\d+(?:\.\d+)?"
_SIZE = re.compile(
    rf"\b(?P<numbers>{_NUMBER}(?:\s*(?:x|by|×)\s*{_NUMBER})*)\s*(?P<unit>cm|mm|centimeters?|millimeters?)\b",
    re.IGNORECASE,
)
_SIZE_FACTOR = 4.0
_LARGE_SIZE_MM = 25.0  # at or above 2.5 cm sizes are divided by 4, below it multiplied


def _resize(match: re.Match) -> str:
    """The measurement x4 (/4 from 2.5 cm): "4 mm" -> "1.6 cm", "1.5 cm" -> "6 cm", "3 x 4 cm" -> "0.8 x 1 cm"."""
    unit = match.group("unit").lower()
    to_mm = 10.0 if unit.startswith("c") else 1.0
    values = [float(number) * to_mm for number in re.findall(_NUMBER, match.group("numbers"))]
    factor = _SIZE_FACTOR if max(values) < _LARGE_SIZE_MM else 1 / _SIZE_FACTOR
    values = [value * factor for value in values]
    in_cm = max(values) >= 10.0

    def show(value: float) -> str:
        value = value / 10.0 if in_cm else value
        text = f"{value:.1f}"
        return text[:-2] if text.endswith(".0") else text

    numbers = re.sub(_NUMBER, lambda _: "\0", match.group("numbers"))
    for value in values:
        numbers = numbers.replace("\0", show(value), 1)
    spelled = len(unit) > 2
    new_unit = ("centimeter" if in_cm else "millimeter") + ("s" if spelled and show(values[-1]) != "1" else "")
    return f"{numbers} {new_unit if spelled else ('cm' if in_cm else 'mm')}"


def heldout_severity(report: str, rng: RandomLike = None) -> str | None:
    """One asserted severity word from `HELDOUT_SEVERITY_SWAPS` or one measurement rescaled x4 (/4 when large).

    "Mild cardiomegaly." -> "Marked cardiomegaly.", "A 4 mm nodule" -> "A 1.6 cm nodule".
    """
    report, rng = _check_report(report), _as_rng(rng)
    candidates = [(m, "word") for m in _asserted(report, _HELDOUT_SEVERITY)]
    candidates += [(m, "size") for m in _asserted(report, _SIZE)]
    if not candidates:
        return None
    match, kind = rng.choice(candidates)
    if kind == "word":
        replacement = _match_case(match.group(0), rng.choice(HELDOUT_SEVERITY_SWAPS[match.group(0).lower()]))
    else:
        replacement = _resize(match)
    return _changed(report, _splice(report, match.start(), match.end(), replacement))


# ---------------------------------------------------------------------------------------------
# Negative: heldout_change
# ---------------------------------------------------------------------------------------------

# Change-over-time expressions; no (phrase, replacement) pair here is a pair of training's CHANGE_STATUS_SWAPS.
HELDOUT_CHANGE_SWAPS: dict[str, tuple[str, ...]] = {
    "stable": ("new",), "unchanged": ("new",), "persistent": ("new",),
    "persistently": ("newly",), "new": ("unchanged", "previously seen"), "newly": ("again",),
    "again": ("newly",), "redemonstrated": ("newly seen",),
    "chronic": ("acute",), "old": ("acute",), "healed": ("acute",), "remote": ("acute",),
    "old healed": ("acute",), "old granulomatous": ("active granulomatous",),
    "improving": ("progressing",), "progressing": ("improving",),
    "worsening": ("stable",), "worsened": ("unchanged",),
    "resolved": ("persistent",), "resolution of": ("persistence of",), "no longer": ("still",),
    "interval increase": ("no interval change",), "interval decrease": ("no interval change",),
    "interval enlargement": ("no interval change",), "interval development": ("interval resolution",),
    "interval resolution": ("interval development",), "interval removal": ("interval placement",),
    "interval placement": ("interval removal",), "interval improvement": ("interval progression",),
}  # fmt: skip
# The noun phrase after the word names a finding; "with", "and", "in" ... end the noun phrase.
_FINDING_NP_AFTER = (
    rf"(?=\s+(?:(?!(?:with|without|and|or|in|at|compared|since|from|to)\b)[\w-]+\s+){{0,4}}?(?:{_FINDINGS})\b)"
)
_CHANGE_RULES: tuple[tuple[str, re.Pattern], ...] = (
    # prenominal stable/unchanged/persistent/new: the noun phrase after it names a finding
    ("prenominal", re.compile(rf"\b(?:stable|unchanged|persistent|new)\b(?!\s+but\b){_FINDING_NP_AFTER}", re.I)),
    # "X is stable", "X appear unchanged": the subject names a finding (checked below)
    (
        "predicate",
        re.compile(
            r"\b(?:is|are|appears?)\s+(?:(?:grossly|essentially|overall)\s+)?"
            r"(?P<word>stable|unchanged|resolved|improving|progressing|worsening)\b",
            re.I,
        ),
    ),
    ("adverb", re.compile(r"\b(?:again|newly)\b(?=\s+(?:seen|noted|demonstrated|identified|visualized)\b)", re.I)),
    ("adverb", re.compile(r"\b(?:persistently)\b(?=\s+\w+)", re.I)),
    ("redemonstrated", re.compile(r"\bredemonstrated\b", re.I)),
    (
        "acuity",
        re.compile(
            r"\b(?:old\s+healed|old|healed|remote)\b(?=\s+(?:[\w-]+\s+){0,4}?(?:fractures?|deformit"
            r"(?:y|ies)|injur(?:y|ies))\b)",
            re.I,
        ),
    ),
    ("acuity", re.compile(r"\bold\s+granulomatous\b", re.I)),
    ("acuity", re.compile(r"\bchronic\b(?!\s+obstructive)(?=\s+[a-z])", re.I)),
    ("trend", re.compile(rf"\b(?:improving|progressing|worsening|worsened)\b{_FINDING_NP_AFTER}", re.I)),
    # "There is (a) significant interval decrease in" -> "There is no interval change in": modifiers go too.
    (
        "interval",
        re.compile(
            r"\b(?:(?:an?|significant|slight|mild|moderate|marked|some)\s+)*interval\s+(?P<word>"
            r"increase|decrease|enlargement)\b",
            re.I,
        ),
    ),
    ("interval", re.compile(r"\binterval\s+(?:development|resolution|removal|placement|improvement)\b", re.I)),
    ("resolution", re.compile(r"\bresolution\s+of\b", re.I)),
    (
        "no_longer",
        re.compile(r"\bno\s+longer\b(?=\s+(?:seen|visualized|identified|present|evident|demonstrated)\b)", re.I),
    ),
)
_ACUITY_WORDS = re.compile(r"\b(?:old|healed|healing|remote|chronic|acute)\b", re.IGNORECASE)
# "Recommend follow-up to document resolution of" is a plan, not a change that was seen.
_PLANNED = re.compile(r"\b(?:ensure|document|confirm|assess|evaluate|to|until)\s+(?:complete\s+)?$", re.IGNORECASE)


def heldout_change(report: str, rng: RandomLike = None) -> str | None:
    """One asserted change-over-time expression reversed with `HELDOUT_CHANGE_SWAPS`.

    "Stable calcified granuloma." -> "New calcified granuloma.", "again noted" -> "newly noted",
    "Old healed left rib fractures." -> "Acute left rib fractures.", "Interval removal of the chest tube." ->
    "Interval placement of the chest tube.". Stable normal anatomy ("The mediastinum is stable.") is left alone.
    """
    report, rng = _check_report(report), _as_rng(rng)
    spans = _spans(report)
    candidates = []  # (start, end, replacement)
    for kind, pattern in _CHANGE_RULES:
        for match in _asserted(report, pattern):
            start, end = match.span("word") if kind == "predicate" else match.span()
            word = _normalized(report[start:end]).lower()
            if kind == "interval" and match.groupdict().get("word"):
                word = f"interval {match.group('word').lower()}"
            if kind == "predicate":
                clause_start = _sentence_start(spans, match.start())
                subject = report[clause_start : match.start()]
                subject = re.split(r"[,;]|\b(?:and|but|with)\b", subject)[-1]
                if not _FINDING.search(subject) or (match.group("word").lower() == "resolved" and not subject.strip()):
                    continue
            if _PLANNED.search(report[max(0, start - 40) : start]):
                continue
            if kind == "acuity":
                sentence = _sentence_of(report, spans, start)
                others = _ACUITY_WORDS.findall(sentence.replace(report[start:end], "", 1))
                if others:
                    continue  # "Old rib fractures, healed." or "acute on chronic" would become incoherent
            targets = HELDOUT_CHANGE_SWAPS.get(word)
            if targets is None:
                continue
            replacement = _match_case(report[start:end], rng.choice(targets))
            following = re.match(r"\s+from\b", report[end:])
            if kind == "predicate" and following:  # "unchanged from prior" -> "new since prior"
                replacement, end = replacement + following.group(0)[:-4] + "since", end + following.end()
            candidates.append((start, end, replacement))
    if not candidates:
        return None
    start, end, replacement = rng.choice(candidates)
    return _changed(report, _splice(report, start, end, replacement))


# ---------------------------------------------------------------------------------------------
# Registries and builders
# ---------------------------------------------------------------------------------------------

HELDOUT_POSITIVE_FAMILIES: dict[str, Generator] = {
    "heldout_abbreviations": heldout_abbreviations,
    "synonym_rewording": synonym_rewording,
    "restructure_sentences": restructure_sentences,
}
HELDOUT_NEGATIVE_FAMILIES: dict[str, Generator] = {
    "heldout_laterality": heldout_laterality,
    "heldout_negation": heldout_negation,
    "heldout_severity": heldout_severity,
    "heldout_change": heldout_change,
}


def make_heldout_positive(report: str, rng: RandomLike = None, kinds=None) -> tuple[str, str] | None:
    """(variant, family) from the first held-out positive family, in seeded order, that changes the report."""
    return _first_variant(report, rng, HELDOUT_POSITIVE_FAMILIES, kinds, "kinds")


def make_heldout_negative(report: str, rng: RandomLike = None, kinds=None) -> tuple[str, str] | None:
    """(variant, family) from the first held-out negative family, in seeded order, that changes the report."""
    return _first_variant(report, rng, HELDOUT_NEGATIVE_FAMILIES, kinds, "kinds")


def build_heldout_triplets(
    reports: Iterable[str | Mapping[str, str]],
    seed: int = 0,
    *,
    positive_kinds=None,
    negative_kinds=None,
) -> list[dict]:
    """Evaluation triplets {"anchor", "positive", "negative", "positive_kind", "negative_kind"}.

    For evaluation only; never train on them. Each report (a string or a row with findings/impression)
    draws from `random.Random(f"{seed}:{index}")` and gives one triplet when both a held-out positive and a
    held-out negative can be made and all three texts differ (after whitespace normalisation).
    """
    _select(HELDOUT_POSITIVE_FAMILIES, positive_kinds, "positive_kinds")
    _select(HELDOUT_NEGATIVE_FAMILIES, negative_kinds, "negative_kinds")
    triplets = (report_triplet(text, rng, make_heldout_positive, make_heldout_negative, positive_kinds, negative_kinds)
                for text, _, _, rng in seeded_reports(reports, seed))
    return [triplet for triplet in triplets if triplet is not None]


__all__ = [
    "HELDOUT_ABBREVIATIONS",
    "HELDOUT_CHANGE_SWAPS",
    "HELDOUT_NEGATIVE_FAMILIES",
    "HELDOUT_POSITIVE_FAMILIES",
    "HELDOUT_SEVERITY_SWAPS",
    "SYNONYM_LEXICON",
    "build_heldout_triplets",
    "heldout_abbreviations",
    "heldout_change",
    "heldout_laterality",
    "heldout_negation",
    "heldout_severity",
    "make_heldout_negative",
    "make_heldout_positive",
    "restructure_sentences",
    "synonym_rewording",
]
