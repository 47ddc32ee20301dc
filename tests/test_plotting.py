"""Every figure renders to a real PNG: from the v1 export, with whole experiments missing, with an
unknown strategy and with another task's experiment; colours follow the data."""

import struct

import numpy as np
import pandas as pd
import pytest
from report_data import GEMMA, SMOL, V1, results_dir, tables, two_models

from knormpress.report.claims import load_claims
from knormpress.report.figures import Palette, save_all, task_figures
from knormpress.report.runs import read_results

FIGURES = task_figures()  # file name -> function, from each task's declared figures
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def v1():
    return read_results(V1)


def test_all_figures_are_valid_pngs(v1, tmp_path):
    paths = save_all(*v1, tmp_path)
    assert [p.name for p in paths] == list(FIGURES) == [
        "strategy_comparison.png", "keep_ratio_analysis.png", "ppl_accuracy_tradeoff.png", "improvement_summary.png",
        "passkey_accuracy.png", "needle_heatmap.png", "norm_attention.png", "attention_recall.png"]
    for path in paths:
        width, height = png_size(path)
        assert width >= 800 and height >= 400
        assert path.stat().st_size > (20_000 if path.name in list(FIGURES)[:4] else 5_000)  # v1 has no retrieval runs


def retrieval_runs(models: tuple[str, ...] = (SMOL,)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model, a passkey and a needle experiment: a baseline and two strategies at ratios 0.5 and
    0.9, 2 x 2 cells of 2 trials."""
    from knormpress.metrics import wilson
    from knormpress.report.runs import tidy

    rng = np.random.default_rng(0)
    rows, trials = [], []
    for model, exp in ((m, e) for m in models for e in ("passkey", "needle")):
        for strategy, ratio in (("none", None), ("keep_low", 0.5), ("keep_low", 0.9), ("random", 0.5), ("random", 0.9)):
            run_id = f"{model}-{exp}-{strategy}-{ratio}"
            correct = rng.random(8) < (1.0 if ratio is None else 1.3 - ratio)
            lo, hi = wilson(int(correct.sum()), 8)
            rows.append({"run_id": run_id, "experiment": exp, "role": "baseline" if ratio is None else "compressed",
                         "strategy": strategy, "ratio": ratio, "when": "prefill", "accuracy": correct.mean(),
                         "accuracy_lo": lo, "accuracy_hi": hi, "start_time": 0, "model": model})
            trials += [{"run_id": run_id, "text_id": f"t{i}", "length": [1024, 2048][i % 2], "depth": [0.0, 0.5][i // 4],
                        "correct": bool(c)} for i, c in enumerate(correct)]
    return tidy(pd.DataFrame(rows)), pd.DataFrame(trials)


def test_retrieval_figures_draw_every_strategy(tmp_path):
    runs, texts = retrieval_runs()
    ax = FIGURES["passkey_accuracy.png"](runs, texts).axes[0]
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"keep_low", "random", "baseline (no compression)"}
    fig = FIGURES["needle_heatmap.png"](runs, texts)
    assert [a.get_title() for a in fig.axes[:3]] == ["baseline", "keep_low", "random"]
    for name in ("passkey_accuracy.png", "needle_heatmap.png"):
        FIGURES[name](runs, texts).savefig(tmp_path / name, dpi=150)
        assert (tmp_path / name).stat().st_size > 20_000


def test_retrieval_figures_give_each_model_its_own_panels():
    runs, texts = retrieval_runs((SMOL, GEMMA))
    passkey = FIGURES["passkey_accuracy.png"](runs, texts)
    assert [sub.get_suptitle().split(" on ")[0] for sub in passkey.subfigs] == [GEMMA, SMOL]  # same experiments: by name
    for sub, model in zip(passkey.subfigs, (GEMMA, SMOL)):
        keep_low = runs[(runs.model == model) & (runs.strategy == "keep_low") & (runs.experiment == "passkey")]
        points = sub.axes[0].containers[0].lines[0].get_xydata()
        assert np.allclose(points[:, 1], 100 * keep_low.sort_values("ratio").accuracy)  # its own model's runs
    needle = FIGURES["needle_heatmap.png"](runs, texts)
    assert [[a.get_title() for a in sub.axes[:3]] for sub in needle.subfigs] == [["baseline", "keep_low", "random"]] * 2


def test_tradeoff_labels_every_config_once(v1):
    # 14 distinct compressed configs: ablations 4 (keep_low 0/0.5, sorted/unsorted), keep_ratio 6
    # more (keep_low 0.3/0.4/0.6, random 0.3/0.4/0.6), strategies 4 more (keep_high, random 0.5,
    # recent_only, sinks); sorted and unsorted give the same numbers at 0 and 0.5: 12 labels.
    # A label with no free spot is a number beside its point, spelled out in the key beside the panel;
    ax = FIGURES["ppl_accuracy_tradeoff.png"](*v1).axes[0]
    texts = [t.get_text() for t in ax.texts]
    keys = [t for t in texts if t.startswith("1: ")]
    assert len(keys) <= 1
    spelled = dict(line.split(": ", 1) for line in keys[0].split("\n")) if keys else {}
    # points drawn on top of each other share a label: "a / b"
    labels = [one for t in texts if t not in keys for one in spelled.get(t, t).split(" / ")]
    assert sorted(spelled) == sorted(t for t in texts if t.isdigit())  # every number on the panel is in the key
    assert "keep_low 0.5 = keep_low 0.5 unsorted" in labels and "keep_low 0 = keep_low 0 unsorted" in labels
    assert len(labels) == len(set(labels)) == 12


def test_missing_experiments_give_a_note_not_a_crash(v1, tmp_path):
    runs, texts = v1
    for path in save_all(runs[runs.experiment == "keep_ratio"], texts.iloc[:0], tmp_path):
        assert png_size(path)[0] >= 800


@pytest.mark.parametrize("with_v1", [True, False])
def test_unknown_strategies_and_other_tasks(tmp_path, with_v1):
    runs, texts = read_results(results_dir(tmp_path, v1=with_v1))
    fig = FIGURES["strategy_comparison.png"](runs, texts)
    if with_v1:
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == "snapkv"
    for path in save_all(runs, texts, tmp_path / "figures"):
        assert png_size(path)[0] >= 800


def test_palette_keeps_known_colours_and_orders_the_rest():
    config = load_claims()["figures"]
    palette = Palette(["zeta", "keep_low", "alpha", "random"], config)
    assert palette("keep_low") == "tab:blue" and palette("random") == "tab:green"
    assert (palette("alpha"), palette("zeta")) == tuple(config["palette"][:2])  # sorted order, whatever the input
    assert Palette(["alpha", "zeta"], config).colors == {**config["colors"], "alpha": config["palette"][0],
                                                         "zeta": config["palette"][1]}
    assert palette.ordered(["zeta", "alpha", "random", "keep_low"]) == ["keep_low", "random", "alpha", "zeta"]


def test_two_models_get_a_row_of_panels_each(tmp_path):
    runs, texts = tables(two_models())
    fig = FIGURES["strategy_comparison.png"](runs, texts)
    assert [sub.get_suptitle().split(" on ")[0] for sub in fig.subfigs] == [SMOL, GEMMA]
    assert fig.get_suptitle() == "Strategies at keep_ratio 0.5, against the baseline"
    changes = [[c.lines[0].get_ydata()[0] for c in sub.axes[0].containers] for sub in fig.subfigs]
    # keep_low, random, recent_only: the PPL factors two_models gives them over each model's baseline, in %
    assert np.allclose(changes, [[5.0, 10.0, 13.0], [20.0, 8.0, 10.0]])
    tradeoff = FIGURES["ppl_accuracy_tradeoff.png"](runs, texts)
    assert [len(sub.axes) for sub in tradeoff.subfigs] == [1, 1]
    for sub, keep_low in zip(tradeoff.subfigs, ([5.0, -3.0], [20.0, -10.0])):
        ax = sub.axes[0]
        assert sorted(t.get_text() for t in ax.texts) == ["keep_low 0.5", "random 0.5", "recent_only 0.5"]
        assert ax.containers[0].lines[0].get_xydata().tolist() == [keep_low]  # its own model's point
    for name in ("keep_ratio_analysis.png", "improvement_summary.png"):  # only SmolLM2 ran them: one row, as before
        one = FIGURES[name](runs, texts)
        assert one.subfigs == [] and SMOL in one.get_suptitle() and GEMMA not in one.get_suptitle()
    for drawn, size in ((fig, (550, 2 * 280)), (tradeoff, (450, 2 * 325))):  # one model: 11 x 5.6 and 9 x 6.5 in
        drawn.savefig(tmp_path / "figure.png", dpi=50)
        assert png_size(tmp_path / "figure.png") == size  # a row per model
