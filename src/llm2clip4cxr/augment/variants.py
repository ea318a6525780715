"""Rule-based report variants for supervised contrastive training data.

A training triplet is `(anchor, positive, negative)`: the positive says the same thing clinically,
the hard negative looks almost the same but is clinically wrong. Every generator takes a report
string (and a seeded `random.Random` or an int seed; the deterministic ones ignore it) and returns
the variant, or `None` when it cannot change the text; a variant equal to its input is never returned.

Positive kinds (same clinical content):
    expand_abbreviations   "PTX" -> "pneumothorax", from `resources/abbreviations.tsv`.
    contract_abbreviations "pneumothorax" -> "PTX", the reverse (first abbreviation listed wins).
    shuffle_sentences      the same sentences in another order.
    drop_boilerplate       drops non-clinical sentences; the list is `BOILERPLATE_RULES`.
    typo_words             one or two words misspelt by a keyboard slip ("effusion" -> "effsuion"); never a
                           negation, side, severity or change word.
    findings_impression    (`triplets.build_triplets` only) the findings section paired with the impression.

Hard-negative kinds (one clinically wrong edit):
    swap_laterality        left <-> right in the whole report (RLL <-> LLL, RUL <-> LUL, levo <-> dextro);
                           "right middle lobe"/RML and "lingula" have no mirror image and stay.
    flip_negation          one sentence: "No pneumothorax." <-> "Pneumothorax.",
                           "Small right pleural effusion." -> "No right pleural effusion.".
    change_severity        one asserted severity word: small <-> large, mild <-> severe, minimal -> extensive ...
    change_size            one asserted measurement: x3 (or /3 when already large): "1.5 cm" -> "4.5 cm".
    swap_change_status     one asserted change word: improved <-> worsened, increased <-> decreased ...
    substitute_finding     one asserted finding replaced by another: effusion -> pneumothorax ...

Hard negatives edit only asserted text: editing a negated mention ("No large effusion" -> "No small
effusion") gives a report that is different but not wrong, so negated scopes are skipped.
`stable`/`unchanged` are deliberately not swapped: they assert no change, their opposite has no
single word (worse or better?), and they often qualify normal anatomy ("heart size normal and
stable"), where a swap makes an incoherent rather than a wrong report.
"""

from __future__ import annotations

import functools
import importlib.resources
import random
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

RandomLike = random.Random | int | None
Generator = Callable[[str, random.Random], str | None]

# ---------------------------------------------------------------------------------------------
# Helpers: seeds, case, sentences, negation scope
# ---------------------------------------------------------------------------------------------


def _as_rng(rng: RandomLike) -> random.Random:
    if rng is None:
        return random.Random(0)
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"`rng` must be a random.Random, an int seed or None, got {type(rng).__name__}.")


def _check_report(report) -> str:
    if not isinstance(report, str):
        raise TypeError(f"`report` must be a str, got {type(report).__name__}.")
    return report


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _changed(report: str, variant: str | None) -> str | None:
    """The variant, or None when it only differs from the report in whitespace."""
    if variant is None or _normalized(variant) == _normalized(report) or not variant.strip():
        return None
    return variant


def _match_case(source: str, replacement: str) -> str:
    """`replacement` written in the case of `source` (UPPER, Capitalized or as given)."""
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _lower_first(text: str) -> str:
    # Acronyms and XXXX placeholders keep their case ("No CHF", "No XXXX").
    first_word = text.split(" ", 1)[0]
    if len(first_word) > 1 and first_word.isupper():
        return text
    return text[:1].lower() + text[1:]


