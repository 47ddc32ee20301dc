"""results/summary.md: the verdict rules, the setup, a verdict per seed claim, the seed's tables
rebuilt from our runs beside the seed's numbers, and every experiment's runs with their metrics.

Which tables, claims and experiments come from `claims.yaml`; any other experiment or task in the
results simply appears in the last section with whatever metrics its runs logged. With runs of
several models (the `model` column), the setup, the claims, the seed's tables and the runs are
given per model, in `effects.by_model` order (most experiments first, then by name); claims and
tables only for the models that ran an experiment they name. One model: no model headings.
"""

from __future__ import annotations

import math

import pandas as pd

from knormpress.metrics import LEVEL, N_BOOT
from knormpress.report.agreement import engine_lines
from knormpress.report.kvpress_parity import parity_block
from knormpress.report.claims import load_claims, notes, rule_lines, verdicts
from knormpress.report.diagnose_summary import section as diagnose_section
from knormpress.report.effects import IDENTICAL_RTOL, UNKNOWN_MODEL, by_model, effect, pick, rows_where
from knormpress.report.runs import HEAD, RUNNER_METRICS, metric_columns, task_class
from knormpress.report.timings import timing_lines

LEAD = ["strategy", "keep_ratio", "fix_kv_size", "ratio", "when"]  # the budget, shown first; then the other settings
COMPRESS = LEAD + [c for c in HEAD[HEAD.index("strategy"):] if c not in LEAD]  # in the tables' column order
SETTINGS = COMPRESS + ["task", "model", "dataset", "max_tokens", "n_samples", "eval_seed"]


def _fmt(value: float, lo: float = math.nan, hi: float = math.nan, spec: str = ".2f", scale: float = 1.0) -> str:
    if value is None or pd.isna(value):
        return "—"
    ci = "" if pd.isna(lo) else f" [{scale * lo:{spec}}, {scale * hi:{spec}}]"
    return f"{scale * value:{spec}}{ci}"


def _seed(rows: dict, key, field: str, spec: str = ".2f", scale: float = 1.0) -> str:
    value = rows.get(key, {}).get(field)
    return "—" if value is None else f"{scale * value:{spec}}"


def markdown_table(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)])


def describe(runs: pd.DataFrame) -> str:
    """Model, data and sample size of a set of runs, for titles and table captions."""
    if runs.empty:
        return "no runs"
    ref = pick(runs, role="baseline")
    ref = runs.iloc[0] if ref is None else ref

    def values(col: str) -> str:
        return "/".join(sorted({str(v) for v in runs[col].dropna()})) or "?"

    def count(metric: str) -> str:
        value = ref.get(metric)
        return "?" if value is None or pd.isna(value) else f"{int(value):,}"

    read = ", ".join(f"{count(m)} {words}" for m, words in task_class(ref.get("task")).sizes.items())
    data = task_class(ref.get("task")).reads or values("dataset")
    return f"{values('model')} on {data}, {read} per run"


def _by_experiment(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {name: runs[runs.experiment == name] for name in runs.experiment.dropna().unique()}


def _suffix(model: str, models: dict) -> str:
    """What a heading adds to name its model: nothing when there is only one."""
    return f" — {model}" if len(models) > 1 else ""


# ---- the seed's tables (each from one model's runs) -------------------------------------------------

def strategy_table(runs: pd.DataFrame, keep_ratio: float, seed_rows: dict) -> pd.DataFrame:
    """Baseline and every strategy at `keep_ratio`, ours (95% CI) beside the seed's number."""
    at_ratio = rows_where(runs, keep_ratio=keep_ratio)
    names = list(seed_rows) + sorted(set(at_ratio.strategy.dropna()) - set(seed_rows))
    out = []
    for name in names:
        r = pick(runs, role="baseline") if name == "baseline" else pick(runs, strategy=name, keep_ratio=keep_ratio)
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


def grid_table(runs: pd.DataFrame, strategies: list[str], seed_grid: dict) -> pd.DataFrame:
    """`strategies` per keep_ratio, ours (95% CI) beside the seed's number."""
    ours = runs.loc[(runs.role == "compressed") & runs.strategy.isin(strategies), "keep_ratio"]
    out = []
    for ratio in sorted(set(ours.dropna().round(6)) | set(seed_grid)):
        row, seeded = {"keep_ratio": f"{ratio:g}"}, seed_grid.get(ratio, {})
        for metric, scale, label in (("ppl", 1, "PPL"), ("accuracy", 100, "Acc %")):
            for strategy in strategies:
                r = pick(runs, strategy=strategy, keep_ratio=ratio)
                row[f"{strategy} {label}"] = "—" if r is None else _fmt(
                    r[metric], r[f"{metric}_lo"], r[f"{metric}_hi"], scale=scale)
                row[f"seed {strategy} {label}"] = _seed(seeded, strategy, metric, scale=scale)
        out.append(row)
    return pd.DataFrame(out)


def seed_tables(runs: pd.DataFrame, claims: dict | None = None) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The seed's tables rebuilt from `runs`: (title, the experiment's runs, table) each, every
    table once per model (`by_model` order; the title names the model when there are several)."""
    claims = claims or load_claims()
    models = by_model(runs) or {UNKNOWN_MODEL: runs}
    return [(title + _suffix(model, models), exp, table)
            for model, own in models.items() for title, exp, table in _model_tables(own, claims)]


def _model_tables(runs: pd.DataFrame, claims: dict) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The seed's tables from one model's runs. A table whose experiment is null uses the first
    experiment with compressed runs at its keep_ratio."""
    by_exp = _by_experiment(runs)
    out = []
    for number, spec in enumerate(claims["tables"], 1):
        name, ratio = spec.get("experiment"), spec.get("keep_ratio")
        if name is None:
            name = next((n for n, r in by_exp.items() if not rows_where(r, keep_ratio=ratio).empty), None)
        where = f"experiment `{name}`" if name else f"not run, no preset uses keep_ratio {ratio:g}"
        note = f"seed: {spec['note']}; ours: " if "note" in spec else ""
        exp = by_exp.get(name, runs.iloc[:0])
        if spec["kind"] == "grid":  # no strategies named: every compressed one
            strategies = spec.get("strategies") or sorted(rows_where(exp).strategy.dropna().unique())
            table = grid_table(exp, strategies, spec["seed"])
        else:
            table = strategy_table(exp, ratio, spec["seed"])
        out.append((f"Table {number}: {spec['title']} ({note}{where})", exp, table))
    return out


