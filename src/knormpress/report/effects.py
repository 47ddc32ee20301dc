"""Paired effects between two runs and the rules that turn an effect into a verdict on a claim.

An effect is the relative change (%) of a metric from run b to run a. For ppl and accuracy its
interval is a paired bootstrap over texts that resamples both runs with the same weights, the
runner's own resampling (`knormpress.metrics`), so it matches the logged deltas to the baseline.
Two runs of different models are never compared: split the runs with `by_model` first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from knormpress.metrics import interval, resample_texts, resampled_ppl_acc

IDENTICAL_RTOL = 1e-6  # per-text NLL sums this close: the two runs computed the same thing
HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE = "holds", "does not hold", "inconclusive", "not measurable"
DIRECTION = "direction holds"  # the verdict for an effect in the claimed direction but outside the claimed range ...
LARGER, SMALLER = DIRECTION + ", {:.2g}x larger than claimed", DIRECTION + ", {:.2g}x smaller than claimed"  # ... and how far
LOWER, HIGHER = (-math.inf, 0.0), (0.0, math.inf)  # claimed ranges that only state a direction
SUMS = ["nll_sum", "n_correct", "n_tokens"]  # per-text columns the bootstrap needs
BOOTSTRAPPED = {"ppl": 0, "accuracy": 1}  # metric -> its place in resampled_ppl_acc's answer
UNKNOWN_MODEL = "?"  # the model of runs that did not log one


def by_model(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The runs of each model (from the `model` column), the model with the most experiments
    first, then by name: the order of every per-model section and panel of the report."""
    names = runs.model.fillna(UNKNOWN_MODEL).astype(str)
    groups = {name: runs[names == name] for name in names.unique()}
    return dict(sorted(groups.items(), key=lambda item: (-item[1].experiment.nunique(), item[0])))


def rows_where(runs: pd.DataFrame, **where) -> pd.DataFrame:
    """Runs whose columns equal `where` (numbers within isclose; None: any value). Only
    compressed runs unless `role` is given: `rows_where(runs, role="baseline")`."""
    keep = np.ones(len(runs), dtype=bool)
    for col, value in ({"role": "compressed"} | where).items():
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            keep &= np.isclose(runs[col].to_numpy(float, na_value=np.nan), value)
        else:
            keep &= (runs[col] == value).fillna(False).to_numpy(bool)
    return runs[keep]


def pick(runs: pd.DataFrame, **where) -> pd.Series | None:
    """The newest of `rows_where(runs, **where)`, or None."""
    rows = rows_where(runs, **where)
    return None if rows.empty else rows.sort_values("start_time").iloc[-1]


@dataclass(frozen=True)
class Effect:
    """Relative change (%) of a metric from run b to run a; the 95% interval is a paired bootstrap
    over texts (nan without per-text data). `identical`: both runs gave the same per-text NLLs."""

    est: float
    lo: float = math.nan
    hi: float = math.nan
    identical: bool = False

    def __str__(self) -> str:
        if self.identical:
            return f"{self.est:+.2f}% (identical per-text NLLs)"
        return f"{self.est:+.2f}%" + ("" if math.isnan(self.lo) else f" [{self.lo:+.2f}, {self.hi:+.2f}]")


def effect(texts: pd.DataFrame, a: pd.Series | None, b: pd.Series | None, metric: str) -> Effect | None:
    """Change of `metric` from run b to run a (None if either run is missing). ppl and accuracy
    get a paired interval when per-text sums of both runs cover the same texts; other metrics
    (or unpaired runs) only the point estimate."""
    if a is None or b is None:
        return None
    if _model(a) != _model(b):
        raise ValueError(f"runs {a.run_id} and {b.run_id} are of different models; compare runs within by_model")
    est = 100 * (a[metric] / b[metric] - 1)
    if metric not in BOOTSTRAPPED or not set(SUMS) <= set(texts.columns):
        return Effect(est)
    ta, tb = (texts[texts.run_id == r.run_id].set_index("text_id").sort_index() for r in (a, b))
    if ta.empty or not ta.index.equals(tb.index) or not np.array_equal(ta.n_tokens, tb.n_tokens):
        return Effect(est)
    identical = bool(np.allclose(ta.nll_sum, tb.nll_sum, rtol=IDENTICAL_RTOL, atol=0)
                     and np.array_equal(ta.n_correct, tb.n_correct))
    weights = resample_texts(len(ta))
    sa, sb = (resampled_ppl_acc(t[SUMS].to_numpy(float), weights)[BOOTSTRAPPED[metric]] for t in (ta, tb))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = interval(100 * (sa / sb - 1))
    return Effect(est, lo, hi, identical)


