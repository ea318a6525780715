"""Where the tests find the real data (and the checkout's recipes), and the marks that skip a test when the data
is absent.

The real files (the Open-I reports, the sample chest X-rays) live in `../shared/data` beside the checkout, or
wherever `$LLM2CLIP4CXR_DATA` points. A clone without them still collects and passes the suite: the tests
that need them skip with the reason below, everything else runs on data the tests make themselves (the
`report_texts` fixture falls back to the package's synthetic reports). CI has the data and runs them all.
Paths are only computed here, never read at import time.
"""

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLM2CLIP4CXR_DATA") or ROOT.parent / "shared" / "data")
OPENI = DATA / "openi"
OPENI_REPORTS = OPENI / "reports.csv"
SAMPLES = DATA / "cxr-samples"
XRV = SAMPLES / "torchxrayvision"

HAVE_OPENI = OPENI_REPORTS.is_file()
HAVE_SAMPLES = (XRV / "00000001_000.png").is_file()

_WHERE = "../shared/data beside the checkout, or set LLM2CLIP4CXR_DATA"
needs_openi = pytest.mark.skipif(not HAVE_OPENI, reason=f"needs the Open-I reports (openi/reports.csv in {_WHERE})")
needs_samples = pytest.mark.skipif(
    not HAVE_SAMPLES, reason=f"needs the sample chest X-rays (cxr-samples/ in {_WHERE})"
)


def import_recipe(name: str):
    """A recipe script of the checkout's training/ folder (train_text_encoder, train_clip) as a module."""
    sys.path.insert(0, str(ROOT / "training"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
