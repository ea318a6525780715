"""Sections of free-text radiology reports: FINDINGS, IMPRESSION and the headers around them.

MIMIC-CXR reports look like::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)
     INDICATION:  ___ with cough
     COMPARISON:  ___
     FINDINGS:
      The lungs are clear.  No pleural effusion
      or pneumothorax.
     IMPRESSION:  No acute cardiopulmonary process.

`parse_report_sections` finds the headers (at the start of a line, or after a sentence in one-line
reports), joins each section's wrapped lines, and maps header variants onto canonical names
(CONCLUSION -> impression, ...). A section the report does not have is None: nothing is guessed from
another section, so callers can count and drop reports that lack the section they train on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["HEADER_ALIASES", "ReportSections", "parse_report_sections"]

# Header text (upper case, single spaces) -> canonical section name.
HEADER_ALIASES = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "FINDINGS AND IMPRESSION": "findings",  # one combined section: kept as findings, impression stays missing
    "FINDINGS/IMPRESSION": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "SUMMARY": "impression",
    "OPINION": "impression",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "TYPE OF EXAMINATION": "examination",
    "PROCEDURE": "examination",
    "INDICATION": "indication",
    "INDICATIONS": "indication",
    "HISTORY": "indication",
    "CLINICAL HISTORY": "indication",
    "CLINICAL INFORMATION": "indication",
    "CLINICAL INDICATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "TECHNIQUE": "technique",
    "RECOMMENDATION": "recommendation",
    "RECOMMENDATIONS": "recommendation",
    "RECOMMENDATION(S)": "recommendation",
    "NOTIFICATION": "notification",
    "ADDENDUM": "addendum",
    "WET READ": "wet_read",
}

_NAMES = sorted(HEADER_ALIASES, key=len, reverse=True)  # longest first: "FINDINGS AND IMPRESSION" before "FINDINGS"
_HEADER_WORDS = "|".join(re.escape(name).replace(r"\ ", r"\s+") for name in _NAMES)
# A header starts a line (after optional indentation) or follows the end of a sentence, and ends in a colon
# (or a dash). Case-insensitive so "Findings:" and "IMPRESSION:" both match.
_HEADER = re.compile(
    rf"(?:^|(?<=\n)|(?<=[.!?])\s)[ \t]*(?P<name>{_HEADER_WORDS})[ \t]*(?::|\s-\s)",
    re.IGNORECASE,
)
# Banner lines that are not sections (MIMIC's "FINAL REPORT", "PRELIMINARY REPORT").
_BANNER = re.compile(r"^[ \t]*(?:FINAL|PRELIMINARY|ADDENDUM TO)\s+REPORT[ \t]*$", re.MULTILINE)


@dataclass
class ReportSections:
    """The sections of one report; each is the section's text on one line, or None when absent or empty.

    Attributes:
        findings: FINDINGS (also "FINDINGS AND IMPRESSION").
        impression: IMPRESSION (also CONCLUSION, SUMMARY, OPINION).
        preamble: text before the first recognised header (the whole text of a header-less report).
        other: the other recognised sections by canonical name (examination, indication, comparison, ...).
    """

    findings: str | None = None
    impression: str | None = None
    preamble: str | None = None
    other: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        """A section by canonical name (findings, impression, preamble or one of `other`)."""
        if name in ("findings", "impression", "preamble"):
            return getattr(self, name)
        return self.other.get(name)


def _clean(text: str) -> str | None:
    """Wrapped lines joined with single spaces; None when nothing is left."""
    text = " ".join(text.split())
    return text or None


def parse_report_sections(text: str | None) -> ReportSections:
    """Split a free-text report into its sections.

    Headers are recognised at the start of a line or after the end of a sentence, in any letter case,
    followed by a colon (or " - "); `HEADER_ALIASES` lists them. A section's text runs to the next
    header, its wrapped lines joined with single spaces. A header that occurs twice (e.g. a second
    IMPRESSION in an addendum) has its texts joined in order. A section that is absent, or present with
    no text, is None; the text of a report without any header is its `preamble`, not its findings.

    Args:
        text: the report (None or empty gives an empty `ReportSections`).

    Returns:
        `ReportSections`.
    """
    if text is None:
        return ReportSections()
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str or None, got {type(text).__name__}.")
    text = _BANNER.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    matches = list(_HEADER.finditer(text))
    collected: dict[str, list[str]] = {}
    preamble = _clean(text[: matches[0].start()] if matches else text)
    for match, following in zip(matches, matches[1:] + [None]):
        name = HEADER_ALIASES[" ".join(match.group("name").upper().split())]
        body = _clean(text[match.end() : following.start() if following else len(text)])
        if body is not None:
            collected.setdefault(name, []).append(body)
    joined = {name: " ".join(parts) for name, parts in collected.items()}
    return ReportSections(
        findings=joined.pop("findings", None),
        impression=joined.pop("impression", None),
        preamble=preamble,
        other=joined,
    )