def _model(run: pd.Series) -> str:
    model = run.get("model")
    return UNKNOWN_MODEL if model is None or pd.isna(model) else str(model)


def trial_effect(texts: pd.DataFrame, a: pd.Series | None, b: pd.Series | None) -> Effect | None:
    """Change (%) of accuracy from run b to run a over the same retrieval trials (per-text rows with a
    `correct` column), with a paired bootstrap interval over trials; None if either run is missing."""
    if a is None or b is None:
        return None
    if _model(a) != _model(b):
        raise ValueError(f"runs {a.run_id} and {b.run_id} are of different models; compare runs within by_model")
    est = 100 * (a.accuracy / b.accuracy - 1) if b.accuracy else math.nan
    if "correct" not in texts.columns:
        return Effect(est)
    ta, tb = (texts[texts.run_id == r.run_id].set_index("text_id").sort_index() for r in (a, b))
    if ta.empty or not ta.index.equals(tb.index):
        return Effect(est)
    ca, cb = (t.correct.astype(str).str.lower().eq("true").to_numpy(float) for t in (ta, tb))
    weights = resample_texts(len(ca))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = interval(100 * ((weights @ ca) / (weights @ cb) - 1))
    return Effect(est, lo, hi, bool(np.array_equal(ca, cb)))


def _settled(e: Effect | None, identical: str) -> str | None:
    """The verdict before the interval is read: unmeasurable without an estimate, `identical` for
    identical runs, inconclusive without an interval; None when the interval decides."""
    if e is None or math.isnan(e.est):
        return UNMEASURABLE
    if e.identical:
        return identical
    return INCONCLUSIVE if math.isnan(e.lo) else None


def no_loss(e: Effect | None, tolerance: float) -> str:
    """A claim of no loss: holds when the whole interval lies above -tolerance (%), does not hold
    when it lies below, else inconclusive (identical runs hold: nothing was lost)."""
    if (settled := _settled(e, HOLDS)) is not None:
        return settled
    return HOLDS if e.lo > -tolerance else FAILS if e.hi < -tolerance else INCONCLUSIVE


def verdict(e: Effect | None, claimed: tuple[float, float]) -> str:
    """The verdict on a claimed change, read from the effect's interval [lo, hi]:

    - holds: the interval excludes 0 in the claimed direction and overlaps the claimed range (a
      direction-only claim: excludes 0 on the claimed side);
    - direction holds, N x larger than claimed: it excludes 0 in the claimed direction but lies
      wholly beyond the range, N = estimate / the range's far end;
    - direction holds, N x smaller than claimed: likewise but wholly short of the range, N = the
      range's near end / estimate;
    - does not hold: identical runs, an interval at or on the wrong side of 0, or one that contains
      0 and cannot reach into the claimed range;
    - inconclusive: the interval contains 0 and reaches into the claimed range (or has no interval).
    """
    if (settled := _settled(e, FAILS)) is not None:
        return settled
    sign = -1.0 if claimed[1] <= 0 else 1.0  # make the claimed direction positive
    near, far = sorted(abs(b) for b in claimed)
    lo, hi = sorted((sign * e.lo, sign * e.hi))
    est = sign * e.est
    if lo > 0:  # the direction is established
        if lo > far:
            return LARGER.format(est / far)
        if hi < near:
            return SMALLER.format(near / est)
        return HOLDS
    return FAILS if hi <= near else INCONCLUSIVE  # near = 0 for a direction-only claim


def category(verdict: str) -> str:
    """The verdict's kind without its factor: holds, direction holds, does not hold, inconclusive or
    not measurable (what a figure colours and a count groups by)."""
    return DIRECTION if verdict.startswith(DIRECTION) else verdict


def combine(verdicts: list[str]) -> str:
    """A claim over several comparisons holds only if each does; one failure decides it, then a
    missing run, an open interval, and last a comparison whose size differs from the claim."""
    if not verdicts:
        return UNMEASURABLE
    for kind in (FAILS, UNMEASURABLE, INCONCLUSIVE, DIRECTION):
        found = next((v for v in verdicts if category(v) == kind), None)
        if found is not None:
            return found
    return HOLDS
