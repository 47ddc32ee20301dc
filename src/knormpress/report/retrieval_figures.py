"""The retrieval figures: passkey accuracy against the compression ratio, and needle accuracy per
depth x length for each strategy at one ratio. Which experiment (and ratio) comes from seed.yaml
(figures:); accuracy comes from the runs' metrics (Wilson intervals) and the per-trial rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from knormpress.report.effects import pick, select
from knormpress.report.summary import describe

WILSON = "95% Wilson interval over trials"


def passkey_accuracy(runs: pd.DataFrame, texts: pd.DataFrame | None = None, seed: dict | None = None) -> Figure:
    """Accuracy (%) against compress.ratio, one line per strategy, the baseline as a dashed line and band."""
    from knormpress.report.claims import load_seed
    from knormpress.report.figures import BASELINE, _err, _figure, _no_data, _palette  # figures.py registers this module

    seed = seed or load_seed()
    name, color = seed["figures"]["passkey_accuracy"]["experiment"], _palette(runs, seed)
    exp = runs[runs.experiment == name]
    fig, axes = _figure(8, 5.2, ncols=1)
    ax = axes[0]
    grid = select(exp).dropna(subset=["ratio", "accuracy"])
    if grid.empty:
        return _no_data(fig, f"no compressed runs with a compress.ratio in experiment '{name}'")
    strategies = color.ordered(grid.strategy.dropna())
    offsets = 0.004 * (np.arange(len(strategies)) - (len(strategies) - 1) / 2)  # side by side, bars apart
    for offset, strategy in zip(offsets, strategies):
        rows = grid[grid.strategy == strategy].sort_values("ratio")
        ax.errorbar(rows.ratio + offset, 100 * rows.accuracy, yerr=_err(rows, "accuracy", 100), marker="o", capsize=3,
                    color=color(strategy), label=strategy)
    base = pick(exp, role="baseline")
    if base is not None:
        ax.axhline(100 * base.accuracy, ls="--", lw=1, color=color(BASELINE), label="baseline (no compression)")
        ax.axhspan(100 * base.accuracy_lo, 100 * base.accuracy_hi, color=color(BASELINE), alpha=0.12, lw=0)
    ratios = sorted(grid.ratio.unique())
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("compress.ratio (share of the prompt's cache pruned; 0.9 keeps 10%)")
    ax.set_ylabel("passkey accuracy, % (higher is better)")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncols=2, title=f"error bars: {WILSON}", title_fontsize=8)
    when = "/".join(sorted(set(grid.when.dropna())))
    fig.suptitle(f"Passkey retrieval under compression ({when}): {describe(exp)}", fontsize=10)
    return fig


def needle_heatmap(runs: pd.DataFrame, texts: pd.DataFrame, seed: dict | None = None) -> Figure:
    """Accuracy per (depth, length) cell: the baseline and every strategy at the configured ratio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from knormpress.report.claims import load_seed
    from knormpress.report.figures import BASELINE, _no_data, _palette

    seed = seed or load_seed()
    config, color = seed["figures"]["needle_heatmap"], _palette(runs, seed)
    exp, ratio = runs[runs.experiment == config["experiment"]], config["ratio"]
    panels = [(BASELINE, pick(exp, role="baseline"))]
    panels += [(s, pick(exp, strategy=s, ratio=ratio)) for s in color.ordered(select(exp, ratio=ratio).strategy.dropna())]
    panels = [(label, run) for label, run in panels if run is not None]
    trials = texts[texts.run_id.isin([r.run_id for _, r in panels])] if "depth" in texts.columns else texts.iloc[:0]
    ncols = min(len(panels), 5) or 1
    nrows = -(-len(panels) // ncols) or 1
    fig = Figure(figsize=(max(8.0, 2.6 * ncols + 1), max(4.0, 2.4 * nrows + 0.8)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    if trials.empty:
        return _no_data(fig, f"no per-trial rows of experiment '{config['experiment']}' at ratio {ratio:g}")
    correct = trials.correct.astype(str).str.lower().eq("true")
    cells = trials.assign(correct=correct).groupby(["run_id", "depth", "length"]).correct.mean()
    depths, lengths = sorted(trials.depth.unique()), sorted(trials.length.unique())
    image = None
    for ax, (label, run) in zip(axes, panels):
        table = cells.loc[run.run_id].unstack("length").reindex(index=depths, columns=lengths) if run.run_id in cells else None
        values = np.full((len(depths), len(lengths)), np.nan) if table is None else 100 * table.to_numpy(float)
        image = ax.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "—" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n:g}" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_title(label, fontsize=9, color=color(label))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.supxlabel("prompt length, tokens", fontsize=9)
    fig.supylabel("needle depth", fontsize=9)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="accuracy, %")
    fig.suptitle(f"Needle in a haystack at compress.ratio {ratio:g}: {describe(exp)}", fontsize=10)
    return fig
