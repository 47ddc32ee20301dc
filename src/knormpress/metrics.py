"""Perplexity and accuracy for one text and for many, with bootstrap intervals over texts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class EvalResult:
    """Per-token outcome of reading one text, plus the KV cache it took.

    nll, correct: (T-1,) for predicting tokens 1..T-1. kv_tokens_*: tokens held per layer and
    KV head (mean over layers) when a query starts; kv_bytes_*: keys + values of all layers.
    """

    nll: torch.Tensor
    correct: torch.Tensor
    kv_tokens_peak: float
    kv_tokens_mean: float
    kv_bytes_peak: float
    kv_bytes_mean: float
    engine: str
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

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
    nll = torch.cat([r.nll.double() for r in results])
    correct = torch.cat([r.correct.double() for r in results])
    return math.exp(nll.mean().item()), correct.mean().item()


def _per_text(results: Sequence[EvalResult]) -> np.ndarray:
    """(n_texts, 3): summed NLL, correct count, token count per text."""
    return np.array([[r.nll.double().sum().item(), r.correct.double().sum().item(), r.n_tokens] for r in results])


def _percentile(samples: np.ndarray, q: float) -> float:
    """NaN when some resample has no defined value (e.g. a relative change from 0)."""
    return float(np.percentile(samples, q)) if np.isfinite(samples).all() else math.nan


def summarize(
    results: Sequence[EvalResult],
    baseline: Sequence[EvalResult] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Pooled PPL/accuracy, bootstrap CIs over texts and, given a baseline on the same texts
    (same order), paired deltas in percent of the baseline with their CIs.

    Texts, not tokens, are resampled: tokens within a text are far from independent.
    With very few texts the interval is wide, as it should be.
    """
    stats = _per_text(results)
    ppl, acc = pooled(results)
    out = {"ppl": ppl, "accuracy": acc, "n_texts": len(results), "n_tokens": int(stats[:, 2].sum())}
    weights = np.random.default_rng(seed).multinomial(len(results), [1 / len(results)] * len(results), n_boot)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def boot_ppl_acc(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tot = weights @ s
        return np.exp(tot[:, 0] / tot[:, 2]), tot[:, 1] / tot[:, 2]

    b_ppl, b_acc = boot_ppl_acc(stats)
    out |= {"ppl_lo": _percentile(b_ppl, lo), "ppl_hi": _percentile(b_ppl, hi)}
    out |= {"accuracy_lo": _percentile(b_acc, lo), "accuracy_hi": _percentile(b_acc, hi)}
    if baseline is not None:
        if [r.n_tokens for r in baseline] != [r.n_tokens for r in results]:
            raise ValueError("baseline and results must cover the same texts in the same order")
        base_ppl, base_acc = pooled(baseline)
        r_ppl, r_acc = boot_ppl_acc(_per_text(baseline))
        with np.errstate(divide="ignore", invalid="ignore"):  # a baseline accuracy of 0 has no relative change
            d_ppl, d_acc = 100 * (b_ppl / r_ppl - 1), 100 * (b_acc / r_acc - 1)
        out |= {
            "baseline_ppl": base_ppl,
            "baseline_accuracy": base_acc,
            "delta_ppl_pct": 100 * (ppl / base_ppl - 1),
            "delta_ppl_pct_lo": _percentile(d_ppl, lo),
            "delta_ppl_pct_hi": _percentile(d_ppl, hi),
            "delta_accuracy_pct": 100 * (acc / base_acc - 1) if base_acc else math.nan,
            "delta_accuracy_pct_lo": _percentile(d_acc, lo),
            "delta_accuracy_pct_hi": _percentile(d_acc, hi),
        }
    return out
