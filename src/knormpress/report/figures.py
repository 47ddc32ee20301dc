"""The seed's four figures (the `lm` task's, `Task.figures`), drawn from the tidy run tables (never
from the seed's numbers); `save_all` draws every registered task's figures.

Which experiment and keep_ratio each figure shows comes from `claims.yaml` (figures:); strategies
come from the runs: those named in claims.yaml keep their colour, others take palette colours in
sorted order. Each model that has runs for a figure gets its own row of panels (`panels.model_rows`,
models in `effects.by_model` order); with one model a figure looks as it always did. The notebook
shows the same PNGs the pipeline writes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox

from knormpress.report.claims import improvements, load_claims
from knormpress.report.effects import pick, rows_where
from knormpress.report.labels import place_labels
from knormpress.report.panels import (BASELINE, CI_LABEL, METRICS, Palette, err, model_rows, no_data, palette, per_model,
                                      titles)
from knormpress.report.summary import describe
from knormpress.tasks import TASKS


def _has_metrics(rows: pd.DataFrame) -> bool:
    return not rows.empty and not rows[list(METRICS)].isna().all().all()


def _experiment_rows(runs: pd.DataFrame, name: str, table: Callable[[pd.DataFrame], pd.DataFrame],
                     height: float) -> tuple[Figure, list, dict[str, pd.DataFrame]]:
    """Each model's `table` of experiment `name`, and a figure with a row of two panels for each model
    whose table has metrics (no rows: nothing to draw)."""
    models = per_model(runs, runs[runs.experiment == name])
    tables = {m: table(own) for m, own in models.items()}
    drawn = {m: own for m, own in models.items() if _has_metrics(tables[m])}
    fig, panels = model_rows(drawn, 11, height)
    return fig, panels if drawn else [], tables


def _at_ratio(exp: pd.DataFrame, ratio: float, color: Palette) -> pd.DataFrame:
    """One model's baseline and newest run of every strategy at `ratio`."""
    base = pick(exp, role="baseline")
    strategies = color.ordered(rows_where(exp, keep_ratio=ratio).strategy.dropna())
    return pd.DataFrame(([base] if base is not None else []) + [pick(exp, strategy=s, keep_ratio=ratio)
                                                                for s in strategies])


CHANGES = {  # panel metric -> axis label: the change against the uncompressed baseline, with its paired interval
    "delta_ppl_pct": "Δ perplexity, % (lower better)",
    "delta_accuracy_pct": "Δ next-token accuracy, % (higher better)",
}
PAIRED_LABEL = "95% paired bootstrap CI over texts"


def strategy_comparison(runs: pd.DataFrame, texts: pd.DataFrame | None = None, claims: dict | None = None) -> Figure:
    """Each strategy's change in PPL and accuracy against the baseline at one keep_ratio, with the
    paired interval (resampling the same texts for both runs): differences the per-run intervals
    over texts hide show here."""
    claims = claims or load_claims()
    config, color = claims["figures"]["strategy_comparison"], palette(runs, claims)
    name, ratio = config["experiment"], config["keep_ratio"]
    fig, panels, tables = _experiment_rows(runs, name, lambda own: _at_ratio(own, ratio, color), 5.6)
    if not panels:
        return no_data(fig, f"no runs with {'/'.join(METRICS)} in experiment '{name}'")
    for model, exp, holder, axes in panels:
        rows = tables[model]
        rows = rows[rows.role != "baseline"]
        x = np.arange(len(rows))
        for ax, (metric, label) in zip(axes, CHANGES.items()):
            values, bars = rows[metric].to_numpy(float), err(rows, metric)
            for i, strategy in enumerate(rows.strategy):
                ax.errorbar(x[i], values[i], yerr=bars[:, i:i + 1], fmt="o", ms=7, capsize=4, color=color(strategy))
            ax.axhline(0, ls="--", lw=1, color=color(BASELINE))
            ax.set_xticks(x, rows.strategy, rotation=90, fontsize=9)
            ax.set_xlim(-0.6, len(x) - 0.4)
            ax.set_xlabel(f"strategy (keep_ratio {ratio:g})")
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        holder.legend(handles=[Line2D([], [], color="0.2", marker="o", label=f"change vs baseline (bars: {PAIRED_LABEL})"),
                               Line2D([], [], color=color(BASELINE), ls="--", label="baseline (no compression): 0")],
                      loc="outside lower center", ncols=2, fontsize=8)
    titles(fig, panels, f"Strategies at keep_ratio {ratio:g}, against the baseline", describe)
    return fig