# Titles never end a sentence ("Dr. XXXX"); abbreviated words only do before a capital ("opacities
# bilat. No effusion" but "bilat. lower lobes"). "e.g." is caught by its inner period.
_TITLES = frozenset({"dr", "drs", "mr", "mrs", "ms", "prof", "st"})
_ABBREVIATED_WORDS = frozenset({"bilat", "approx", "vs", "cf", "fig", "incl", "resp", "pt"})
_LIST_MARKER = re.compile(r"\(?\d{1,2}[.)]")
_LIST_MARKER_PREFIX = re.compile(r"^\(?\d{1,2}[.)]\s+")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence; sentences keep their final punctuation, not the spaces after."""
    boundaries = []
    for match in re.finditer(r"[.!?]+", text):
        end = match.end()
        following = text[end : end + 1]
        word_before = re.search(r"[\w.]*$", text[: match.start()]).group(0)
        if following and not following.isspace():
            # "apex.There are": a missing space after a word, not a decimal ("1.5") or "e.g".
            if re.fullmatch(r"[A-Za-z]*[a-z]{2}", word_before) and re.match(r"[A-Z][a-z]", text[end : end + 2]):
                boundaries.append(end)
            continue
        bare_word = word_before.lower().rstrip(".")
        initialism = re.fullmatch(r"(?:[a-z]\.)+[a-z]", bare_word)  # "e.g", "i.e"
        next_word = text[end:].lstrip()[:1]
        if (
            bare_word in _TITLES
            or initialism
            or (len(bare_word) == 1 and bare_word.isalpha())  # initials
            or (bare_word in _ABBREVIATED_WORDS and not next_word.isupper())
        ):
            continue
        boundaries.append(end)
    spans, start = [], 0
    for end in [*boundaries, len(text)]:
        chunk = text[start:end]
        if chunk.strip():
            lead = len(chunk) - len(chunk.lstrip())
            spans.append((start + lead, start + len(chunk.rstrip())))
        start = end
    # "1. Bullous emphysema." is one sentence: a bare list marker joins the sentence after it.
    merged: list[tuple[int, int]] = []
    for span in spans:
        if merged and _LIST_MARKER.fullmatch(text[merged[-1][0] : merged[-1][1]]):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    return merged


def split_sentences(text: str) -> list[str]:
    """Sentences of a report; respects "e.g.", "Dr.", decimals ("1.5 cm") and "1." list markers."""
    return [text[start:end] for start, end in _sentence_spans(_check_report(text))]


def _sentence_start(spans: list[tuple[int, int]], position: int) -> int:
    start = 0
    for span_start, _ in spans:
        if span_start > position:
            break
        start = span_start
    return start


_NEGATION_CUE = re.compile(
    r"\b(?:no|not|without|negative for|free of|nor|absence of|absent|never|cannot|neither)\b", re.IGNORECASE
)
_CLAUSE_BREAK = re.compile(r";|\b(?:but|however|although|though|otherwise|except|whereas)\b", re.IGNORECASE)


def _is_negated(text: str, sentence_start: int, position: int) -> bool:
    """Whether `position` lies in the scope of a negation cue earlier in its clause."""
    prefix = text[sentence_start:position]
    breaks = list(_CLAUSE_BREAK.finditer(prefix))
    if breaks:
        prefix = prefix[breaks[-1].end() :]
    return _NEGATION_CUE.search(prefix) is not None


def _asserted_matches(report: str, pattern: re.Pattern) -> list[re.Match]:
    """Matches of `pattern` that are not in a negated scope ("No large effusion" is skipped)."""
    spans = _sentence_spans(report)
    return [
        match
        for match in pattern.finditer(report)
        if not _is_negated(report, _sentence_start(spans, match.start()), match.start())
    ]


def _word_pattern(words: Iterable[str], flags: int = re.IGNORECASE) -> re.Pattern:
    alternatives = "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b(?:{alternatives})\b", flags)


# ---------------------------------------------------------------------------------------------
# Abbreviations (positives)
# ---------------------------------------------------------------------------------------------

_ABBREVIATION_RESOURCE = "resources/abbreviations.tsv"


def load_abbreviations(path=None) -> list[tuple[str, str]]:
    """(abbreviation, expansion) rows of a two-column TSV; defaults to the packaged table.

    Lines starting with '#', blank lines and an `abbreviation<TAB>expansion` header are skipped.
    """
    if path is None:
        text = importlib.resources.files("llm2clip4cxr").joinpath(_ABBREVIATION_RESOURCE).read_text("utf-8")
        source = f"llm2clip4cxr/{_ABBREVIATION_RESOURCE}"
    else:
        text, source = Path(path).read_text(encoding="utf-8"), str(path)
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(field.strip() for field in fields):
            raise ValueError(
                f"{source}, line {line_number}: expected 'abbreviation<TAB>expansion', got {line!r}."
            )
        abbreviation, expansion = (field.strip() for field in fields)
        if (abbreviation, expansion) != ("abbreviation", "expansion"):
            rows.append((abbreviation, expansion))
    return rows


def _rows(table) -> tuple[tuple[str, str], ...]:
    if table is None:
        return _default_table()
    rows = tuple(tuple(row) for row in table)
    bad = [row for row in rows if len(row) != 2 or not all(isinstance(field, str) and field for field in row)]
    if bad or not rows:
        raise ValueError(
            f"`table` must be non-empty (abbreviation, expansion) string pairs, got {bad[:3] if bad else rows!r}."
        )
    return rows


@functools.lru_cache(maxsize=8)
def _abbreviation_patterns(table: tuple[tuple[str, str], ...]):
    expansions, contractions = {}, {}
    for abbreviation, expansion in table:
        expansions.setdefault(abbreviation.lower(), expansion)
        contractions.setdefault(expansion.lower(), abbreviation)

    def alternation(terms: Iterable[str]) -> str:
        return "|".join(re.escape(term) for term in sorted(terms, key=len, reverse=True))

    # All-caps abbreviations match case-sensitively ("AP" never matches "ap"); others in any case.
    exact = [abbreviation for abbreviation, _ in table if not any(ch.islower() for ch in abbreviation)]
    caseless = [abbreviation for abbreviation, _ in table if any(ch.islower() for ch in abbreviation)]
    parts = [alternation(exact)] if exact else []
    if caseless:
        parts.append(f"(?i:{alternation(caseless)})")
    # Hyphens are word characters here so "x-XXXX" or "PICC-line" parts are not split off.
    expand = re.compile(rf"(?<![\w-])(?:{'|'.join(parts)})(?![\w-])")
    contract = re.compile(rf"(?<![\w-])(?:{alternation(contractions)})(?![\w-])", re.IGNORECASE)
    return expand, expansions, contract, contractions


@functools.lru_cache(maxsize=1)
def _default_table() -> tuple[tuple[str, str], ...]:
    return tuple(load_abbreviations())


def _is_shouting(sentence: str, known: Mapping[str, str]) -> bool:
    words = [w for w in re.findall(r"[A-Za-z]{2,}", sentence) if w != "XXXX" and w.lower() not in known]
    return len(words) >= 2 and all(word.isupper() for word in words)


def _at_sentence_start(report: str, spans: list[tuple[int, int]], position: int) -> bool:
    start = _sentence_start(spans, position)
    return _LIST_MARKER_PREFIX.sub("", report[start:position]).strip() == ""


def expand_abbreviations(report: str, rng: RandomLike = None, *, table=None) -> str | None:
    """Every abbreviation of the table written out ("Right PTX." -> "Right pneumothorax.")."""
    report = _check_report(report)
    pattern, expansions, _, _ = _abbreviation_patterns(_rows(table))
    spans = _sentence_spans(report)

    def replace(match: re.Match) -> str:
        abbreviation, expansion = match.group(0), expansions[match.group(0).lower()]
        sentence_start = _sentence_start(spans, match.start())
        sentence_end = next((end for start, end in spans if start == sentence_start), len(report))
        if _is_shouting(report[sentence_start:sentence_end], expansions):
            expansion = expansion.upper()
        elif _at_sentence_start(report, spans, match.start()):
            expansion = _capitalize_first(expansion)
        # "... opacities bilat. No effusion": the abbreviation's period also ended the sentence.
        rest = report[match.end() :].lstrip()
        if abbreviation.endswith(".") and (not rest or rest[:1].isupper()):
            expansion += "."
        return expansion

    return _changed(report, pattern.sub(replace, report))


def contract_abbreviations(report: str, rng: RandomLike = None, *, table=None) -> str | None:
    """Every expansion of the table abbreviated ("Right pneumothorax." -> "Right PTX.")."""
    report = _check_report(report)
    _, _, pattern, contractions = _abbreviation_patterns(_rows(table))
    spans = _sentence_spans(report)

    def replace(match: re.Match) -> str:
        abbreviation = contractions[match.group(0).lower()]
        if any(ch.islower() for ch in abbreviation):  # "bilat.", "s/p": follow the text's case
            if match.group(0).isupper():
                abbreviation = abbreviation.upper()
            elif _at_sentence_start(report, spans, match.start()):
                abbreviation = _capitalize_first(abbreviation)
        if abbreviation.endswith(".") and report[match.end() : match.end() + 1] == ".":
            abbreviation = abbreviation[:-1]  # "bilateral." -> "bilat." not "bilat.."
        return abbreviation

    return _changed(report, pattern.sub(replace, report))


# ---------------------------------------------------------------------------------------------
# Sentence-level positives
# ---------------------------------------------------------------------------------------------


def _has_words(sentence: str) -> bool:
    return re.search(r"[A-Za-z0-9]", sentence) is not None


def shuffle_sentences(report: str, rng: RandomLike = None) -> str | None:
    """The report's sentences in a seeded new order; None for fewer than two sentences.

    Stray punctuation-only sentences (". .") are dropped. When the shuffle happens to give back the
    original order the sentences are rotated by one, so None means no other order exists.
    """
    report, rng = _check_report(report), _as_rng(rng)
    sentences = [sentence for sentence in split_sentences(report) if _has_words(sentence)]
    if len(sentences) < 2:
        return None
    order = sentences[:]
    rng.shuffle(order)
    if order == sentences:
        order = sentences[1:] + sentences[:1]
    return _changed(report, " ".join(order))


# Non-clinical sentences, each rule judging a whole sentence, so a clinical sentence that merely
# mentions a prior study ("Stable compared to prior.") or a finding is never dropped.
_COMPARISON_WORDS = frozenset(
    [
        "no",
        "none",
        "comparison",
        "comparisons",
        "compare",
        "compared",
        "available",
        "xxxx",
        "chest",
        "x-xxxx",
        "x-ray",
        "xray",
        "radiograph",
        "radiographs",
        "study",
        "studies",
        "exam",
        "exams",
        "examination",
        "examinations",
        "film",
        "films",
        "image",
        "images",
        "imaging",
        "prior",
        "previous",
        "old",
        "outside",
        "is",
        "are",
        "was",
        "were",
        "with",
        "to",
        "from",
        "the",
        "for",
        "of",
        "at",
        "this",
        "time",
        "dated",
        "date",
        "made",
        "there",
        "however",
        "direct",
        "evaluate",
        "assess",
        "stability",
    ]
)
_COMMUNICATION_VERB = re.compile(
    r"\b(?:discussed|notified|notification|notify|communicated|called|paged|telephoned|veriphy|primordial)\b",
    re.IGNORECASE,
)
# Who was told, or how; "XXXX" is a de-identified name ("discussed with XXXX").
_COMMUNICATION_PARTY = re.compile(
    r"\b(?:dr|doctor|physicians?|clinicians?|provider|nurse|team|referring|telephone|phone|primordial|veriphy"
    r"|critical)\b|XXXX",
    re.IGNORECASE,
)


def _is_comparison_note(sentence: str) -> bool:
    """"Comparison: none.", "No comparison chest x-XXXX.", "Comparison XXXX, XXXX." (nothing else)."""
    words = re.findall(r"[a-z][a-z-]*|\d+", _LIST_MARKER_PREFIX.sub("", sentence).lower())
    mentions_comparison = any(word.startswith("compar") or word == "available" for word in words)
    return mentions_comparison and all(word in _COMPARISON_WORDS or word.isdigit() for word in words)


def _is_placeholder_only(sentence: str) -> bool:
    """"XXXX XXXX.", "2. XXXX/XXXX.": nothing left but de-identification placeholders."""
    return re.fullmatch(r"[\W\d_]*(?:XXXX[\W\d_]*)+", sentence) is not None


def _is_communication(sentence: str) -> bool:
    """"Findings discussed with Dr. XXXX.", "Critical result notification documented through Primordial."."""
    return bool(_COMMUNICATION_VERB.search(sentence) and _COMMUNICATION_PARTY.search(sentence))


def _is_end_of_report(sentence: str) -> bool:
    """"END OF REPORT."."""
    return re.fullmatch(r"\W*end of (?:the )?(?:report|impression|findings)\W*", sentence, re.IGNORECASE) is not None


def _is_signature(sentence: str) -> bool:
    """"Dictated by XXXX.", "Electronically signed by ...", "I have personally reviewed the images."."""
    pattern = r"(?:dictated|transcribed|electronically signed|signed|read) by\b|i (?:have )?(?:personally )?reviewed\b"
    return re.match(pattern, sentence, re.IGNORECASE) is not None


BOILERPLATE_RULES: dict[str, Callable[[str], bool]] = {
    "comparison": _is_comparison_note,
    "placeholder_only": _is_placeholder_only,
    "communication": _is_communication,
    "end_of_report": _is_end_of_report,
    "signature": _is_signature,
}


def boilerplate_kind(sentence: str) -> str | None:
    """The name of the `BOILERPLATE_RULES` entry a sentence matches, or None if it is clinical."""
    stripped = sentence.strip()
    for name, matches in BOILERPLATE_RULES.items():
        if matches(stripped):
            return name
    return None


def drop_boilerplate(report: str, rng: RandomLike = None) -> str | None:
    """The report without its non-clinical sentences (`BOILERPLATE_RULES`).

    Stray punctuation-only sentences go too, but only alongside a real boilerplate sentence (removing
    a lone "." is not a useful positive). None when nothing matches or nothing clinical would remain.
    """
    report = _check_report(report)
    sentences = split_sentences(report)
    kept = [sentence for sentence in sentences if boilerplate_kind(sentence) is None and _has_words(sentence)]
    if not kept or not any(boilerplate_kind(sentence) for sentence in sentences):
        return None
    return _changed(report, " ".join(kept))


_TYPO_CANDIDATE = re.compile(r"\b[A-Za-z]{5,}\b")


@functools.lru_cache(maxsize=1)
def _typo_protected_words() -> re.Pattern:
    # Built on first use: the severity and change tables are defined further down.
    words = {*SEVERITY_SWAPS, *CHANGE_STATUS_SWAPS, "bilateral", "bilaterally", "stable", "unchanged", "absence",
             "negative", "positive", "normal", "abnormal"}
    return _word_pattern(words)


def _protected_from_typos(word: str) -> bool:
    """Whether `word` is one a hard negative edits (negation, side, severity, size, change): a typo there could
    be read as a clinical change."""
    return any(pattern.fullmatch(word) for pattern in (_typo_protected_words(), _NEGATION_CUE, _LATERALITY_WORDS))


def _typo(word: str, rng: random.Random) -> str:
    """One keyboard slip inside `word` (its first letter kept): two neighbouring letters swapped, a letter
    dropped or a letter doubled."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double"))
    if kind == "swap" and word[i].lower() != word[i + 1].lower():
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "double":
        return word[: i + 1] + word[i] + word[i + 1 :]
    return word[:i] + word[i + 1 :]


