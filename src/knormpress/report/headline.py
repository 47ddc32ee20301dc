"""results/metrics.json: the headline numbers DVC tracks (`dvc metrics show`, `dvc metrics diff`).

Per model, task and strategy at the task's default compression setting (conf/config.yaml's
`compress` node, overridden by the task's experiment preset if it has one: see
scripts/make_metrics.py), the task's own numbers without their intervals, the baseline copies, the
counts or the runner's resources. For `lm`: ppl and accuracy, plus delta_ppl_pct and
delta_accuracy_pct vs the uncompressed baseline (key `baseline`). Any other task's metrics come
through the same rule. The task level is always there, so a metric's name does not change when a
study adds a task.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from knormpress.report.effects import pick, select
from knormpress.report.runs import RUNNER_METRICS, metric_columns

SETTING = ("fix_kv_size", "ratio", "when", "keep_ratio", "sort_by_time", "skip_layers", "positions", "interval")
BASELINE = "baseline"
DIGITS = 4  # decimals kept: float noise between identical runs must not show as a change


def headline_columns(runs: pd.DataFrame) -> list[str]:
    """The result columns of a run table: no intervals, baseline copies, counts or resources."""
    return [c for c in metric_columns(runs) if c not in RUNNER_METRICS and not c.endswith(("_lo", "_hi"))
            and not c.startswith(("baseline_", "n_"))]


def at_setting(runs: pd.DataFrame, setting: dict[str, Any]) -> pd.DataFrame:
    """Compressed runs at `setting` (the compress node's values for the SETTING keys)."""
    where = {k: setting[k] for k in SETTING if k in setting}
    if "skip_layers" in where:  # logged as a param, so a string like "[0, 1]"
        where["skip_layers"] = str(list(where["skip_layers"]))
    if "positions" in where:  # YAML's `true` is a boolean; the tidy table holds "true" or "rerotate"
        where["positions"] = str(where["positions"]).lower()
    return select(runs, **where)


def headline(runs: pd.DataFrame, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{model: {task: {strategy or "baseline": {metric: value}}}}, the newest run of each at
    `settings[task]`, rounded."""
    columns = headline_columns(runs)
    out: dict[str, Any] = {}
    for (model, task), rows in runs.groupby([runs.model.fillna("?"), runs.task.fillna("?")], sort=True):
        picked = {BASELINE: pick(rows, role="baseline")}
        compressed = at_setting(rows, settings[task])
        picked |= {s: pick(compressed, strategy=s) for s in sorted(compressed.strategy.dropna().unique())}
        numbers = {name: _numbers(run, columns) for name, run in picked.items() if run is not None}
        out.setdefault(model, {})[task] = numbers
    return out


def _numbers(run: pd.Series, columns: list[str]) -> dict[str, float]:
    return {c: round(float(run[c]), DIGITS) for c in columns if not pd.isna(run[c]) and math.isfinite(float(run[c]))}
