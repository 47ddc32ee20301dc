"""What the report's figures share: the metrics they draw, colours by strategy, error bars, and a
canvas with one row of panels per model, so runs of two models never share a panel.

Figures use matplotlib's object API with the Agg canvas (no pyplot): they render headless and
touch no global state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, FigureBase

from knormpress.report.effects import by_model

METRICS = {  # metric -> (scale, axis label)
    "ppl": (1.0, "perplexity (lower is better)"),
    "accuracy": (100.0, "next-token accuracy, % (higher is better)"),
}
CI_LABEL = "95% bootstrap CI over texts"
BASELINE = "baseline"


class Palette:
    """Colours by strategy: the configured ones, then `palette` colours for the other strategies
    in sorted order, so the same runs always get the same colours in every figure."""

    def __init__(self, strategies: Iterable[str], config: dict) -> None:
        known = dict(config["colors"])
        others = sorted(set(strategies) - set(known))
        spare = config["palette"]
        self.colors = known | {s: spare[i % len(spare)] for i, s in enumerate(others)}
        self.rank = {s: i for i, s in enumerate(list(known) + others)}

    def __call__(self, strategy: str) -> str:
        return self.colors.get(strategy, "0.5")

    def ordered(self, names: Iterable[str]) -> list[str]:
        """Configured strategies first in their configured order, then the others sorted."""
        return sorted(set(names), key=lambda s: (self.rank.get(s, len(self.rank)), s))


def palette(runs: pd.DataFrame, claims: dict) -> Palette:
    """The palette of the strategies in `runs`, configured by claims.yaml's figures."""
    return Palette(runs.strategy.dropna().unique(), claims["figures"])


def per_model(runs: pd.DataFrame, rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """`rows` (some of `runs`) per model, models in the order of all `runs` (as in the summary)."""
    parts = {m: rows[rows.index.isin(own.index)] for m, own in by_model(runs).items()}
    return {m: part for m, part in parts.items() if not part.empty}


class Row(NamedTuple):
    """One model's row of panels: its runs, where its title and legend go, its axes."""

    model: str
    runs: pd.DataFrame
    holder: FigureBase  # the figure itself for one model, else the model's subfigure
    axes: np.ndarray


def model_rows(models: dict[str, pd.DataFrame], width: float, height: float,
               ncols: int = 2, nrows: int = 1) -> tuple[Figure, list[Row]]:
    """A figure of `height` per model with `nrows` rows of `ncols` panels for each (its axes in
    reading order); one model (or none) draws on the figure itself, exactly the single-model layout."""
    fig = Figure(figsize=(width, height * max(1, len(models))), layout="constrained")
    FigureCanvasAgg(fig)
    items = list(models.items()) or [("", pd.DataFrame())]
    holders = [fig] if len(items) == 1 else list(fig.subfigures(len(items), 1))
    return fig, [Row(model, runs, holder, np.atleast_1d(holder.subplots(nrows, ncols)).ravel())
                 for (model, runs), holder in zip(items, holders)]


def titles(fig: Figure, rows: list[Row], text: str, describe: Callable[[pd.DataFrame], str], sep: str = ": ") -> None:
    """`text`, then what the runs are: in the figure's title for one model, else in each model's row."""
    if len(rows) == 1:
        fig.suptitle(f"{text}{sep}{describe(rows[0].runs)}", fontsize=11)
        return
    fig.suptitle(text, fontsize=12)
    for row in rows:
        row.holder.suptitle(describe(row.runs), fontsize=10)


def err(rows: pd.DataFrame, col: str, scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars from the *_lo/*_hi columns (nan = no bar)."""
    v, lo, hi = (scale * rows[c].to_numpy(float) for c in (col, f"{col}_lo", f"{col}_hi"))
    return np.clip(np.vstack([v - lo, hi - v]), 0, None)


def no_data(fig: Figure, message: str) -> Figure:
    for ax in fig.axes:
        ax.set_axis_off()
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    return fig