def typo_words(report: str, rng: RandomLike = None) -> str | None:
    """One or two seeded words of 5+ letters misspelt by one keyboard slip ("pneumothorax" -> "pneumothroax").

    Reports are dictated and typed, and a misspelt word means what it misspells. A word a hard negative edits
    (negation, side, severity, change) is never touched. The family teaches that one unfamiliar run of
    sub-word pieces must not move a report's embedding far: before it, the shipped default put a report with
    "pneumothorax" misspelt at cosine 0.55 from the original, below the same report with the word deleted
    (0.85).
    """
    report, rng = _check_report(report), _as_rng(rng)
    candidates = [match for match in _TYPO_CANDIDATE.finditer(report) if not _protected_from_typos(match.group(0))]
    if not candidates:
        return None
    chosen = sorted(rng.sample(candidates, min(len(candidates), rng.choice((1, 1, 2)))), key=lambda m: m.start())
    pieces, position = [], 0
    for match in chosen:
        pieces += [report[position : match.start()], _typo(match.group(0), rng)]
        position = match.end()
    return _changed(report, "".join(pieces) + report[position:])


# ---------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------

_LATERALITY_WORDS = re.compile(
    r"\b(?:left(?!\s+(?:in\s+place|behind|over|alone)\b)(?![\s-]+lingul)|right(?![\s-]+middle\b))\b", re.IGNORECASE
)
_LATERALITY_TERMS = {
    "RUL": "LUL", "LUL": "RUL", "RLL": "LLL", "LLL": "RLL",
    "RIJ": "LIJ", "LIJ": "RIJ", "RUQ": "LUQ", "LUQ": "RUQ", "RLQ": "LLQ", "LLQ": "RLQ",
    "levoscoliosis": "dextroscoliosis", "dextroscoliosis": "levoscoliosis",
    "levoconvex": "dextroconvex", "dextroconvex": "levoconvex",
    "levocurvature": "dextrocurvature", "dextrocurvature": "levocurvature",
}  # fmt: skip
_LATERALITY_ABBREVIATIONS = re.compile(r"\b(?:RUL|LUL|RLL|LLL|RIJ|LIJ|RUQ|LUQ|RLQ|LLQ)\b")
_LATERALITY_CURVES = _word_pattern([term for term in _LATERALITY_TERMS if term.islower()])


