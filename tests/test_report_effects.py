"""Paired effects against cases computed by hand or by a direct numpy loop; verdict rules on
hand-made effects; run selection."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from knormpress.metrics import resample_texts
from knormpress.report.effects import (FAILS, HIGHER, HOLDS, INCONCLUSIVE, LOWER, UNMEASURABLE, Effect, by_model,
                                       category, combine, effect, pick, rows_where, verdict)


def two_runs(a_ppl: tuple[float, float], b_ppl: tuple[float, float], a_correct: tuple[int, int],
             b_correct: tuple[int, int], n_tokens: tuple[int, int] = (10, 30)):
    """Runs a and b on two texts, each text given by its own PPL and number of correct tokens."""
    texts = pd.DataFrame([
        {"run_id": run, "text_id": i, "n_tokens": n, "nll_sum": n * math.log(p), "n_correct": c}
        for run, ppls, correct in (("a", a_ppl, a_correct), ("b", b_ppl, b_correct))
        for i, (p, c, n) in enumerate(zip(ppls, correct, n_tokens))
    ])
    runs = {}
    for run, ppls, correct in (("a", a_ppl, a_correct), ("b", b_ppl, b_correct)):
        nll = sum(n * math.log(p) for p, n in zip(ppls, n_tokens))
        runs[run] = pd.Series({"run_id": run, "ppl": math.exp(nll / sum(n_tokens)),
                               "accuracy": sum(correct) / sum(n_tokens), "kv_bytes_peak": 10.0 if run == "a" else 40.0})
    return texts, runs["a"], runs["b"]


def test_two_texts_by_hand():
    # Resampling 2 texts gives (2, 0), (1, 1) or (0, 2) draws, ~1/4, 1/2, 1/4 of 2000 resamples, so
    # the 2.5% and 97.5% percentiles are the one-text resamples: text 0 alone, text 1 alone.
    # Text 0: PPL 2 vs 2.5 (-20%), 5 vs 4 correct of 10 (+25%); text 1: PPL 4 vs 4, 15 vs 15 of 30.
    texts, a, b = two_runs((2.0, 4.0), (2.5, 4.0), (5, 15), (4, 15))
    e = effect(texts, a, b, "ppl")
    # pooled over 40 tokens: a = 2^(10/40) * 4^(30/40) = 2^1.75, b = 2.5^0.25 * 4^0.75
    assert e.est == pytest.approx(100 * (2 ** 1.75 / (2.5 ** 0.25 * 4 ** 0.75) - 1))
    assert (e.lo, e.hi) == (pytest.approx(-20.0), pytest.approx(0.0)) and not e.identical
    e = effect(texts, a, b, "accuracy")
    assert e.est == pytest.approx(100 * (20 / 19 - 1))
    assert (e.lo, e.hi) == (pytest.approx(0.0), pytest.approx(25.0))


def test_many_texts_match_a_direct_loop():
    rng = np.random.default_rng(7)
    n = rng.integers(50, 150, 6)
    texts = pd.DataFrame({"run_id": np.repeat(["a", "b"], 6), "text_id": np.tile(np.arange(6), 2),
                          "n_tokens": np.tile(n, 2), "nll_sum": rng.uniform(2, 4, 12) * np.tile(n, 2),
                          "n_correct": rng.integers(10, 40, 12)})
    per = {r: texts[texts.run_id == r] for r in "ab"}
    a, b = (pd.Series({"run_id": r, "ppl": math.exp(t.nll_sum.sum() / t.n_tokens.sum()),
                       "accuracy": t.n_correct.sum() / t.n_tokens.sum()}) for r, t in per.items())
    changes = {"ppl": [], "accuracy": []}
    for w in resample_texts(6):  # one resample: text i drawn w[i] times
        drawn = np.repeat(np.arange(6), w)
        ta, tb = (per[r].set_index("text_id").loc[drawn] for r in "ab")
        changes["ppl"].append(math.exp(ta.nll_sum.sum() / ta.n_tokens.sum() - tb.nll_sum.sum() / tb.n_tokens.sum()))
        changes["accuracy"].append(ta.n_correct.sum() / tb.n_correct.sum())
    for metric, ratios in changes.items():
        e = effect(texts, a, b, metric)
        lo, hi = np.quantile(100 * (np.array(ratios) - 1), [0.025, 0.975])
        assert (e.lo, e.hi) == (pytest.approx(lo), pytest.approx(hi))
        assert e.est == pytest.approx(100 * (a[metric] / b[metric] - 1))


def test_identical_runs_and_unpaired_runs():
    texts, a, b = two_runs((2.0, 4.0), (2.0, 4.0), (5, 15), (5, 15))
    e = effect(texts, a, b, "ppl")
    assert e.identical and e.est == pytest.approx(0) and verdict(e, LOWER) == FAILS
    assert str(e) == "+0.00% (identical per-text NLLs)"
    other = texts.assign(text_id=np.where(texts.run_id == "b", texts.text_id + 10, texts.text_id))
    e = effect(other, a, b, "ppl")  # no common texts: no interval
    assert math.isnan(e.lo) and not e.identical and verdict(e, LOWER) == INCONCLUSIVE and str(e) == "+0.00%"
    assert effect(texts, a, None, "ppl") is None


def test_metrics_without_per_text_sums_get_no_interval():
    texts, a, b = two_runs((2.0, 4.0), (2.5, 4.0), (5, 15), (4, 15))
    e = effect(texts, a, b, "kv_bytes_peak")
    assert e.est == pytest.approx(-75.0) and math.isnan(e.lo)
    e = effect(texts.drop(columns="nll_sum"), a, b, "ppl")
    assert math.isnan(e.lo) and e.est == pytest.approx(effect(texts, a, b, "ppl").est)


@pytest.mark.parametrize(("lo", "hi", "claimed", "want"), [
    (-4.0, -1.0, (-5.0, -2.0), HOLDS),
    (-9.0, -7.0, (-5.0, -2.0), "direction holds, 1.6x larger than claimed"),  # estimate -8: 8 / 5
    (-1.5, -0.5, (-5.0, -2.0), "direction holds, 2x smaller than claimed"),  # estimate -1: 2 / 1
    (-1.5, 0.5, (-5.0, -2.0), FAILS),  # contains 0 and cannot reach -2
    (-65.0, -60.0, (-5.0, -2.0), "direction holds, 12x larger than claimed"),  # 62.5 / 5 = 12.5, 2 digits
    (-3.0, 1.0, (-5.0, -2.0), INCONCLUSIVE),
    (0.5, 2.0, LOWER, FAILS),  # wrong side of 0
    (0.0, 0.0, HIGHER, FAILS),  # e.g. the same accuracy on every resample
    (-0.5, 2.0, HIGHER, INCONCLUSIVE),
    (1.2, 3.0, (1.0, 2.0), HOLDS),
    (0.2, 0.9, (1.0, 2.0), "direction holds, 1.8x smaller than claimed"),  # 1 / 0.55
    (-0.2, 0.9, (1.0, 2.0), FAILS),
    (-0.2, 1.1, (1.0, 2.0), INCONCLUSIVE),
    (30.0, 70.0, HIGHER, HOLDS),  # a direction-only claim has no size to miss
    (0.2, 1.5, (1.0, 2.0), HOLDS),
])
def test_verdict_rules(lo, hi, claimed, want):
    assert verdict(Effect((lo + hi) / 2, lo, hi), claimed) == want


def test_verdict_without_runs_or_intervals():
    assert verdict(None, LOWER) == UNMEASURABLE
    assert verdict(Effect(math.nan), LOWER) == UNMEASURABLE
    assert verdict(Effect(-3.0), LOWER) == INCONCLUSIVE


LARGER3 = "direction holds, 3x larger than claimed"


@pytest.mark.parametrize(("verdicts", "want"), [
    ([], UNMEASURABLE), ([HOLDS, HOLDS], HOLDS), ([HOLDS, INCONCLUSIVE], INCONCLUSIVE),
    ([INCONCLUSIVE, UNMEASURABLE], UNMEASURABLE), ([UNMEASURABLE, FAILS, HOLDS], FAILS),
    ([HOLDS, LARGER3], LARGER3), ([LARGER3, INCONCLUSIVE], INCONCLUSIVE),
])
def test_combine(verdicts, want):
    assert combine(verdicts) == want


def test_category_drops_the_factor():
    assert category(LARGER3) == category("direction holds, 2x smaller than claimed") == "direction holds"
    assert [category(v) for v in (HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE)] == [HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE]


def test_rows_where_and_pick():
    runs = pd.DataFrame({
        "run_id": ["base", "old", "new", "unsorted", "other"],
        "role": ["baseline", "compressed", "compressed", "compressed", "compressed"],
        "strategy": ["none", "keep_low", "keep_low", "keep_low", "random"],
        "keep_ratio": [0.5, 0.3 + 0.2, 0.5, 0.5, 0.5],  # 0.3 + 0.2 != 0.5 exactly
        "sort_by_time": pd.array([True, True, True, False, pd.NA], dtype="boolean"),
        "start_time": [1, 2, 3, 4, 5],
    })
    assert pick(runs, role="baseline").run_id == "base"
    assert pick(runs, strategy="keep_low", keep_ratio=0.5, sort_by_time=True).run_id == "new"
    assert pick(runs, strategy="keep_low").run_id == "unsorted"  # any sort_by_time: the newest
    assert pick(runs, strategy="keep_low", sort_by_time=None).run_id == "unsorted"
    assert pick(runs, strategy="keep_low", keep_ratio=0.4) is None
    assert rows_where(runs, sort_by_time=True).run_id.tolist() == ["old", "new"]  # NA matches nothing
    assert rows_where(runs).run_id.tolist() == ["old", "new", "unsorted", "other"]


def test_runs_split_by_model_most_experiments_first():
    runs = pd.DataFrame({"run_id": list("abcdef"), "experiment": ["x", "y", "x", "x", "y", "x"],
                         "model": ["Zeta", "Zeta", "Beta", None, "Alpha", "Zeta"]})
    groups = by_model(runs)
    assert list(groups) == ["Zeta", "?", "Alpha", "Beta"]  # Zeta ran 2 experiments; the rest 1 each, by name
    assert {m: g.run_id.tolist() for m, g in groups.items()} == {
        "Zeta": ["a", "b", "f"], "?": ["d"], "Alpha": ["e"], "Beta": ["c"]}
    assert by_model(runs.iloc[:0]) == {}


def test_runs_of_two_models_are_never_paired():
    texts, a, b = two_runs((2.0, 4.0), (2.5, 4.0), (5, 15), (4, 15))  # same text ids
    a, b = a.copy(), b.copy()
    a["model"], b["model"] = "m1", "m1"
    assert effect(texts, a, b, "ppl").est == pytest.approx(100 * (2 ** 1.75 / (2.5 ** 0.25 * 4 ** 0.75) - 1))
    b["model"] = "m2"
    with pytest.raises(ValueError, match="different models"):
        effect(texts, a, b, "ppl")
