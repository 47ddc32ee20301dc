"""Every figure reads at a glance: drawn from the committed results/ and from the small v1 export,
no two texts overlap and none leaves the canvas (`layout.py`)."""

from pathlib import Path

import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text
from report_data import V1

from knormpress.report.claims import load_claims
from knormpress.report.figures import task_figures
from layout import problems
from knormpress.report.runs import read_results

RESULTS = Path(__file__).resolve().parents[1] / "results"
FIGURES = task_figures()


@pytest.fixture(scope="module", params=[RESULTS, V1], ids=["results", "v1"])
def tables(request):
    return read_results(request.param)


@pytest.mark.parametrize("name", FIGURES)
def test_no_text_overlaps_or_leaves_the_canvas(name, tables):
    fig = FIGURES[name](*tables, load_claims())
    assert problems(fig) == []


def test_the_check_sees_overlaps_and_clipping():
    fig = Figure(figsize=(4, 3))
    fig.text(0.5, 0.5, "first label")
    fig.text(0.52, 0.5, "second label")
    fig.text(0.95, 0.1, "cut off at the right edge")
    found = problems(fig)
    assert "'cut off at the right edge' leaves the canvas" in found and "'first label' overlaps 'second label'" in found
    assert all(isinstance(t, Text) for t in fig.texts)