def swap_laterality(report: str, rng: RandomLike = None) -> str | None:
    """The mirror-image report: every left <-> right (RLL <-> LLL ...), "bilateral" untouched.

    "right middle lobe", RML and "left lingula" have no counterpart and stay. None when no swapped
    mention is asserted: "No right effusion" -> "No left effusion" is different but not wrong.
    """
    report = _check_report(report)
    matches = [
        *_LATERALITY_WORDS.finditer(report),
        *_LATERALITY_ABBREVIATIONS.finditer(report),
        *_LATERALITY_CURVES.finditer(report),
    ]
    spans = _sentence_spans(report)
    if not any(not _is_negated(report, _sentence_start(spans, m.start()), m.start()) for m in matches):
        return None

    def swap(match: re.Match) -> str:
        word = match.group(0)
        if word in _LATERALITY_TERMS:
            return _LATERALITY_TERMS[word]
        if word.lower() in _LATERALITY_TERMS:
            return _match_case(word, _LATERALITY_TERMS[word.lower()])
        return _match_case(word, "right" if word.lower() == "left" else "left")

    variant = _LATERALITY_WORDS.sub(swap, report)
    variant = _LATERALITY_ABBREVIATIONS.sub(swap, variant)
    variant = _LATERALITY_CURVES.sub(swap, variant)
    return _changed(report, variant)


