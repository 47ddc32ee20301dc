import math

import numpy as np
import pytest
import torch

from knormpress import EvalResult, pooled, summarize


def result(nll, correct):
    return EvalResult(torch.tensor(nll), torch.tensor(correct), 1, 1, 1, 1, 1, 1, "streaming")


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


def test_intervals_are_the_bootstrap_percentiles_written_out():
    """Each resample draws the texts with replacement (the same draws for the run and its baseline: paired);
    the interval is the 2.5th and 97.5th percentile of the pooled values over the resamples."""
    g = torch.Generator().manual_seed(3)
    lengths = [40, 90, 60, 150, 75, 120, 30]
    base = [result((torch.rand(n, generator=g, dtype=torch.float64) * 5).tolist(), (torch.rand(n, generator=g) < 0.4).tolist())
            for n in lengths]
    run = [result((r.nll + torch.rand(len(r.nll), generator=g, dtype=torch.float64)).tolist(),
                  (torch.rand(len(r.nll), generator=g) < 0.35).tolist()) for r in base]
    got = summarize(run, base, n_boot=400, seed=7)
    rng, n = np.random.default_rng(7), len(lengths)
    draws = {"ppl": [], "accuracy": [], "delta_ppl_pct": [], "delta_accuracy_pct": []}
    for _ in range(400):
        counts = rng.multinomial(n, [1 / n] * n)  # how often each text is drawn in this resample
        pooled_of = {}
        for name, texts in (("run", run), ("base", base)):
            tokens = sum(c * r.n_tokens for c, r in zip(counts, texts))
            nll = sum(c * r.nll.double().sum().item() for c, r in zip(counts, texts))
            hits = sum(c * r.correct.double().sum().item() for c, r in zip(counts, texts))
            pooled_of[name] = (math.exp(nll / tokens), hits / tokens)
        (ppl, acc), (base_ppl, base_acc) = pooled_of["run"], pooled_of["base"]
        draws["ppl"].append(ppl)
        draws["accuracy"].append(acc)
        draws["delta_ppl_pct"].append(100 * (ppl / base_ppl - 1))
        draws["delta_accuracy_pct"].append(100 * (acc / base_acc - 1))
    for name, values in draws.items():
        lo, hi = np.percentile(values, [2.5, 97.5])
        assert (got[f"{name}_lo"], got[f"{name}_hi"]) == pytest.approx((lo, hi), rel=1e-12), name
