"""results/metrics.json: the headline numbers DVC tracks (`dvc metrics show`, `dvc metrics diff`).

Per model, task and strategy at the task's default compression setting (the `Compression` spec's
defaults, overridden by the task's declared `setting`: retrieval reads a ratio of the prompt; the
settings the spec leaves out of the headline setting, e.g. n_sink, may take any value), the
task's own numbers without their intervals, the baseline copies, the counts or the runner's
resources. For `lm`: ppl and accuracy, plus delta_ppl_pct and
delta_accuracy_pct vs the uncompressed baseline (key `baseline`). Any other task's metrics come
through the same rule. The task level is always there, so a metric's name does not change when a
study adds a task.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from knormpress.report.effects import pick, rows_where
from knormpress.report.runs import RUNNER_METRICS, metric_columns, task_class
from knormpress.settings import defaults, settings_of
from knormpress.spec import Compression

BASELINE = "baseline"
DIGITS = 4  # decimals kept: float noise between identical runs must not show as a change


def headline_columns(runs: pd.DataFrame) -> list[str]:
    """The result columns of a run table: no intervals, baseline copies, counts or resources."""
    return [c for c in metric_columns(runs) if c not in RUNNER_METRICS and not c.endswith(("_lo", "_hi"))
            and not c.startswith(("baseline_", "n_"))]


def task_setting(task: object, spec: type = Compression) -> dict[str, Any]:
    """The compress node a task's headline numbers are read at: the spec's defaults and the task's `setting`."""
    return defaults(spec) | task_class(task).setting


def at_setting(runs: pd.DataFrame, setting: dict[str, Any], spec: type = Compression) -> pd.DataFrame:
    """Compressed runs at `setting` (a compress node), on the spec's headline settings, compared
    as the tidy table holds them (a list as its logged text "[0, 1]"; YAML's `true` as "true")."""
    where = {}
    for s in settings_of(spec):
        if s.headline and s.name in setting:
            value = setting[s.name]
            where[s.name] = str(list(value)) if s.sequence else str(value).lower() if isinstance(value, bool) and s.kind is str else value
    return rows_where(runs, **where)


def headline(runs: pd.DataFrame, settings: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """{model: {task: {strategy or "baseline": {metric: value}}}}, the newest run of each at
    `settings[task]` (default: `task_setting`), rounded."""
    columns = headline_columns(runs)
    out: dict[str, Any] = {}
    for (model, task), rows in runs.groupby([runs.model.fillna("?"), runs.task.fillna("?")], sort=True):
        picked = {BASELINE: pick(rows, role="baseline")}
        compressed = at_setting(rows, task_setting(None if task == "?" else task) if settings is None else settings[task])
        picked |= {s: pick(compressed, strategy=s) for s in sorted(compressed.strategy.dropna().unique())}
        numbers = {name: _numbers(run, columns) for name, run in picked.items() if run is not None}
        out.setdefault(model, {})[task] = numbers
    return out


def _numbers(run: pd.Series, columns: list[str]) -> dict[str, float]:
    return {c: round(float(run[c]), DIGITS) for c in columns if not pd.isna(run[c]) and math.isfinite(float(run[c]))}