def _indefinite_article(word: str) -> str:
    if word[:1].isdigit():  # "an 8 mm", "an 18 mm", "a 24 mm"
        integer = re.match(r"\d+", word).group(0)
        return "an" if integer.startswith("8") or integer in ("11", "18") else "a"
    vowel_sound = word[:1].lower() in "aeiou" and not re.match(r"u(?:ni|s[eu])", word, re.IGNORECASE)
    return "an" if vowel_sound else "a"


def _splice(report: str, start: int, end: int, replacement: str) -> str:
    """`report` with [start:end] replaced, fixing an "a"/"an" right before it ("an 8 mm" -> "a 24 mm")."""
    before = report[:start]
    article = re.search(r"\b(an?)(\s+)$", before, re.IGNORECASE)
    if article:
        new_article = _match_case(article.group(1), _indefinite_article(replacement))
        before = before[: article.start()] + new_article + article.group(2)
    return before + replacement + report[end:]


def _replace_one(report: str, matches: list[re.Match], rng: random.Random, choose) -> str | None:
    """Replace one seeded choice among `matches` with `choose(match)` (case kept)."""
    if not matches:
        return None
    match = rng.choice(matches)
    replacement = _match_case(match.group(0), choose(match))
    return _changed(report, _splice(report, match.start(), match.end(), replacement))


SEVERITY_SWAPS: dict[str, tuple[str, ...]] = {
    "small": ("large",), "large": ("small",), "tiny": ("large",), "trace": ("large",), "massive": ("small",),
    "mild": ("severe",), "severe": ("mild",), "moderate": ("minimal",),
    "mildly": ("severely", "markedly"), "severely": ("mildly",), "moderately": ("minimally",),
    "minimal": ("extensive", "marked"), "minimally": ("markedly",), "extensive": ("minimal",),
    "marked": ("minimal",), "markedly": ("slightly",), "slight": ("marked",), "slightly": ("markedly",),
}  # fmt: skip
_SEVERITY_PATTERN = _word_pattern(SEVERITY_SWAPS)


def change_severity(report: str, rng: RandomLike = None) -> str | None:
    """One asserted severity word swapped for a clearly different grade (`SEVERITY_SWAPS`)."""
    report, rng = _check_report(report), _as_rng(rng)
    matches = _asserted_matches(report, _SEVERITY_PATTERN)
    return _replace_one(report, matches, rng, lambda match: rng.choice(SEVERITY_SWAPS[match.group(0).lower()]))


