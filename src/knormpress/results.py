"""MLflow runs -> tidy tables -> the seed's tables and a verdict per seed claim.

Every number we report is read from a FINISHED run (or from the CSVs exported from runs); the
seed's numbers (`seed_claims`) only fill comparison columns and the ranges that verdicts test.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from knormpress import seed_claims as seed
from knormpress.errors import ConfigError
from knormpress.metrics import LEVEL, N_BOOT, interval, resample_texts, resampled_ppl_acc

IDENTICAL_RTOL = 1e-6  # per-text NLL sums this close: the two runs computed the same thing
MEMORY_TOLERANCE_PP = 1.0  # memory saving is deterministic: a claim holds within +-1 percentage point

PARAMS = {  # tidy column -> MLflow param (dotted key of the resolved config)
    "strategy": "compress.strategy", "keep_ratio": "compress.keep_ratio", "fix_kv_size": "compress.fix_kv_size",
    "sort_by_time": "compress.sort_by_time", "n_sink": "compress.n_sink", "skip_layers": "compress.skip_layers",
    "model": "model.name", "model_source": "model.source", "dataset": "dataset.source",
    "max_tokens": "eval.max_tokens", "n_samples": "eval.n_samples", "eval_seed": "eval.seed",
}
TAGS = {  # tidy column -> MLflow tag; engine is the one that ran (the eval.engine param may say "auto")
    "role": "knormpress.role", "engine": "knormpress.engine", "config_hash": "knormpress.config_hash",
    "baseline_key": "knormpress.baseline_key", "sweep": "knormpress.sweep", "git_commit": "git.commit",
    "git_dirty": "git.dirty",
}
METRICS = [
    "ppl", "ppl_lo", "ppl_hi", "accuracy", "accuracy_lo", "accuracy_hi",
    "baseline_ppl", "baseline_accuracy", "delta_ppl_pct", "delta_ppl_pct_lo", "delta_ppl_pct_hi",
    "delta_accuracy_pct", "delta_accuracy_pct_lo", "delta_accuracy_pct_hi", "n_texts", "n_tokens",
    "kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak", "kv_bytes_mean", "memory_saving_pct", "tokens_per_s", "wall_s",
]
COLUMNS = [
    "run_id", "experiment", "role", "strategy", "keep_ratio", "fix_kv_size", "sort_by_time", "n_sink", "skip_layers",
    *METRICS, "model", "model_source", "dataset", "engine", "max_tokens", "n_samples", "eval_seed",
    "config_hash", "baseline_key", "sweep", "git_commit", "git_dirty", "start_time",
]
INTS = ["fix_kv_size", "n_sink", "n_texts", "n_tokens", "max_tokens", "n_samples", "eval_seed", "start_time"]
FLOATS = ["keep_ratio", *(m for m in METRICS if m not in INTS)]
TEXT_COLUMNS = ["run_id", "text_id", "title", "n_tokens", "nll_sum", "n_correct"]

HOLDS, FAILS, INCONCLUSIVE, UNMEASURABLE = "holds", "does not hold", "inconclusive", "not measurable"
LOWER, HIGHER = (-math.inf, 0.0), (0.0, math.inf)  # claimed ranges that only state a direction


# ---- reading runs -------------------------------------------------------------------------------

def tracking_uri(uri: str | None = None) -> str:
    """The runner's rule (`tracking.resolve_uri`), relative to the current directory."""
    from knormpress.tracking import resolve_uri  # imported late: plotting from CSVs does not need mlflow

    return resolve_uri(uri, Path.cwd())


def _client(uri: str):
    from mlflow.tracking import MlflowClient  # imported late: plotting from CSVs does not need mlflow

    return MlflowClient(uri)


def _tidy(df: pd.DataFrame) -> pd.DataFrame:
    """Fixed columns and dtypes, whether the rows come from MLflow (all strings) or from a CSV."""
    df = df.reindex(columns=COLUMNS)
    for col in INTS:
        df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    for col in FLOATS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("sort_by_time", "git_dirty"):
        df[col] = df[col].astype(str).str.lower().map({"true": True, "false": False}).astype("boolean")
    keys = df.assign(_compressed=df.role.ne("baseline"), _unsorted=~df.sort_by_time.fillna(True))
    keys = keys.sort_values(["experiment", "_compressed", "strategy", "keep_ratio", "_unsorted"], kind="stable")
    return keys.drop(columns=["_compressed", "_unsorted"]).reset_index(drop=True)


