"""Perplexity and accuracy for one text and for many, with bootstrap intervals over texts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class EvalResult:
    """Per-token outcome of reading one text, plus the KV cache it took.

    nll, correct: (T-1,) for predicting tokens 1..T-1. kv_tokens_*: tokens held per layer and
    KV head (mean over layers) when a query starts; kv_bytes_*: keys + values of all layers;
    *_last: when the last query starts.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    kv_tokens_peak: float
    kv_tokens_mean: float
    kv_bytes_peak: float
    kv_bytes_mean: float
    kv_tokens_last: float  # when the last query starts: the end of the text
    kv_bytes_last: float
    engine: str
    wall_s: float = 0.0

    @property
    def n_tokens(self) -> int:
        return int(self.nll.numel())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.double().mean().item())

    @property
    def accuracy(self) -> float:
        return self.correct.double().mean().item()


def pooled(results: Sequence[EvalResult]) -> tuple[float, float]:
    """PPL = exp(mean NLL over all predicted tokens of all texts); accuracy likewise pooled."""
    import torch  # here, so the report (which uses the bootstrap below) starts without torch

    nll = torch.cat([r.nll.double() for r in results])
    correct = torch.cat([r.correct.double() for r in results])
    return math.exp(nll.mean().item()), correct.mean().item()


N_BOOT, LEVEL = 2000, 0.95


def per_text_sums(results: Sequence[EvalResult]) -> np.ndarray:
    """(n_texts, 3): summed NLL, correct count, token count per text; all the bootstrap needs."""
    return np.array([[r.nll.double().sum().item(), r.correct.double().sum().item(), r.n_tokens] for r in results])


def resample_texts(n_texts: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap weights (n_boot, n_texts): how often each text is drawn in each resample. Using
    the same weights for two runs on the same texts gives the paired interval."""
    return np.random.default_rng(seed).multinomial(n_texts, np.full(n_texts, 1 / n_texts), n_boot)


def resampled_ppl_acc(sums: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled PPL and accuracy of each resample, from `per_text_sums`-shaped rows."""
    tot = weights @ sums
    return np.exp(tot[:, 0] / tot[:, 2]), tot[:, 1] / tot[:, 2]


def interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval; NaN when some resample has no defined value (e.g. a change from 0)."""
    if not np.isfinite(samples).all():
        return math.nan, math.nan
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def summarize(
    results: Sequence[EvalResult],
    baseline: Sequence[EvalResult] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, float]:
    """Pooled PPL/accuracy, bootstrap CIs over texts and, given a baseline on the same texts
    (same order), paired deltas in percent of the baseline with their CIs.

    Texts, not tokens, are resampled: tokens within a text are far from independent.
    With very few texts the interval is wide, as it should be.
    """
    sums = per_text_sums(results)
    ppl, acc = pooled(results)
    out = {"ppl": ppl, "accuracy": acc, "n_texts": len(results), "n_tokens": int(sums[:, 2].sum())}
    weights = resample_texts(len(results), n_boot, seed)
    b_ppl, b_acc = resampled_ppl_acc(sums, weights)
    out |= dict(zip(("ppl_lo", "ppl_hi"), interval(b_ppl, level)))
    out |= dict(zip(("accuracy_lo", "accuracy_hi"), interval(b_acc, level)))
    if baseline is not None:
        if [r.n_tokens for r in baseline] != [r.n_tokens for r in results]:
            raise ValueError("baseline and results must cover the same texts in the same order")
        base_ppl, base_acc = pooled(baseline)
        r_ppl, r_acc = resampled_ppl_acc(per_text_sums(baseline), weights)
        with np.errstate(divide="ignore", invalid="ignore"):  # a baseline accuracy of 0 has no relative change
            d_ppl, d_acc = 100 * (b_ppl / r_ppl - 1), 100 * (b_acc / r_acc - 1)
        out |= {
            "baseline_ppl": base_ppl,
            "baseline_accuracy": base_acc,
            "delta_ppl_pct": 100 * (ppl / base_ppl - 1),
            "delta_accuracy_pct": 100 * (acc / base_acc - 1) if base_acc else math.nan,
        }
        out |= dict(zip(("delta_ppl_pct_lo", "delta_ppl_pct_hi"), interval(d_ppl, level)))
        out |= dict(zip(("delta_accuracy_pct_lo", "delta_accuracy_pct_hi"), interval(d_acc, level)))
    return out


def wilson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: exact-enough coverage for few trials, and
    never outside [0, 1] (unlike the normal approximation), so 10 out of 10 still has a lower bound."""
    if trials == 0:
        return math.nan, math.nan
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
