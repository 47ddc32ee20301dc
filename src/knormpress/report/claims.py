"""The seed's claims, measured: read them (with the seed's tables and figures) from `claims.yaml`
and decide each one on our runs with the verdict rules of `effects`.

A claim names the experiment whose runs test it and how (its `kind`); the code below knows the
kinds, never the experiments or strategies, so a new claim is a few lines of YAML. Each claim is
decided once per model on that model's runs alone (`effects.by_model`): runs of two models are
never paired, and a claim whose experiment was not run for a model is "not measurable" for it.
`per` splits a claim into one verdict per value of a setting (e.g. per position policy).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from knormpress.errors import ConfigError
from knormpress.report.effects import (FAILS, HIGHER, HOLDS, LOWER, UNKNOWN_MODEL, UNMEASURABLE, Effect, by_model,
                                       combine, effect, no_loss, pick, rows_where, trial_effect, verdict)

CLAIMS_FILE = "claims.yaml"
DIRECTIONS = {"lower": LOWER, "higher": HIGHER}
BEST = {"lowest": ("argmin", "idxmin", LOWER), "highest": ("argmax", "idxmax", HIGHER)}


def load_claims(path: str | Path | None = None) -> dict:
    """The seed's setup, tables, claims and figures (default: the packaged claims.yaml)."""
    source = Path(path) if path else resources.files(__package__) / CLAIMS_FILE
    claims = yaml.safe_load(source.read_text())
    for key in ("setup", "tables", "claims", "figures"):
        if key not in claims:
            raise ConfigError(f"{source}: missing top-level key {key!r}")
    for claim in claims["claims"]:
        if not str(claim.get("key", "")).isidentifier():
            raise ConfigError(f"{source}: claim {claim.get('claim')!r} needs a `key`, a name like keep_low_vs_random_ppl "
                              f"(its name in results/metrics.json), got {claim.get('key')!r}")
        if claim.get("kind") not in KINDS:
            raise ConfigError(f"{source}: claim {claim.get('claim')!r} has unknown kind {claim.get('kind')!r}; "
                              f"choose one of {', '.join(KINDS)}")
    return claims


def claimed_range(claim: dict) -> tuple[float, float]:
    """A paired claim's range in %: [lo, hi] as given, or a direction (lower / higher than 0)."""
    value = claim["claimed"]
    return DIRECTIONS[value] if isinstance(value, str) else (float(value[0]), float(value[1]))


def _range_text(claimed: tuple[float, float]) -> str:
    if claimed == LOWER:
        return "< 0%"
    if claimed == HIGHER:
        return "> 0%"
    return f"{claimed[0]:+g} to {claimed[1]:+g}%"


def _runs_of(claim: dict, runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs.experiment == claim["experiment"]]


def comparisons(claim: dict, runs: pd.DataFrame, texts: pd.DataFrame) -> dict[str, Effect | None]:
    """label -> effect of a paired claim: run `a` against each run in `b` (for every value of
    the `each` column when given)."""
    exp, metric = _runs_of(claim, runs), claim["metric"]
    if "each" not in claim:
        a = pick(exp, **claim["a"])
        return {label: effect(texts, a, pick(exp, **where), metric) for label, where in claim["b"].items()}
    col = claim["each"]
    values = sorted(rows_where(exp, **claim["a"])[col].dropna().unique().tolist())
    return {label.format(v): effect(texts, pick(exp, **claim["a"], **{col: v}), pick(exp, **where, **{col: v}), metric)
            for v in values for label, where in claim["b"].items()}


def _paired(claim: dict, runs: pd.DataFrame, texts: pd.DataFrame) -> dict:
    effects, claimed = comparisons(claim, runs, texts), claimed_range(claim)
    measured = "; ".join(f"{k}: {e if e is not None else 'no runs'}" for k, e in effects.items())
    return {"claimed": _range_text(claimed), "measured": measured or "no runs",
            "verdict": combine([verdict(e, claimed) for e in effects.values()])}


def _best_in_range(claim: dict, runs: pd.DataFrame, texts: pd.DataFrame) -> dict:
    col, metric, (lo, hi) = claim["column"], claim["metric"], claim["range"]
    word, idx, direction = BEST[claim.get("best", "lowest")]
    symbol = claim.get("symbol", col)
    rows = rows_where(_runs_of(claim, runs), **claim["runs"]).dropna(subset=[metric])
    inside = rows[col].between(lo - 1e-9, hi + 1e-9)
    claimed = f"{word} in range"
    if rows.empty:
        return {"claimed": claimed, "measured": "no runs", "verdict": UNMEASURABLE}
    if not inside.any() or inside.all():
        return {"claimed": claimed, "measured": f"runs lack {col} values on both sides of the range",
                "verdict": UNMEASURABLE}
    best_in, best_out = (rows[m].loc[getattr(rows[m][metric], idx)()] for m in (inside, ~inside))
    e = effect(texts, best_in, best_out, metric)
    best = rows.loc[getattr(rows[metric], idx)(), col]
    measured = (f"{word} {symbol}={best:g}; best inside ({symbol}={best_in[col]:g}) vs outside "
                f"({symbol}={best_out[col]:g}): {e}")
    return {"claimed": claimed, "measured": measured, "verdict": verdict(e, direction)}