_NUMBER = r"\d+(?:\.\d+)?"
_MEASUREMENT = re.compile(
    rf"\b{_NUMBER}(?:\s*(?:x|by|×)\s*{_NUMBER})*\s*(?P<unit>cm|mm|centimeters?|millimeters?)\b", re.IGNORECASE
)
# Scale up below these sizes, down above them, so the new size stays plausible for a CXR.
_SCALE_UP_BELOW = {"cm": 3.5, "mm": 35.0}


def _format_size(value: float, unit: str, had_decimal: bool) -> str:
    if unit == "mm" and not had_decimal:
        return str(max(1, round(value)))
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") and not had_decimal else text


def change_size(report: str, rng: RandomLike = None) -> str | None:
    """One asserted measurement made 3x larger (or 3x smaller when already large): "1.5 cm" -> "4.5 cm"."""
    report, rng = _check_report(report), _as_rng(rng)
    matches = _asserted_matches(report, _MEASUREMENT)
    if not matches:
        return None
    match = rng.choice(matches)
    unit = "mm" if match.group("unit").lower().startswith("m") else "cm"
    numbers = [float(number) for number in re.findall(_NUMBER, match.group(0))]
    factor = 3.0 if max(numbers) < _SCALE_UP_BELOW[unit] else 1 / 3

    def scale(number: re.Match) -> str:
        return _format_size(float(number.group(0)) * factor, unit, "." in number.group(0))

    resized = re.sub(_NUMBER, scale, match.group(0))
    return _changed(report, _splice(report, match.start(), match.end(), resized))


CHANGE_STATUS_SWAPS: dict[str, str] = {
    "improved": "worsened", "worsened": "improved", "improving": "worsening", "worsening": "improving",
    "improvement": "worsening", "better": "worse", "worse": "better",
    "increased": "decreased", "decreased": "increased", "increasing": "decreasing", "decreasing": "increasing",
    "increase": "decrease", "decrease": "increase",
    "resolving": "progressing", "progressing": "resolving", "resolved": "progressed", "progressed": "resolved",
    "resolution": "progression", "progression": "resolution",
}  # fmt: skip
_CHANGE_STATUS_PATTERN = _word_pattern(CHANGE_STATUS_SWAPS)
# "Recommend followup to ensure resolution" is a plan, not a change that was seen.
_PLANNED_CHANGE = re.compile(r"\b(?:ensure|document|confirm|assess|evaluate|to|until)\s+(?:complete\s+)?$", re.I)


def swap_change_status(report: str, rng: RandomLike = None) -> str | None:
    """One asserted change word reversed: improved <-> worsened, increased <-> decreased ...

    `stable`/`unchanged` are left alone (see the module docstring).
    """
    report, rng = _check_report(report), _as_rng(rng)
    matches = [
        match
        for match in _asserted_matches(report, _CHANGE_STATUS_PATTERN)
        if not _PLANNED_CHANGE.search(report[max(0, match.start() - 40) : match.start()])
    ]
    return _replace_one(report, matches, rng, lambda match: CHANGE_STATUS_SWAPS[match.group(0).lower()])


# Finding families: (regex of the mention, singular, plural or None for mass nouns). Qualifiers
# ("pleural", "pulmonary") belong to the mention, so "pleural effusion" -> "pneumothorax", not
# "pleural pneumothorax". Families with a None singular are replaced but never inserted.
FINDING_SUBSTITUTIONS: dict[str, tuple[str, str | None, str | None]] = {
    "effusion": (r"(?:pleural\s+)?effusion(?P<plural>s)?", "pleural effusion", "pleural effusions"),
    "pneumothorax": (r"pneumothora(?:x|(?P<plural>ces))", "pneumothorax", "pneumothoraces"),
    "consolidation": (r"consolidation(?P<plural>s)?", "consolidation", "consolidations"),
    "atelectasis": (r"atelectasis", "atelectasis", None),
    "edema": (r"(?:(?:pulmonary|interstitial|alveolar)\s+)?edema", "edema", None),
    "nodule": (r"(?:pulmonary\s+)?nodule(?P<plural>s)?", "nodule", "nodules"),
    "mass": (r"(?:pulmonary\s+)?mass(?P<plural>es)?", "mass", "masses"),
    "pneumonia": (r"pneumonia", "pneumonia", None),
    "cardiomegaly": (r"cardiomegaly", None, None),
    "granuloma": (r"granuloma(?P<plural>s)?", None, None),
    "infiltrate": (r"infiltrate(?P<plural>s)?", None, None),
}
# One named alternative per family; the inner "plural" groups lose their name, as names cannot repeat.
_FINDING_PATTERN = re.compile(
    "|".join(
        rf"\b(?P<{family}>{regex.replace('(?P<plural>', '(?:')})\b"
        for family, (regex, _, _) in FINDING_SUBSTITUTIONS.items()
    ),
    re.IGNORECASE,
)


