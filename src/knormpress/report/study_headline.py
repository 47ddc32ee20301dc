"""The study's headline (results/metrics.json): `headline` per model and task, each read from one
experiment, the one with the most strategies at the task's headline setting (then the most runs).
The baseline and every strategy then come from one run set, on the same texts and length, and a
run of another size at the same setting (the memory stage's one long text, the diagnose stage's two
texts) never stands in. Kept apart from `headline`, which the jobs' sweep figure imports, so this
rule is presentation: changing it reruns only the metrics stage."""

from __future__ import annotations

from typing import Any

import pandas as pd

from knormpress.report.headline import at_setting, headline, task_setting


def study_headline(runs: pd.DataFrame) -> dict[str, Any]:
    """{model: {task: {strategy or "baseline": {metric: value}}}} from one experiment per model and task."""
    if "experiment" not in runs or runs.experiment.isna().all():
        return headline(runs)
    keys = [runs.model.fillna("?"), runs.task.fillna("?")]
    parts = [one_experiment(rows, task_setting(None if task == "?" else task)) for (_, task), rows in runs.groupby(keys)]
    return headline(pd.concat(parts) if parts else runs)


def one_experiment(rows: pd.DataFrame, setting: dict[str, Any]) -> pd.DataFrame:
    """The rows of the experiment with the most strategies at `setting`, then the most runs."""
    at = at_setting(rows, setting)
    best = max(sorted(rows.experiment.dropna().unique()),
               key=lambda e: (at[at.experiment == e].strategy.nunique(), int((rows.experiment == e).sum())))
    return rows[rows.experiment == best]