def keep_ratio_analysis(runs: pd.DataFrame, texts: pd.DataFrame | None = None, claims: dict | None = None) -> Figure:
    """Each strategy's change in PPL and accuracy against the baseline, with its paired interval, as
    keep_ratio varies; the baseline is the zero line."""
    claims = claims or load_claims()
    name, color = claims["figures"]["keep_ratio_analysis"]["experiment"], palette(runs, claims)
    fig, panels, grids = _experiment_rows(runs, name, lambda own: rows_where(own).dropna(subset=["keep_ratio"]), 5.2)
    if not panels:
        return no_data(fig, f"no compressed runs with {'/'.join(METRICS)} in experiment '{name}'")
    for model, _, holder, axes in panels:
        grid = grids[model]
        ratios = sorted(grid.keep_ratio.unique())
        strategies = color.ordered(grid.strategy.dropna())
        offsets = 0.008 * (np.arange(len(strategies)) - (len(strategies) - 1) / 2)  # side by side, bars apart
        for ax, (metric, label) in zip(axes, CHANGES.items()):
            for offset, strategy in zip(offsets, strategies):
                rows = grid[grid.strategy == strategy].sort_values("keep_ratio")
                ax.errorbar(rows.keep_ratio + offset, rows[metric], yerr=err(rows, metric),
                            marker="o", capsize=4, color=color(strategy), label=strategy)
            ax.axhline(0, ls="--", lw=1, color=color(BASELINE), label="baseline (no compression): 0")
            ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
            ax.set_xlabel("keep_ratio (share of fix_kv_size kept for the most recent tokens)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        holder.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8,
                      title=f"change vs baseline, error bars: {PAIRED_LABEL}", title_fontsize=8)
    titles(fig, panels, "Effect of keep_ratio, against the baseline", describe)
    return fig


def _label(run: pd.Series) -> str:
    text = f"{run.strategy} {run.keep_ratio:g}"
    if not pd.isna(run.sort_by_time) and not run.sort_by_time:
        text += " unsorted"
    return text


def ppl_accuracy_tradeoff(runs: pd.DataFrame, texts: pd.DataFrame | None = None, claims: dict | None = None) -> Figure:
    """Delta PPL % against delta accuracy % vs the baseline, one point per distinct config of any
    experiment, one panel per model."""
    color = palette(runs, load_claims() if claims is None else claims)
    exp = rows_where(runs).dropna(subset=["delta_ppl_pct", "delta_accuracy_pct"])
    exp = exp.drop_duplicates(["strategy", "keep_ratio", "sort_by_time", "n_sink", "fix_kv_size", "model", "dataset"])
    exp = exp.assign(label=[_label(r) for _, r in exp.iterrows()])
    fig, panels = model_rows(per_model(runs, exp), 9, 6.5, ncols=1)
    if exp.empty:
        return no_data(fig, "no compressed runs with deltas")
    for _, points, _, (ax,) in panels:
        _tradeoff_points(ax, points, color)
    titles(fig, panels, "Perplexity vs accuracy cost of each compressed run", describe, sep="\n")
    for _, points, _, (ax,) in panels:
        _tradeoff_labels(ax, points, color)
    return fig