def substitute_finding(report: str, rng: RandomLike = None) -> str | None:
    """One asserted finding replaced by another: "Small right pleural effusion" -> "Small right pneumothorax"."""
    report, rng = _check_report(report), _as_rng(rng)
    matches = _asserted_matches(report, _FINDING_PATTERN)
    if not matches:
        return None
    match = rng.choice(matches)
    family = match.lastgroup
    mention = re.fullmatch(FINDING_SUBSTITUTIONS[family][0], match.group(0), re.IGNORECASE)
    is_plural = mention.groupdict().get("plural") is not None
    # A plural mention needs a countable replacement ("nodules" -> "effusions", never "edemas").
    targets = [
        (plural_form if is_plural else singular)
        for name, (_, singular, plural_form) in FINDING_SUBSTITUTIONS.items()
        if name != family and singular is not None and (plural_form is not None or not is_plural)
    ]
    target = _match_case(match.group(0), rng.choice(targets))
    return _changed(report, _splice(report, match.start(), match.end(), target))


# --- flip_negation -----------------------------------------------------------------------------

_FLIPPABLE_NEGATION = re.compile(
    r"\b(?:(?P<negative_for>negative\s+for)|(?P<there_no>there\s+(?:is|are|was|were)\s+no)"
    r"|(?P<verb_not>(?:is|are|was|were)\s+not)|(?P<without>without)|(?P<no>no)(?!\s+longer))\b",
    re.IGNORECASE,
)
_FINDING_WORDS = re.compile(
    r"\b(?:effusions?|pneumothora(?:x|ces)|consolidations?|atelectasis|edema|cardiomegaly|nodules?|mass(?:es)?"
    r"|opacit(?:y|ies)|infiltrates?|pneumonia|emphysema|granulomas?|fractures?|scarring|air\s?space disease"
    r"|fibrosis|thickening|hyperinflation|hyperexpansion|calcifications?|congestion|(?:lymph)?adenopathy"
    r"|tortuosity|deformit(?:y|ies)|densit(?:y|ies)|scoliosis|kyphosis|spondylosis|osteophytes?|lesions?"
    r"|enlargement|blunting|catheters?|tubes?|pacemaker|clips|wires?|stents?|shunt|port)\b",
    re.IGNORECASE,
)
_ABNORMAL_PREDICATE = re.compile(
    r"\b(?P<verb>is|are)\s+(?:again\s+|(?:mildly|moderately|markedly|severely|slightly|borderline|minimally)\s+)?"
    r"(?P<state>enlarged|widened|elevated|blunted|hyperinflated|hyperexpanded|tortuous|prominent|clear|normal"
    r"|unremarkable|intact|within normal limits|seen|noted|identified|present|demonstrated)\b",
    re.IGNORECASE,
)
_MODIFIER_WORDS = (
    r"a|an|small|large|mild|moderate|severe|minimal|tiny|trace|slight|marked|extensive|massive|stable|persistent"
    r"|new|unchanged|again|mildly|moderately|markedly|severely|slightly|minimally"
)
_LEADING_MODIFIERS = re.compile(
    rf"^(?:(?:{_MODIFIER_WORDS})(?:\s*-\s*to\s*-\s*|\s+to\s+|\s*-\s*|\s+))+", re.IGNORECASE
)
_NOT_A_NOUN_PHRASE = re.compile(
    r"^(?:the|there|this|these|that|those|it|its|they)\b|\b(?:is|are|was|were|has|have|had|appears?|may|might"
    r"|could|can|would|should|will|recommend\w*|suggest\w*|represents?|consistent|compatible|likely|possibl\w*"
    r"|probabl\w*|versus|vs|if)\b",
    re.IGNORECASE,
)


def _affirm(body: str) -> str | None:
    """'No pneumothorax or effusion.' -> 'Pneumothorax and effusion.' (first negation cue only)."""
    cue = _FLIPPABLE_NEGATION.search(body)
    if cue is None:
        return None
    kind = cue.lastgroup
    if kind == "negative_for":
        replacement = _match_case(cue.group(0), "positive for")
    elif kind == "without":
        replacement = _match_case(cue.group(0), "with")
    elif kind in ("there_no", "verb_not"):
        replacement = cue.group(0).rsplit(None, 1)[0]
    else:
        replacement = ""
    # The cue's scope ends at the next cue or clause break; inside it "A or B" becomes "A and B".
    tail_start = cue.end()
    scope_ends = (_FLIPPABLE_NEGATION.search(body, tail_start), _CLAUSE_BREAK.search(body, tail_start))
    scope_end = min((match.start() for match in scope_ends if match), default=len(body))
    scope = body[tail_start:scope_end]
    if not re.search(r"[A-Za-z]{2,}", scope.replace("XXXX", "")):
        return None  # "No XXXX." has nothing left to assert
    scope = re.sub(r"\b(?:or|nor)\b", lambda m: _match_case(m.group(0), "and"), scope)
    before, after = body[: cue.start()], scope + body[scope_end:]
    if replacement:
        return before + replacement + after
    after = after.lstrip()
    return before + (_capitalize_first(after) if not before.strip() else after)


