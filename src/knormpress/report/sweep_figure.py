"""A multirun's comparison figure, logged on its MLflow parent run: the children's key metrics side
by side. `knormpress.sweeps` calls `sweep_comparison` by the name the sweep callback's config gives
(conf/config.yaml, `hydra.callbacks.mlflow_sweep.figure`), so the sweep code never imports the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from knormpress.report.headline import headline_columns
from knormpress.report.panels import CI_LABEL, err
from knormpress.tasks import TASKS


def key_metrics(runs: pd.DataFrame) -> list[str]:
    """What the comparison shows: the runs' tasks' `key_metrics` that every run logged, else the first
    result they share (by name; not an interval, a count or the runner's resources)."""
    shared = [c for c in runs.columns if c not in ("name", "role", "task") and runs[c].notna().all()]
    tasks = dict.fromkeys(runs.get("task", pd.Series(dtype=object)).dropna())
    wanted = [m for t in tasks if t in TASKS for m in TASKS[t].key_metrics if m in shared]
    return list(dict.fromkeys(wanted)) or headline_columns(pd.DataFrame(columns=sorted(shared)))[:1]


def sweep_comparison(runs: pd.DataFrame, title: str) -> Figure | None:
    """A sweep's runs (`name`, `role`, `task` and their metrics, one row each) side by side: one panel
    per key metric, one row per run, with its interval where `<metric>_lo`/`_hi` were logged and the
    baseline run as a dashed line; None when the runs share no metric to show."""
    metrics = key_metrics(runs) if not runs.empty else []
    if not metrics:
        return None
    runs = runs.assign(_base=runs.role.ne("baseline")).sort_values(["_base", "name"], kind="stable")
    fig = Figure(figsize=(3.6 * len(metrics) + 1.6, 1.2 + 0.32 * len(runs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    y = np.arange(len(runs))
    has_ci = [{f"{m}_lo", f"{m}_hi"} <= set(runs.columns) for m in metrics]
    for ax, metric, ci in zip(axes, metrics, has_ci):
        values = runs[metric].to_numpy(float)
        ax.errorbar(values, y, xerr=err(runs, metric) if ci else None, fmt="o", capsize=3, color="tab:blue")
        for base in runs.loc[runs.role.eq("baseline"), metric]:
            ax.axvline(base, ls="--", lw=1, color="0.4")
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, runs.name)
    axes[0].invert_yaxis()
    fig.suptitle(title + (f"\n(bars: {CI_LABEL})" if any(has_ci) else ""), fontsize=10)
    return fig