def _tradeoff_points(ax, exp: pd.DataFrame, color: Palette) -> None:
    for strategy in color.ordered(exp.strategy):
        rows = exp[exp.strategy == strategy]
        ax.errorbar(rows.delta_ppl_pct, rows.delta_accuracy_pct, xerr=err(rows, "delta_ppl_pct"),
                    yerr=err(rows, "delta_accuracy_pct"), fmt="o", ms=6, capsize=3, lw=0.9, alpha=0.9,
                    color=color(strategy), label=strategy)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(0, color="0.5", lw=0.8)
    ax.margins(0.12)
    for get, set_ in ((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim)):
        lo, hi = get()
        if hi - lo < 1.0:  # all changes ~0 (e.g. equal accuracy everywhere): show +-0.5 points, not float noise
            set_((lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5)
    ax.set_xlabel("change in perplexity vs baseline, % (left is better)")
    ax.set_ylabel("change in next-token accuracy vs baseline, % (up is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", title=f"error bars: paired {CI_LABEL}", title_fontsize=8)


def _tradeoff_labels(ax, exp: pd.DataFrame, color: Palette, passes: int = 6, near_px: float = 8.0) -> None:
    """Label each point once, away from markers, error bars and the legend (on a drawn canvas).
    Points closer than `near_px` pixels cannot be told apart, so they share one label ("a / b"); a
    label with no free spot (points crowded near the origin) becomes a number, spelled out in a key
    beside the panel; the key takes room, so the layout is drawn and measured again."""
    ax.figure.canvas.draw()
    xy, labels, colors = _nearby_merged(ax, exp, color, near_px)
    numbered: list[int] = []
    key = None
    for last in [False] * (passes - 1) + [True]:
        ax.figure.canvas.draw()  # fix the layout and limits before measuring label boxes
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
        order = numbered + [i for i in range(len(labels)) if i not in numbered]  # numbers first: they fit anywhere
        texts = [str(numbered.index(i) + 1) if i in numbered else labels[i] for i in order]
        args = (ax, xy[order], texts, [colors[i] for i in order], *_tradeoff_obstacles(ax, exp))
        crowded = [order[k] for k in place_labels(*args, dry=True) if order[k] not in numbered]
        if last or not crowded:
            place_labels(*args)
            return
        numbered += crowded
        if key is not None:
            key.remove()
        key = ax.text(1.02, 1.0, "\n".join(f"{n}: {labels[i]}" for n, i in enumerate(numbered, 1)), transform=ax.transAxes,
                      ha="left", va="top", fontsize=7)


def _nearby_merged(ax, exp: pd.DataFrame, color: Palette, near_px: float) -> tuple[np.ndarray, list[str], list[str]]:
    """The points to label (data coordinates), their labels and colours: runs with the same numbers
    (an ablation that changes nothing) join with " = ", points drawn within `near_px` with " / "."""
    points = exp.groupby(["delta_ppl_pct", "delta_accuracy_pct"], sort=False).agg(
        label=("label", " = ".join), strategy=("strategy", "first")).reset_index()
    xy = points[["delta_ppl_pct", "delta_accuracy_pct"]].to_numpy(float)
    px = ax.transData.transform(xy)
    groups: list[list[int]] = []
    for i in range(len(points)):
        home = next((g for g in groups if np.hypot(*(px[g[0]] - px[i])) < near_px), None)
        if home is None:
            groups.append(home := [])
        home.append(i)
    return (xy[[g[0] for g in groups]], [" / ".join(points.label[i] for i in g) for g in groups],
            [color(points.strategy[g[0]]) for g in groups])


def _tradeoff_obstacles(ax, exp: pd.DataFrame) -> tuple[list[Bbox], list[Bbox]]:
    """Pixel boxes a label should not cover: the markers and the legend, and the error bars."""
    to_px = ax.transData.transform
    markers = [Bbox.from_bounds(x - 5, y - 5, 10, 10) for x, y in to_px(exp[["delta_ppl_pct", "delta_accuracy_pct"]])]
    markers.append(ax.get_legend().get_window_extent())
    bars = []
    for r in exp.itertuples():
        x, y = r.delta_ppl_pct, r.delta_accuracy_pct
        (x0, y0), (x1, y1) = to_px([(r.delta_ppl_pct_lo, y), (r.delta_ppl_pct_hi, y)])
        bars.append(Bbox([[x0, y0 - 1], [x1, y1 + 1]]))
        (x0, y0), (x1, y1) = to_px([(x, r.delta_accuracy_pct_lo), (x, r.delta_accuracy_pct_hi)])
        bars.append(Bbox([[x0 - 1, y0], [x1 + 1, y1]]))
    return markers, [b for b in bars if np.isfinite(b.bounds).all()]


def improvement_summary(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> Figure:
    """The seed's claimed improvements as paired effects with 95% CIs beside the claimed ranges,
    one row per model that ran their experiments."""
    claims = claims or load_claims()
    measured = runs[runs.experiment.isin({c["experiment"] for c in claims["claims"] if "improvement" in c})]
    items, models = improvements(measured, texts, claims), per_model(runs, measured)
    fig, panels = model_rows(models or {i["model"]: measured for i in items[:1]}, 11, 4.2)  # no runs: one row
    if not items:
        return no_data(fig, "claims.yaml names no improvement claims")
    for model, _, _, axes in panels:
        _improvement_row(axes, [i for i in items if i["model"] == model])
    panels[-1].holder.legend(handles=[
        Line2D([], [], color="tab:blue", marker="o", label=f"measured (paired {CI_LABEL})"),
        Patch(color="gold", alpha=0.4, label="seed's claimed range"),
        Line2D([], [], ls="none", label="reference run: the second of each row's 'X vs Y'")],
        loc="outside lower center", ncols=3, fontsize=8)
    title = claims["figures"].get("improvement_summary", {}).get("title", "The seed's improvements")
    titles(fig, panels, title, describe, sep="\n")
    return fig


def _improvement_row(axes: np.ndarray, items: list[dict]) -> None:
    names = list(dict.fromkeys(i["improvement"] for i in items))
    labels = {i["improvement"]: i["label"] for i in items}
    for k, (ax, (metric, (_, label))) in enumerate(zip(axes, METRICS.items())):
        span = [0.0]
        for y, name in enumerate(names):
            item = next((i for i in items if i["improvement"] == name and i["metric"] == metric), None)
            if item is None:
                continue
            claimed, e = item["claimed"], item["effect"]
            ax.fill_betweenx([y - 0.25, y + 0.25], *claimed, color="gold", alpha=0.4, lw=0)
            note = "not measured (runs missing)"
            if e is not None:
                lo, hi = (e.est, e.est) if np.isnan(e.lo) else (e.lo, e.hi)
                ax.errorbar(e.est, y, xerr=[[e.est - lo], [hi - e.est]], fmt="o", ms=8, capsize=5, color="tab:blue")
                note = item["verdict"] + (":\nidentical per-text NLLs" if e.identical else f":\n{e}")
                span += [lo, hi]
            span += list(claimed)
            ax.text(0.02, y + 0.27, note, transform=ax.get_yaxis_transform(), fontsize=8, va="bottom")
        span = [s for s in span if np.isfinite(s)]
        pad = 0.15 * (max(span) - min(span)) or 1.0
        ax.set_xlim(min(span) - pad, max(span) + pad)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(range(len(names)), [f"{n}\n({labels[n]})" for n in names] if k == 0 else [])  # rows named once, at the left
        ax.set_ylim(-0.5, len(names) - 0.2)
        ax.set_xlabel(f"change in {metric.replace('ppl', 'perplexity')}, % of the reference run's")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)


def task_figures() -> dict[str, Callable[..., Figure]]:
    """Every registered task's figures (`Task.figures`, tasks in registration order): file name -> function."""
    out = {}
    for task in TASKS.values():
        for path in task.figures:
            module, _, name = path.partition(":")
            out[f"{name}.png"] = getattr(importlib.import_module(module), name)
    return out


def save_all(runs: pd.DataFrame, texts: pd.DataFrame, out_dir: str | Path = "results",
             claims: dict | None = None) -> list[Path]:
    """Write every task's figures; a figure whose runs are missing says so instead of failing."""
    claims = claims or load_claims()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in task_figures().items():
        draw(runs, texts, claims).savefig(out / name, dpi=150)
        paths.append(out / name)
    return paths