def _row(run_id: str, experiment: str, start_time: int, params: dict, tags: dict, metrics: dict) -> dict:
    row = {"run_id": run_id, "experiment": experiment, "start_time": start_time}
    row |= {col: params.get(key) for col, key in PARAMS.items()}
    row |= {col: tags.get(key) for col, key in TAGS.items()}
    row |= {m: metrics.get(m) for m in METRICS}
    row["strategy"] = row["strategy"] or tags.get("knormpress.strategy")
    return row


def _search(client, experiment_ids: list[str], query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _newest(runs: list, experiment: str, key: str) -> pd.DataFrame:
    """Tidy rows of child and single runs (not sweep parents), the newest per `key` column."""
    rows = [_row(r.info.run_id, experiment, r.info.start_time, r.data.params, r.data.tags, r.data.metrics)
            for r in runs if TAGS["role"] in r.data.tags]
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.DataFrame(rows)
    df[key] = df[key].fillna(df.run_id)
    return df.sort_values("start_time").drop_duplicates(key, keep="last")


def _finished_runs(client, experiment) -> pd.DataFrame:
    """FINISHED runs of one experiment, newest per config_hash, plus the baselines they were
    compared with: the runner shares one baseline per model, texts and eval settings across
    experiments, so it may have been logged elsewhere (then: the newest for its baseline_key)."""
    runs = _newest(_search(client, [experiment.experiment_id], "attributes.status = 'FINISHED'"),
                   experiment.name, "config_hash")
    missing = set(runs.baseline_key.dropna()) - set(runs[runs.role == "baseline"].baseline_key)
    if missing:
        everywhere = [e.experiment_id for e in client.search_experiments()]
        query = f"attributes.status = 'FINISHED' and tags.`{TAGS['role']}` = 'baseline'"
        baselines = _newest(_search(client, everywhere, query), experiment.name, "baseline_key")
        runs = pd.concat([runs, baselines[baselines.baseline_key.isin(missing)]], ignore_index=True)
    return runs if runs.empty else _tidy(runs)


def load_runs(experiment: str, uri: str | None = None) -> pd.DataFrame:
    """One tidy row per run of `experiment`; a ConfigError names the experiments that exist."""
    uri = tracking_uri(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = pd.DataFrame() if exp is None else _finished_runs(client, exp)
    if runs.empty:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        problem = "no MLflow experiment" if exp is None else "no finished runs in experiment"
        raise ConfigError(f"{problem} {experiment!r} at {uri}; existing experiments: {names}")
    return runs


def load_all(uri: str | None = None) -> pd.DataFrame:
    """Runs of every experiment that has finished knormpress runs."""
    client = _client(tracking_uri(uri))
    frames = [_finished_runs(client, e) for e in client.search_experiments()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def load_texts(runs: pd.DataFrame, uri: str | None = None) -> pd.DataFrame:
    """Per-text sums (NLL, correct, tokens) from each run's per_token.parquet: what pairs two runs
    text by text. Runs without that artifact contribute no rows."""
    client = _client(tracking_uri(uri))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run is noise
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs.run_id.unique():  # a shared baseline can be listed by several experiments
            if "per_token.parquet" not in {a.path for a in client.list_artifacts(run_id)}:
                continue
            tokens = pd.read_parquet(client.download_artifacts(run_id, "per_token.parquet", tmp))
            frames.append(per_text(run_id, tokens))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TEXT_COLUMNS)


def per_text(run_id: str, tokens: pd.DataFrame) -> pd.DataFrame:
    """Sums per text of a per_token table (text_id, title, position, nll, correct)."""
    by_text = tokens.groupby("text_id", sort=True)
    return pd.DataFrame({
        "run_id": run_id, "title": by_text.title.first(), "n_tokens": by_text.size(),
        "nll_sum": by_text.nll.sum(), "n_correct": by_text.correct.sum(),
    }).reset_index()[TEXT_COLUMNS]


def export(experiment: str, out_dir: str | Path = "results", uri: str | None = None) -> list[Path]:
    """Write results/<experiment>.csv (runs) and results/per_text/<experiment>.csv (text sums)."""
    runs = load_runs(experiment, uri)
    texts = load_texts(runs, uri)
    out = Path(out_dir)
    (out / "per_text").mkdir(parents=True, exist_ok=True)
    paths = [out / f"{experiment}.csv", out / "per_text" / f"{experiment}.csv"]
    runs.to_csv(paths[0], index=False)
    texts.to_csv(paths[1], index=False)
    return paths


def read_results(results_dir: str | Path = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The exported runs and per-text tables of every experiment in `results_dir`."""
    root = Path(results_dir)
    run_files = sorted(root.glob("*.csv"))
    if not run_files:
        raise ConfigError(f"no exported runs in {root}/; run scripts/export_results.py --experiment NAME first")
    runs = _tidy(pd.concat([pd.read_csv(f) for f in run_files], ignore_index=True))
    text_files = sorted((root / "per_text").glob("*.csv"))
    if not text_files:
        return runs, pd.DataFrame(columns=TEXT_COLUMNS)
    texts = pd.concat([pd.read_csv(f) for f in text_files], ignore_index=True)
    return runs, texts.drop_duplicates(["run_id", "text_id"])  # a shared baseline is in several files


# ---- paired effects and verdicts -----------------------------------------------------------------

def pick(runs: pd.DataFrame, strategy: str | None = None, keep_ratio: float | None = None,
         sort_by_time: bool | None = None) -> pd.Series | None:
    """The newest run matching (strategy None = the baseline), or None."""
    if strategy is None:
        rows = runs[runs.role == "baseline"]
    else:
        rows = runs[(runs.role == "compressed") & (runs.strategy == strategy)]
        if keep_ratio is not None:
            rows = rows[np.isclose(rows.keep_ratio, keep_ratio)]
        if sort_by_time is not None:
            rows = rows[rows.sort_by_time == sort_by_time]
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
    """Change of `metric` ("ppl" or "accuracy") from run b to run a, resampling texts jointly
    (same weights for both runs), exactly as the runner's deltas against the baseline."""
    if a is None or b is None:
        return None
    est = 100 * (a[metric] / b[metric] - 1)
    ta, tb = (texts[texts.run_id == r.run_id].set_index("text_id").sort_index() for r in (a, b))
    if ta.empty or not ta.index.equals(tb.index) or not np.array_equal(ta.n_tokens, tb.n_tokens):
        return Effect(est)
    identical = bool(np.allclose(ta.nll_sum, tb.nll_sum, rtol=IDENTICAL_RTOL, atol=0)
                     and np.array_equal(ta.n_correct, tb.n_correct))
    weights = resample_texts(len(ta))
    pick = 0 if metric == "ppl" else 1
    sa, sb = (resampled_ppl_acc(t[["nll_sum", "n_correct", "n_tokens"]].to_numpy(float), weights)[pick] for t in (ta, tb))
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = interval(100 * (sa / sb - 1))
    return Effect(est, lo, hi, identical)


def verdict(e: Effect | None, claimed: tuple[float, float]) -> str:
    """holds: the interval excludes 0 in the claimed direction and reaches the claimed range.
    does not hold: identical runs, or the interval does not reach into the claimed range (it
    lies at or on the wrong side of 0, or is clearly smaller than claimed). Else inconclusive."""
    if e is None or math.isnan(e.est):
        return UNMEASURABLE
    if e.identical:
        return FAILS
    if math.isnan(e.lo):
        return INCONCLUSIVE
    sign = -1.0 if claimed[1] <= 0 else 1.0  # make the claimed direction positive
    near = sign * (claimed[1] if sign < 0 else claimed[0])
    lo, hi = sorted((sign * e.lo, sign * e.hi))
    if hi <= near:
        return FAILS
    return HOLDS if lo > 0 else INCONCLUSIVE


def _combine(verdicts: list[str]) -> str:
    """A claim over several comparisons holds only if each does; one failure decides it."""
    if not verdicts:
        return UNMEASURABLE
    return next((v for v in (FAILS, UNMEASURABLE, INCONCLUSIVE) if v in verdicts), HOLDS)


def _range(claimed: tuple[float, float]) -> str:
    if claimed == LOWER:
        return "< 0%"
    if claimed == HIGHER:
        return "> 0%"
    return f"{claimed[0]:+g} to {claimed[1]:+g}%"


def _claim(text: str, effects: dict[str, Effect | None], claimed: tuple[float, float]) -> dict:
    measured = "; ".join(f"{k}: {e if e is not None else 'no runs'}" for k, e in effects.items())
    return {"claim": text, "claimed": _range(claimed), "measured": measured or "no runs",
            "verdict": _combine([verdict(e, claimed) for e in effects.values()])}


IMPROVEMENTS = {  # seed improvement -> (run a, run b) among keep_low runs of the "ablations" experiment
    "temporal order": ({"keep_ratio": 0.5, "sort_by_time": True}, {"keep_ratio": 0.5, "sort_by_time": False}),
    "mixed retention": ({"keep_ratio": 0.5, "sort_by_time": True}, {"keep_ratio": 0.0, "sort_by_time": True}),
}
CLAIMED = {"temporal order": seed.TEMPORAL_ORDER, "mixed retention": seed.MIXED_RETENTION}
IMPROVEMENT_LABELS = {"temporal order": "sorted vs unsorted", "mixed retention": "keep_ratio 0.5 vs 0"}


def improvement(runs: pd.DataFrame, texts: pd.DataFrame, name: str, metric: str) -> Effect | None:
    """Measured effect of one of the seed's two improvements (sorted vs unsorted; mixed vs pure L2)."""
    ablations = runs[runs.experiment == "ablations"]
    a, b = (pick(ablations, "keep_low", **sel) for sel in IMPROVEMENTS[name])
    return effect(texts, a, b, metric)


def _best_keep_ratio(grid: pd.DataFrame, texts: pd.DataFrame) -> dict:
    lo, hi = seed.BEST_KEEP_RATIO
    text = f"best keep_ratio for keep_low (lowest PPL) is {lo:g}-{hi:g}"
    rows = grid[(grid.role == "compressed") & (grid.strategy == "keep_low")]
    inside = rows.keep_ratio.between(lo - 1e-9, hi + 1e-9)
    if not inside.any() or inside.all():
        return {"claim": text, "claimed": "argmin in range", "measured": "grid lacks ratios on both sides",
                "verdict": UNMEASURABLE}
    best_in, best_out = (rows[m].loc[rows[m].ppl.idxmin()] for m in (inside, ~inside))
    e = effect(texts, best_in, best_out, "ppl")
    argmin = rows.loc[rows.ppl.idxmin(), "keep_ratio"]
    measured = f"argmin r={argmin:g}; best inside (r={best_in.keep_ratio:g}) vs outside (r={best_out.keep_ratio:g}): {e}"
    return {"claim": text, "claimed": "argmin in range", "measured": measured, "verdict": verdict(e, LOWER)}


def _memory(strategies: pd.DataFrame) -> dict:
    text = f"memory saving {seed.MEMORY_SAVING_PCT:g}% (3000 -> 512 tokens)"
    run = pick(strategies, "keep_low", 0.5)
    if run is None or math.isnan(run.memory_saving_pct):
        return {"claim": text, "claimed": f"{seed.MEMORY_SAVING_PCT:g}%", "measured": "no runs", "verdict": UNMEASURABLE}
    ok = abs(run.memory_saving_pct - seed.MEMORY_SAVING_PCT) <= MEMORY_TOLERANCE_PP
    measured = f"{run.memory_saving_pct:.1f}% of KV bytes, uncompressed skip layers included"
    return {"claim": text, "claimed": f"{seed.MEMORY_SAVING_PCT:g}%", "measured": measured,
            "verdict": HOLDS if ok else FAILS}


def claims(runs: pd.DataFrame, texts: pd.DataFrame) -> pd.DataFrame:
    """One row per seed claim: what it says, what we measured, and the verdict (rules above)."""
    strategies, grid = runs[runs.experiment == "strategies"], runs[runs.experiment == "keep_ratio"]
    keep_low = pick(strategies, "keep_low", 0.5)
    rows = [_claim(f"keep_low has {word} than random and recent_only at keep_ratio 0.5",
                   {f"vs {s}": effect(texts, keep_low, pick(strategies, s, 0.5), metric) for s in ("random", "recent_only")},
                   direction)
            for metric, word, direction in (("ppl", "lower PPL", LOWER), ("accuracy", "higher accuracy", HIGHER))]
    ratios = sorted(grid.loc[grid.strategy == "keep_low", "keep_ratio"].dropna().unique())
    rows.append(_claim("keep_low has lower PPL than random at every keep_ratio",
                       {f"r={r:g}": effect(texts, pick(grid, "keep_low", r), pick(grid, "random", r), "ppl")
                        for r in ratios}, LOWER))
    rows.append(_best_keep_ratio(grid, texts))
    for name, ranges in CLAIMED.items():
        for metric, claimed in ranges.items():
            verb = "lowers PPL" if metric == "ppl" else "raises accuracy"
            size = "-".join(f"{v:g}" for v in sorted(map(abs, claimed)))
            rows.append(_claim(f"{name} {verb} by {size}%",
                               {IMPROVEMENT_LABELS[name]: improvement(runs, texts, name, metric)}, claimed))
    rows.append(_memory(strategies))
    return pd.DataFrame(rows)



# ---- the seed's tables rebuilt from our runs ----------------------------------------------------

def _fmt(value: float, lo: float = math.nan, hi: float = math.nan, spec: str = ".2f", scale: float = 1.0) -> str:
    if value is None or pd.isna(value):
        return "—"
    ci = "" if pd.isna(lo) else f" [{scale * lo:{spec}}, {scale * hi:{spec}}]"
    return f"{scale * value:{spec}}{ci}"


def _seed(rows: dict, key: str, field: str, spec: str = ".2f", scale: float = 1.0) -> str:
    value = rows.get(key, {}).get(field)
    return "—" if value is None else f"{scale * value:{spec}}"


def strategy_table(runs: pd.DataFrame, keep_ratio: float, seed_rows: dict) -> pd.DataFrame:
    """Baseline and every strategy at `keep_ratio`, ours (95% CI) beside the seed's number."""
    at_ratio = runs[(runs.role == "compressed") & np.isclose(runs.keep_ratio, keep_ratio)]
    names = list(seed_rows) + sorted(set(at_ratio.strategy.dropna()) - set(seed_rows))
    out = []
    for name in names:
        r = pick(runs) if name == "baseline" else pick(runs, name, keep_ratio)
        get = pd.Series(dtype=float).get if r is None else r.get  # no run: every cell "—"
        out.append({
            "strategy": name,
            "PPL [95% CI]": _fmt(get("ppl"), get("ppl_lo"), get("ppl_hi")),
            "seed PPL": _seed(seed_rows, name, "ppl"),
            "Acc % [95% CI]": _fmt(get("accuracy"), get("accuracy_lo"), get("accuracy_hi"), scale=100),
            "seed Acc %": _seed(seed_rows, name, "accuracy", scale=100),
            "dPPL % [95% CI]": _fmt(get("delta_ppl_pct"), get("delta_ppl_pct_lo"), get("delta_ppl_pct_hi"), "+.1f"),
            "seed dPPL %": _seed(seed_rows, name, "delta_ppl_pct", "+.1f"),
            "dAcc % [95% CI]": _fmt(get("delta_accuracy_pct"), get("delta_accuracy_pct_lo"),
                                    get("delta_accuracy_pct_hi"), "+.1f"),
            "seed dAcc %": _seed(seed_rows, name, "delta_accuracy_pct", "+.1f"),
        })
    return pd.DataFrame(out)


def keep_ratio_table(runs: pd.DataFrame) -> pd.DataFrame:
    """keep_low and random per keep_ratio (table 2), ours (95% CI) beside the seed's number."""
    ours = runs.loc[(runs.role == "compressed") & runs.strategy.isin(["keep_low", "random"]), "keep_ratio"]
    out = []
    for ratio in sorted(set(ours.dropna().round(6)) | set(seed.KEEP_RATIO)):
        row, seeded = {"keep_ratio": f"{ratio:g}"}, seed.KEEP_RATIO.get(ratio, {})
        for metric, i, scale, label in (("ppl", 0, 1, "PPL"), ("accuracy", 1, 100, "Acc %")):
            for strategy in ("keep_low", "random"):
                r = pick(runs, strategy, ratio)
                row[f"{strategy} {label}"] = "—" if r is None else _fmt(
                    r[metric], r[f"{metric}_lo"], r[f"{metric}_hi"], scale=scale)
                row[f"seed {strategy} {label}"] = f"{scale * seeded[strategy][i]:.2f}" if strategy in seeded else "—"
        out.append(row)
    return pd.DataFrame(out)


def describe(runs: pd.DataFrame) -> str:
    """Model, data and sample size of a set of runs, for titles and table captions."""
    if runs.empty:
        return "no runs"
    ref = pick(runs)
    ref = runs.iloc[0] if ref is None else ref

    def values(col: str) -> str:
        return "/".join(sorted({str(v) for v in runs[col].dropna()})) or "?"

    n_texts = "?" if pd.isna(ref.n_texts) else f"{int(ref.n_texts)}"
    n_tokens = "?" if pd.isna(ref.n_tokens) else f"{int(ref.n_tokens):,}"
    return f"{values('model')} on {values('dataset')}, {n_texts} texts, {n_tokens} predicted tokens per run"


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)])


