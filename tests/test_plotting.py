"""Every figure renders to a real PNG, from full data and from data with whole experiments missing."""

import struct

import pytest

from knormpress.plotting import FIGURES, save_all
from test_results import fake_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def tables():
    return fake_results()


def test_all_figures_are_valid_pngs(tables, tmp_path):
    paths = save_all(*tables, tmp_path)
    assert [p.name for p in paths] == list(FIGURES)
    for path in paths:
        width, height = png_size(path)
        assert width >= 800 and height >= 400 and path.stat().st_size > 20_000


def test_tradeoff_labels_every_point_once(tables):
    runs, texts = tables
    ax = FIGURES["ppl_accuracy_tradeoff.png"](runs, texts).axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert "keep_low 0.5 = keep_low 0.5 unsorted" in labels  # identical runs share one label
    assert len(labels) == len(set(labels)) == 12  # 13 distinct configs, two of them identical


def test_missing_experiments_give_a_note_not_a_crash(tables, tmp_path):
    runs, texts = tables
    for path in save_all(runs[runs.experiment == "keep_ratio"], texts.iloc[:0], tmp_path):
        assert png_size(path)[0] >= 800
