import csv
import textwrap

import pytest

from llm2clip4cxr.data.sections import parse_report_sections

from ..shared_data import OPENI_REPORTS as OPENI
from ..shared_data import needs_openi

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows. The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def norm(text):
    return " ".join(text.split())


def test_mimic_style_report_with_wrapped_indented_lines():
    sections = parse_report_sections(MIMIC_STYLE)
    assert sections.findings == (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that most "
        "likely represent nipple shadows. The cardiomediastinal silhouette is normal."
    )
    assert sections.impression == "No acute cardiopulmonary process."
    assert sections.other == {"examination": "CHEST (PA AND LAT)", "technique": "Chest PA and lateral",
                              "indication": "___F with new onset ascites // eval for infection", "comparison": "None."}
    assert sections.preamble is None  # the FINAL REPORT banner is not text


@pytest.mark.parametrize(
    "report, findings, impression",
    [
        # impression only (a MIMIC portable film): findings stay missing, not copied from the impression
        (
            " FINAL REPORT\n INDICATION:  Intubated.\n\n IMPRESSION:  ET tube 4 cm above the carina.",
            None,
            "ET tube 4 cm above the carina.",
        ),
        # CONCLUSION and mixed-case headers, header and text on different lines
        (
            "Findings:\n  Heart size normal.\n  Lungs clear.\nConclusion:\n  Normal chest.",
            "Heart size normal. Lungs clear.",
            "Normal chest.",
        ),
        # one-line report with inline headers
        ("FINDINGS: Small left effusion. IMPRESSION: Effusion.", "Small left effusion.", "Effusion."),
        # a header with nothing under it is missing, not an empty string
        ("FINDINGS:\n\nIMPRESSION:  No change.", None, "No change."),
        # header-less report: nothing guessed
        ("The lungs are clear. No effusion.", None, None),
        # combined section counts as findings only
        ("FINDINGS AND IMPRESSION:  No acute process.", "No acute process.", None),
        # a repeated section (addendum) keeps both parts in order
        ("IMPRESSION: Line in SVC.\nADDENDUM: called.\nIMPRESSION: Tip moved.", None, "Line in SVC. Tip moved."),
    ],
)
def test_section_variants(report, findings, impression):
    sections = parse_report_sections(report)
    assert (sections.findings, sections.impression) == (findings, impression)


def test_header_less_text_is_the_preamble_and_none_is_empty():
    assert parse_report_sections("Normal heart.\n  Clear lungs.").preamble == "Normal heart. Clear lungs."
    empty = parse_report_sections(None)
    assert (empty.findings, empty.impression, empty.preamble, empty.other) == (None, None, None, {})
    with pytest.raises(TypeError, match="must be a str"):
        parse_report_sections(3)


@needs_openi
def test_real_openi_reports_rewritten_as_free_text_parse_back():
    """Every Open-I report rewritten in MIMIC's free-text form (headers, wrapped indented lines) gives its
    findings and impression columns back, and a missing column stays None."""
    with OPENI.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # A few cells hold a whole report with its own headers (e.g. "... IMPRESSION: Exam: ... FINDINGS: ..."): those
    # cannot come back as one section, so they are left out; they must stay rare.
    def self_contained(text):
        return parse_report_sections(text).preamble == (norm(text) or None)

    clean = [row for row in rows if self_contained(row["findings"]) and self_contained(row["impression"])]
    assert len(clean) > 0.99 * len(rows)
    for row in clean:
        parts = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {row['image']}", f" INDICATION:  {row['indication']}",
                 f" COMPARISON:  {row['comparison']}"]
        for header in ("findings", "impression"):
            if row[header].strip():
                parts.append(f" {header.upper()}:\n")
                parts += textwrap.wrap(row[header], width=70, initial_indent=" ", subsequent_indent=" ",
                                       break_on_hyphens=False, break_long_words=False)
        sections = parse_report_sections("\n".join(parts) + "\n")
        assert sections.findings == (norm(row["findings"]) or None), row["uid"]
        assert sections.impression == (norm(row["impression"]) or None), row["uid"]