RULES = f"""## How verdicts are decided

- A claim compares two runs on the same texts: the effect is the relative change (%) of PPL or
  accuracy, with a {LEVEL:.0%} paired bootstrap interval over texts ({N_BOOT} resamples, both runs
  resampled with the same texts), the same method as the logged deltas against the baseline.
- **holds**: the interval excludes 0 in the claimed direction and reaches the claimed range
  (an effect larger than claimed still holds).
- **does not hold**: the interval does not reach into the claimed range (it lies at or on the
  wrong side of 0, or is clearly smaller than claimed), or the two runs give identical per-text
  NLLs (rel. tol. {IDENTICAL_RTOL:g}).
- **inconclusive**: anything else, e.g. the interval contains 0, or no per-text data pair the runs.
- **not measurable**: a run the claim needs is missing.
- A claim over several comparisons holds only if every one holds; one "does not hold" decides it.
- Best keep_ratio: the best keep_low run inside the claimed range vs the best one outside it (PPL).
- Memory saving is deterministic: it holds within +-{MEMORY_TOLERANCE_PP:g} percentage point of the claim.
- Seed numbers come from a different setup ({seed.SETUP}); compare
  directions and relative changes, not absolute PPL."""


def summary_markdown(runs: pd.DataFrame, texts: pd.DataFrame) -> str:
    """results/summary.md: setup, verdict per seed claim, and the seed's tables rebuilt from runs."""
    by_exp = {name: runs[runs.experiment == name] for name in runs.experiment.dropna().unique()}
    empty = runs.iloc[:0]
    at_07 = runs[(runs.role == "compressed") & np.isclose(runs.keep_ratio, 0.7)]
    exp_07 = at_07.experiment.iloc[0] if not at_07.empty else None
    setup = [f"- `{name}`: {describe(r)}; {len(r)} runs; engine {'/'.join(sorted(set(r.engine.dropna())))}; "
             f"git {'/'.join(sorted(set(r.git_commit.dropna().str[:8])))}" for name, r in by_exp.items()]
    tables = [
        ("Table 1: strategies at keep_ratio 0.5 (experiment `strategies`)", by_exp.get("strategies", empty),
         strategy_table(by_exp.get("strategies", empty), 0.5, seed.STRATEGIES_AT_0_5)),
        ("Table 2: keep_ratio grid (experiment `keep_ratio`)", by_exp.get("keep_ratio", empty),
         keep_ratio_table(by_exp.get("keep_ratio", empty))),
        ("Table 3: keep_ratio 0.7 (seed: 10-sample means; ours: "
         + (f"experiment `{exp_07}`)" if exp_07 else "not run, no preset uses keep_ratio 0.7)"), by_exp.get(exp_07, empty),
         strategy_table(by_exp.get(exp_07, empty), 0.7, seed.STRATEGIES_AT_0_7)),
    ]
    parts = [
        "# Results: the seed's claims re-measured",
        "Generated by `scripts/make_summary.py` from the runs exported to `results/`; do not edit by hand.",
        RULES, "## Setup", "\n".join(setup) or "no runs",
        "## Seed claims", markdown_table(claims(runs, texts)),
    ]
    for title, exp_runs, table in tables:
        parts += [f"## {title}", f"Ours: {describe(exp_runs)}. Seed: {seed.SETUP}.", markdown_table(table)]
    return "\n\n".join(parts) + "\n"