def _value(claim: dict, runs: pd.DataFrame, texts: pd.DataFrame) -> dict:
    metric, target = claim["metric"], float(claim["claimed"])
    claimed = f"{target:g}{claim.get('unit', '')}"
    run = pick(_runs_of(claim, runs), **claim["run"])
    if run is None or pd.isna(run[metric]):
        return {"claimed": claimed, "measured": "no runs", "verdict": UNMEASURABLE}
    ok = abs(run[metric] - target) <= float(claim.get("tolerance", 0.0))
    beside = pick(_runs_of(claim, runs), **claim["beside"]) if "beside" in claim else None  # a second figure to quote
    also = float("nan") if beside is None else beside[metric]
    return {"claimed": claimed, "measured": claim.get("measured", "{:g}").format(run[metric], also, **run.to_dict()),
            "verdict": HOLDS if ok else FAILS}


def _no_loss(claim: dict, runs: pd.DataFrame, texts: pd.DataFrame) -> dict:
    exp, tolerance = _runs_of(claim, runs), float(claim["tolerance"])
    e = trial_effect(texts, pick(exp, **claim["a"]), pick(exp, role="baseline"))
    return {"claimed": f"no loss (change > -{tolerance:g}%)", "measured": "no runs" if e is None else f"vs baseline: {e}",
            "verdict": no_loss(e, tolerance)}


KINDS: dict[str, Callable[[dict, pd.DataFrame, pd.DataFrame], dict]] = {
    "paired": _paired, "best_in_range": _best_in_range, "value": _value, "no_loss": _no_loss,
}


SELECTORS = ("a", "runs", "run")  # a claim's run selectors; `b` maps labels to selectors


def expanded(claims: dict) -> list[dict]:
    """The claims with each `per: {COLUMN: [values]}` claim split into one claim per value: the
    value joins every run selector and the claim's text (and its improvement's name)."""
    out = []
    for claim in claims["claims"]:
        if "per" not in claim:
            out.append(claim)
            continue
        (col, values), = claim["per"].items()
        for value in values:
            where = {col: value}
            one = {k: v for k, v in claim.items() if k != "per"} | {"claim": f"{claim['claim']} ({col}={value})",
                                                                     "key": f"{claim['key']}_{col}_{value}"}
            one |= {k: claim[k] | where for k in SELECTORS if k in claim}
            if "b" in claim:
                one["b"] = {label: sel | where for label, sel in claim["b"].items()}
            if "improvement" in claim:
                one["improvement"] = f"{claim['improvement']} ({col}={value})"
            out.append(one)
    return out


def _models(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return by_model(runs) or {UNKNOWN_MODEL: runs}  # no runs at all: every claim once, not measurable


def verdicts(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> pd.DataFrame:
    """One row per model and seed claim (per value of its `per` column; models in `by_model`
    order): what it says, what was claimed, what we measured on that model's runs, the verdict, and
    the claim's key."""
    claims = claims or load_claims()
    rows = [{"model": model, "claim": c["claim"]} | KINDS[c["kind"]](c, own, texts) | {"key": c["key"]}
            for model, own in _models(runs).items() for c in expanded(claims)]
    return pd.DataFrame(rows, columns=["model", "claim", "claimed", "measured", "verdict", "key"])


def verdict_metrics(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> dict[str, dict[str, str]]:
    """{model: {claim key: verdict}}: the verdicts in the words of the summary, for results/metrics.json
    (DVC shows and diffs them beside the numbers)."""
    out: dict[str, dict[str, str]] = {}
    for row in verdicts(runs, texts, claims).itertuples():
        out.setdefault(row.model, {})[row.key] = row.verdict
    return out


def notes(claims: dict | None = None) -> list[str]:
    """The claims' `note`s, each once: what a reader needs to read their verdicts."""
    claims = claims or load_claims()
    return list(dict.fromkeys(c["note"].strip() for c in claims["claims"] if "note" in c))


def improvements(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> list[dict]:
    """The paired claims that belong to one of the seed's improvements, per model, each with its
    measured effect (the first comparison) and verdict: what improvement_summary.png draws."""
    claims = claims or load_claims()
    out = []
    for model, own in _models(runs).items():
        for claim in expanded(claims):
            if claim["kind"] != "paired" or "improvement" not in claim:
                continue
            effects = comparisons(claim, own, texts)
            label, e = next(iter(effects.items())) if effects else (next(iter(claim["b"])), None)
            claimed = claimed_range(claim)
            out.append({"model": model, "improvement": claim["improvement"], "label": label,
                        "metric": claim["metric"], "experiment": claim["experiment"], "claimed": claimed,
                        "effect": e, "verdict": verdict(e, claimed)})
    return out


def rule_lines(claims: dict | None = None) -> list[str]:
    """Claim-specific lines for "How verdicts are decided"."""
    claims = claims or load_claims()
    return [c["rule"].format(**c) for c in claims["claims"] if "rule" in c]
