"""The retrieval figures: passkey accuracy against the compression ratio, and needle accuracy per
depth x length for each strategy at one ratio, each model in its own row (`panels.model_rows`).
Which experiment (and ratio) comes from claims.yaml (figures:); accuracy comes from the runs'
metrics (Wilson intervals) and the per-trial rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from knormpress.report.claims import load_claims
from knormpress.report.effects import pick, rows_where
from knormpress.report.panels import BASELINE, err, model_rows, no_data, palette, per_model, titles
from knormpress.report.summary import describe

WILSON = "95% Wilson interval over trials"
HEATMAP_COLUMNS = 5  # needle panels per row of one model


def passkey_accuracy(runs: pd.DataFrame, texts: pd.DataFrame | None = None, claims: dict | None = None) -> Figure:
    """Accuracy (%) against compress.ratio, one line per strategy, the baseline as a dashed line and
    band; one panel per model."""
    claims = claims or load_claims()
    name, color = claims["figures"]["passkey_accuracy"]["experiment"], palette(runs, claims)
    models = per_model(runs, runs[runs.experiment == name])
    grids = {m: rows_where(own).dropna(subset=["ratio", "accuracy"]) for m, own in models.items()}
    drawn = {m: own for m, own in models.items() if not grids[m].empty}
    fig, panels = model_rows(drawn, 10, 5.2, ncols=1)
    if not drawn:
        return no_data(fig, f"no compressed runs with a compress.ratio in experiment '{name}'")
    for model, exp, _, (ax,) in panels:
        _passkey_panel(ax, grids[model], pick(exp, role="baseline"), color)
    when = "/".join(sorted(set().union(*(g.when.dropna() for g in grids.values()))))
    titles(fig, panels, f"Passkey retrieval under compression ({when})", describe)
    return fig


def _passkey_panel(ax, grid: pd.DataFrame, base: pd.Series | None, color) -> None:
    strategies = color.ordered(grid.strategy.dropna())
    offsets = 0.004 * (np.arange(len(strategies)) - (len(strategies) - 1) / 2)  # side by side, bars apart
    for offset, strategy in zip(offsets, strategies):
        rows = grid[grid.strategy == strategy].sort_values("ratio")
        ax.errorbar(rows.ratio + offset, 100 * rows.accuracy, yerr=err(rows, "accuracy", 100), marker="o", capsize=3,
                    color=color(strategy), label=strategy)
    if base is not None:
        ax.axhline(100 * base.accuracy, ls="--", lw=1, color=color(BASELINE), label="baseline (no compression)")
        ax.axhspan(100 * base.accuracy_lo, 100 * base.accuracy_hi, color=color(BASELINE), alpha=0.12, lw=0)
    ratios = sorted(grid.ratio.unique())
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("compress.ratio (share of the prompt's cache pruned; 0.9 keeps 10%)")
    ax.set_ylabel("passkey accuracy, % (higher is better)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title=f"error bars:\n{WILSON}", title_fontsize=8)  # off the data


def needle_heatmap(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> Figure:
    """Accuracy per (depth, length) cell: the baseline and every strategy at the configured ratio,
    a block of panels per model."""
    claims = claims or load_claims()
    config, color = claims["figures"]["needle_heatmap"], palette(runs, claims)
    name, ratio = config["experiment"], config["ratio"]
    models = per_model(runs, runs[runs.experiment == name])
    shown = {m: _needle_runs(exp, ratio, color) for m, exp in models.items()}
    ids = [r.run_id for panels in shown.values() for _, r in panels]
    trials = texts[texts.run_id.isin(ids)] if "depth" in texts.columns else texts.iloc[:0]
    drawn = {m: own for m, own in models.items() if shown[m] and trials.run_id.isin([r.run_id for _, r in shown[m]]).any()}
    most = max((len(shown[m]) for m in drawn), default=1)
    ncols = min(most, HEATMAP_COLUMNS)
    nrows = -(-most // ncols)
    fig, rows = model_rows(drawn, max(8.0, 2.6 * ncols + 1), max(4.0, 2.4 * nrows + 0.8), ncols=ncols, nrows=nrows)
    if not drawn:
        return no_data(fig, f"no per-trial rows of experiment '{name}' at ratio {ratio:g}")
    correct = trials.correct.astype(str).str.lower().eq("true")
    cells = trials.assign(correct=correct).groupby(["run_id", "depth", "length"]).correct.mean()
    depths, lengths = sorted(trials.depth.unique()), sorted(trials.length.unique())
    for model, _, holder, axes in rows:
        image = None
        for ax, (label, run) in zip(axes, shown[model]):
            table = cells.loc[run.run_id].unstack("length") if run.run_id in cells else pd.DataFrame()
            values = 100 * table.reindex(index=depths, columns=lengths).to_numpy(float)
            image = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, "—" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{n:g}" for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
            ax.set_title(label, fontsize=9, color=color(label))
        for ax in axes[len(shown[model]):]:
            ax.set_axis_off()
        holder.supxlabel("prompt length, tokens", fontsize=9)
        holder.supylabel("needle depth", fontsize=9)
        holder.colorbar(image, ax=axes.tolist(), shrink=0.8, label="accuracy, %")
    titles(fig, rows, f"Needle in a haystack at compress.ratio {ratio:g}", describe)
    return fig


def _needle_runs(exp: pd.DataFrame, ratio: float, color) -> list[tuple[str, pd.Series]]:
    """(panel title, run): one model's baseline, then its newest run of each strategy at `ratio`."""
    panels = [(BASELINE, pick(exp, role="baseline"))]
    panels += [(s, pick(exp, strategy=s, ratio=ratio)) for s in color.ordered(rows_where(exp, ratio=ratio).strategy.dropna())]
    return [(label, run) for label, run in panels if run is not None]