def _negate(body: str) -> str | None:
    """'Small right pleural effusion.' -> 'No right pleural effusion.'; 'Lungs are clear.' -> 'Lungs are not clear.'"""
    if _NEGATION_CUE.search(body):
        return None
    predicate = _ABNORMAL_PREDICATE.search(body)
    if predicate:
        state = predicate.group("state")
        return body[: predicate.start()] + f"{predicate.group('verb')} not {state}" + body[predicate.end() :]
    there = re.match(r"(there\s+(?:is|are))\s+", body, re.IGNORECASE)
    if there and _FINDING_WORDS.search(body, there.end()):
        rest = _LEADING_MODIFIERS.sub("", body[there.end() :])
        return f"{there.group(1)} no {rest}"
    if _FINDING_WORDS.search(body) and not _NOT_A_NOUN_PHRASE.search(body):
        rest = _LEADING_MODIFIERS.sub("", body)
        if _FINDING_WORDS.search(rest):
            return "No " + _lower_first(rest)
    return None


def _flip_sentence(sentence: str) -> str | None:
    marker = _LIST_MARKER_PREFIX.match(sentence)
    prefix, body = (marker.group(0), sentence[marker.end() :]) if marker else ("", sentence)
    flipped = _affirm(body) or _negate(body)
    return None if flipped is None else prefix + flipped


def flip_negation(report: str, rng: RandomLike = None) -> str | None:
    """One seeded sentence with its negation flipped, either way.

    "No pneumothorax or pleural effusion." -> "Pneumothorax and pleural effusion.",
    "There is no pleural effusion." -> "There is pleural effusion.",
    "Small right pleural effusion." -> "No right pleural effusion.", "Lungs are clear." -> "Lungs are not clear.".
    """
    report, rng = _check_report(report), _as_rng(rng)
    candidates = []
    for start, end in _sentence_spans(report):
        flipped = _flip_sentence(report[start:end])
        if flipped is not None and _normalized(flipped) != _normalized(report[start:end]):
            candidates.append((start, end, flipped))
    if not candidates:
        return None
    start, end, flipped = rng.choice(candidates)
    return _changed(report, report[:start] + flipped + report[end:])


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

POSITIVE_GENERATORS: dict[str, Generator] = {
    "expand_abbreviations": expand_abbreviations,
    "contract_abbreviations": contract_abbreviations,
    "shuffle_sentences": shuffle_sentences,
    "drop_boilerplate": drop_boilerplate,
    "typo_words": typo_words,
}
NEGATIVE_GENERATORS: dict[str, Generator] = {
    "swap_laterality": swap_laterality,
    "flip_negation": flip_negation,
    "change_severity": change_severity,
    "change_size": change_size,
    "swap_change_status": swap_change_status,
    "substitute_finding": substitute_finding,
}


# Every family a model of this package can be trained on: the rule generators above, the real
# findings<->impression pairs of a study, and the compositional synthetic reports (`augment.synthetic`).
# Evaluation uses other families (`evaluation.heldout_variants`); a model card names the ones it used.
TRAINING_FAMILIES = (*POSITIVE_GENERATORS, *NEGATIVE_GENERATORS, "findings_impression", "synthetic_compositional")


def _select(generators: dict[str, Generator], kinds, argument: str) -> list[str]:
    if kinds is None:
        return list(generators)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [kind for kind in kinds if kind not in generators]
    if unknown or not kinds:
        raise ValueError(f"`{argument}` must be a non-empty subset of {tuple(generators)}, got {kinds!r}.")
    return kinds


def _first_variant(report: str, rng: RandomLike, generators: dict[str, Generator], kinds, argument: str):
    report, rng = _check_report(report), _as_rng(rng)
    order = _select(generators, kinds, argument)
    rng.shuffle(order)
    for name in order:
        variant = _changed(report, generators[name](report, rng))
        if variant is not None:
            return variant, name
    return None


def make_positive(report: str, rng: RandomLike = None, kinds=None) -> tuple[str, str] | None:
    """(variant, generator name) from the first positive generator, in seeded order, that changes the report."""
    return _first_variant(report, rng, POSITIVE_GENERATORS, kinds, "kinds")


def make_hard_negative(report: str, rng: RandomLike = None, kinds=None) -> tuple[str, str] | None:
    """(variant, generator name) from the first hard-negative generator, in seeded order, that changes the report."""
    return _first_variant(report, rng, NEGATIVE_GENERATORS, kinds, "kinds")


__all__ = [
    "BOILERPLATE_RULES",
    "CHANGE_STATUS_SWAPS",
    "FINDING_SUBSTITUTIONS",
    "NEGATIVE_GENERATORS",
    "POSITIVE_GENERATORS",
    "TRAINING_FAMILIES",
    "SEVERITY_SWAPS",
    "boilerplate_kind",
    "change_severity",
    "change_size",
    "contract_abbreviations",
    "drop_boilerplate",
    "expand_abbreviations",
    "flip_negation",
    "load_abbreviations",
    "make_hard_negative",
    "make_positive",
    "shuffle_sentences",
    "split_sentences",
    "substitute_finding",
    "swap_change_status",
    "swap_laterality",
    "typo_words",
]
