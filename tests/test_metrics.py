import math

import pytest
import torch

from knormpress import EvalResult, pooled, summarize


def result(nll, correct):
    return EvalResult(torch.tensor(nll), torch.tensor(correct), 1, 1, 1, 1, "streaming")


def test_pooled_is_exp_of_mean_nll_over_all_tokens():
    a, b = result([1.0, 2.0], [True, False]), result([3.0], [True])
    ppl, acc = pooled([a, b])
    assert ppl == pytest.approx(math.exp(2.0)) and acc == pytest.approx(2 / 3)


def test_bootstrap_interval_brackets_the_estimate_and_paired_delta():
    g = torch.Generator().manual_seed(0)
    base = [result((torch.rand(100, generator=g) * 4).tolist(), (torch.rand(100, generator=g) < 0.3).tolist())
            for _ in range(8)]
    worse = [result((r.nll + 0.1).tolist(), r.correct.tolist()) for r in base]
    s = summarize(worse, base)
    assert s["ppl_lo"] <= s["ppl"] <= s["ppl_hi"] and s["n_texts"] == 8 and s["n_tokens"] == 800
    assert s["delta_ppl_pct"] == pytest.approx(100 * (math.exp(0.1) - 1))
    # every text got exactly 0.1 nats worse, so the paired interval is tight around the delta
    assert s["delta_ppl_pct_hi"] - s["delta_ppl_pct_lo"] < 1e-6
    assert s["delta_accuracy_pct"] == 0


def test_baseline_must_cover_the_same_texts():
    with pytest.raises(ValueError, match="same texts"):
        summarize([result([1.0], [True])], [result([1.0, 2.0], [True, True])])


def test_zero_baseline_accuracy_gives_nan_relative_change_not_a_crash():
    s = summarize([result([1.0, 2.0], [True, False])], [result([1.0, 1.0], [False, False])])
    assert math.isnan(s["delta_accuracy_pct"]) and math.isnan(s["delta_accuracy_pct_lo"])
    assert s["delta_ppl_pct"] == pytest.approx(100 * (math.exp(1.5) / math.e - 1))


@pytest.mark.parametrize("k,n,lo,hi", [(10, 10, 0.7225, 1.0), (5, 10, 0.2366, 0.7634), (0, 4, 0.0, 0.4899)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    from knormpress.metrics import wilson

    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-4)