# ---- our sweeps beyond the seed's claims ------------------------------------------------------------

SWEEP_MEMORY = ["kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak"]


def sweep_table(runs: pd.DataFrame, texts: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """One row per value of the swept `column`: PPL and accuracy (95% CI), the paired PPL and
    accuracy effect against the `reference` value's run on the same texts, and the memory held."""
    exp, col = runs[runs.experiment == spec["experiment"]], spec["column"]
    ref = pick(exp, **{col: spec["reference"]})
    out = []
    for value in sorted(rows_where(exp)[col].dropna().unique().tolist()):
        r = pick(exp, **{col: value})
        row = {col: _num(value), "PPL [95% CI]": _fmt(r.ppl, r.ppl_lo, r.ppl_hi),
               "Acc % [95% CI]": _fmt(r.accuracy, r.accuracy_lo, r.accuracy_hi, scale=100)}
        for metric, label in (("ppl", "PPL"), ("accuracy", "Acc")):
            e = effect(texts, r, ref, metric)
            row[f"d{label} % vs {col}={_num(spec['reference'])}"] = "no reference run" if e is None else str(e)
        out.append(row | {m: _num(r.get(m)) for m in SWEEP_MEMORY})
    return pd.DataFrame(out)


def _sweeps(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict, suffix: str = "") -> list[str]:
    """One section per `sweeps` entry of claims.yaml that this model's runs swept."""
    parts = []
    for spec in claims.get("sweeps", []):
        exp = runs[runs.experiment == spec["experiment"]]
        table = sweep_table(runs, texts, spec)
        if not table.empty:
            parts += [f"## {spec['title']}{suffix}", f"{describe(exp)}. {spec.get('note', '')}".strip(),
                      markdown_table(table)]
    return parts


# ---- every experiment, any task --------------------------------------------------------------------

def _num(value) -> str:
    if value is None or pd.isna(value):
        return "—"
    value = float(value)
    return f"{value:.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:#.4g}"


def task_metrics(runs: pd.DataFrame) -> list[str]:
    """Metrics of the runs' task that some run logged (runner metrics and interval bounds aside)."""
    return [m for m in metric_columns(runs) if m not in RUNNER_METRICS and not m.endswith(("_lo", "_hi"))
            and runs[m].notna().any()]


def run_table(runs: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The settings all compressed runs share, and one row per run: the settings that differ,
    then each task metric as `x [lo, hi]` (bounds where logged)."""
    compressed = runs[runs.role != "baseline"]
    differ = [c for c in SETTINGS if c == "strategy" or compressed[c].astype(str).nunique() > 1]
    same = [c for c in COMPRESS if c not in differ and compressed[c].notna().any()]
    shared = ", ".join(f"{c}={compressed[c].iloc[0]}" for c in same)
    rows = []
    for _, r in runs.iterrows():
        row = {"run": str(r.run_id)[:8]}
        for c in differ:  # a baseline has no compression settings
            row[c] = ("baseline" if c == "strategy" else "—") if r.role == "baseline" and c in COMPRESS else str(r[c])
        for m in task_metrics(runs):
            bounds = [r.get(f"{m}_{end}") for end in ("lo", "hi")]
            ci = "" if any(b is None or pd.isna(b) for b in bounds) else f" [{_num(bounds[0])}, {_num(bounds[1])}]"
            row[m] = _num(r[m]) + (ci if not pd.isna(r[m]) else "")
        rows.append(row)
    return shared, pd.DataFrame(rows)


def _experiments(runs: pd.DataFrame, models: dict[str, pd.DataFrame]) -> list[str]:
    parts = ["## Runs per experiment",
             "Every exported run with its task's metrics (95% CI in brackets where logged)."]
    for name in runs.experiment.dropna().unique():
        for model, own in models.items():
            exp = own[own.experiment == name]
            if exp.empty:
                continue
            shared, table = run_table(exp)
            tasks = "/".join(sorted(set(exp.task.dropna()))) or "not recorded"
            line = f"{describe(exp)}; task {tasks}" + (f"; compressed runs share {shared}" if shared else "") + "."
            parts += [f"### `{name}`{_suffix(model, models)}", line, markdown_table(table)]
    return parts


def _setup(models: dict[str, pd.DataFrame]) -> list[str]:
    """One line per experiment, under a heading per model when there are several."""
    parts = []
    for model, own in models.items():
        parts += [f"### {model}"] if len(models) > 1 else []
        parts.append("\n".join(
            f"- `{name}`: {describe(r)}; {len(r)} runs; engine {'/'.join(sorted(set(r.engine.dropna())))}; "
            f"git {'/'.join(sorted(set(r.git_commit.dropna().astype(str).str[:8])))}"
            for name, r in _by_experiment(own).items()))
    return parts or ["no runs"]


def seed_models(runs: pd.DataFrame, claims: dict) -> dict[str, pd.DataFrame]:
    """The runs of each model that ran an experiment a seed claim or table names (every model if
    none did), in `by_model` order: the models that get the seed's claims and tables."""
    named = ({c["experiment"] for c in claims["claims"]} | {t.get("experiment") for t in claims["tables"]}
             | {s["experiment"] for s in claims.get("sweeps", [])})
    models = by_model(runs) or {UNKNOWN_MODEL: runs}
    return {m: own for m, own in models.items() if own.experiment.isin(named).any()} or models


# ---- the whole summary -----------------------------------------------------------------------------

def rules(claims: dict) -> str:
    lines = [
        "## How verdicts are decided", "",
        "- A claim compares two runs on the same texts: the effect is the relative change (%) of PPL or",
        f"  accuracy, with a {LEVEL:.0%} paired bootstrap interval over texts ({N_BOOT} resamples, both runs",
        "  resampled with the same texts), the same method as the logged deltas against the baseline.",
        "- **holds**: the interval excludes 0 in the claimed direction and overlaps the claimed range",
        "  (for a claim of a direction only: excludes 0 on the claimed side).",
        "- **direction holds, N x larger than claimed** / **N x smaller than claimed**: the interval",
        "  excludes 0 in the claimed direction but lies wholly beyond (short of) the claimed range; N is the",
        "  estimate over the range's far end (the range's near end over the estimate). The effect is real",
        "  but is not the claimed effect: read the measured column.",
        "- **does not hold**: the interval lies at or on the wrong side of 0, or contains 0 and cannot",
        f"  reach into the claimed range, or the two runs give identical per-text NLLs (rel. tol. {IDENTICAL_RTOL:g}).",
        "- **inconclusive**: the interval contains 0 and reaches into the claimed range, or no per-text",
        "  data pair the runs.",
        "- **not measurable**: a run the claim needs is missing.",
        "- A claim over several comparisons holds only if every one holds; one \"does not hold\" decides it,",
        "  then a missing run, an open interval, a size other than claimed. `results/metrics.json` holds",
        "  the same words under each model's `claims` (`dvc metrics show`).",
        *(f"- {line}" for line in rule_lines(claims)),
        f"- Seed numbers come from a different setup ({claims['setup']}); compare",
        "  directions and relative changes, not absolute PPL.",
    ]
    return "\n".join(lines)


def summary_markdown(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None,
                     engines: list[dict] | None = None, parity: list[dict] | None = None,
                     timings: list[dict] | None = None) -> str:
    """results/summary.md from the tidy run and per-text tables; `engines`: `read_engine_agreement`'s rows;
    `parity`: `read_parity`'s (the agreement with NVIDIA kvpress, quoted after the setup); `timings`:
    `read_timings`' (each experiment stage's wall time, in the setup)."""
    claims = claims or load_claims()
    models, seeded = by_model(runs), seed_models(runs, claims)
    engine_block = "\n".join(engine_lines(engines or []))
    parts = [
        "# Results: the seed's claims re-measured",
        "Generated by `scripts/make_summary.py` from the runs exported to `results/`; do not edit by hand.",
        rules(claims), "## Setup", *_setup(models), *([engine_block] if engine_block else []),
        *(["\n".join(timing_lines(timings))] if timings else []),
        *(["## Agreement with NVIDIA kvpress", parity_block(parity)] if parity else []),
    ]
    for model, own in seeded.items():  # each model's claims measured on its own runs only
        suffix = _suffix(model, seeded)
        parts += [f"## Seed claims{suffix}", markdown_table(verdicts(own, texts, claims).drop(columns=["model", "key"])), *notes(claims)]
        for title, exp_runs, table in _model_tables(own, claims):
            parts += [f"## {title}{suffix}", f"Ours: {describe(exp_runs)}. Seed: {claims['setup']}.",
                      markdown_table(table)]
        parts += _sweeps(own, texts, claims, suffix)
    return "\n\n".join(parts + diagnose_section(runs, texts) + _experiments(runs, models)) + "\n"
