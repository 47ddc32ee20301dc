"""The seed's four figures, drawn from the exported run tables (never from the seed's numbers).

Figures use matplotlib's object API with the Agg canvas (no pyplot): they render headless, touch
no global state, and the notebook can show the same PNGs the pipeline writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import Bbox

from knormpress.results import CLAIMED, IMPROVEMENT_LABELS, describe, improvement, pick, verdict

COLORS = {"baseline": "0.35", "keep_low": "tab:blue", "random": "tab:green", "recent_only": "tab:red",
          "keep_high": "tab:orange", "sinks": "tab:purple"}
ORDER = ["keep_low", "random", "recent_only", "keep_high", "sinks"]
METRICS = {  # metric -> (scale, axis label)
    "ppl": (1.0, "perplexity (lower is better)"),
    "accuracy": (100.0, "next-token accuracy, % (higher is better)"),
}
CI_LABEL = "95% bootstrap CI over texts"


def _figure(width: float, height: float, ncols: int = 2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, ncols))


def _color(strategy: str) -> str:
    return COLORS.get(strategy, "tab:brown")


def _err(rows: pd.DataFrame, col: str, scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars from the *_lo/*_hi columns (nan = no bar)."""
    v, lo, hi = (scale * rows[c].to_numpy(float) for c in (col, f"{col}_lo", f"{col}_hi"))
    return np.clip(np.vstack([v - lo, hi - v]), 0, None)


def _no_data(fig: Figure, message: str) -> Figure:
    for ax in fig.axes:
        ax.set_axis_off()
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=12)
    return fig


def _ordered(names) -> list[str]:
    return [s for s in ORDER if s in set(names)] + sorted(set(names) - set(ORDER))


def strategy_comparison(runs: pd.DataFrame, texts: pd.DataFrame | None = None) -> Figure:
    """PPL and accuracy per strategy at keep_ratio 0.5, baseline included (experiment strategies)."""
    exp = runs[runs.experiment == "strategies"]
    fig, axes = _figure(11, 4.6)
    base = pick(exp)
    compressed = exp[(exp.role == "compressed") & np.isclose(exp.keep_ratio, 0.5)]
    rows = [pick(exp, s, 0.5) for s in _ordered(compressed.strategy)]
    rows = pd.DataFrame(([base] if base is not None else []) + rows)
    if rows.empty:
        return _no_data(fig, "no runs in experiment 'strategies'")
    names = ["baseline" if r == "baseline" else s for r, s in zip(rows.role, rows.strategy)]
    x = np.arange(len(rows))
    for ax, (metric, (scale, label)) in zip(axes, METRICS.items()):
        values, err = scale * rows[metric].to_numpy(float), _err(rows, metric, scale)
        for i, name in enumerate(names):
            ax.errorbar(x[i], values[i], yerr=err[:, i:i + 1], fmt="o", ms=8, capsize=5, color=_color(name))
            ax.annotate(f"{values[i]:.2f}", (x[i], values[i]), xytext=(9, 0), textcoords="offset points",
                        va="center", fontsize=8, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
        if base is not None:
            ax.axhline(scale * base[metric], ls="--", lw=1, color=_color("baseline"))
        ax.set_xticks(x, names, rotation=15)
        ax.set_xlim(-0.5, len(x) - 0.3)
        ax.set_xlabel("strategy (keep_ratio 0.5)")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(handles=[Line2D([], [], color="0.2", marker="o", label=f"run (bars: {CI_LABEL})"),
                            Line2D([], [], color=_color("baseline"), ls="--", label="baseline (no compression)")],
                   loc="upper left", fontsize=8)
    fig.suptitle(f"Strategies at keep_ratio 0.5: {describe(exp)}", fontsize=11)
    return fig


def keep_ratio_analysis(runs: pd.DataFrame, texts: pd.DataFrame | None = None) -> Figure:
    """PPL and accuracy against keep_ratio for keep_low and random, baseline as a band."""
    exp = runs[runs.experiment == "keep_ratio"]
    fig, axes = _figure(11, 5.2)
    grid = exp[(exp.role == "compressed") & exp.strategy.isin(["keep_low", "random"])]
    if grid.empty:
        return _no_data(fig, "no keep_low/random runs in experiment 'keep_ratio'")
    base = pick(exp)
    ratios = sorted(grid.keep_ratio.unique())
    for ax, (metric, (scale, label)) in zip(axes, METRICS.items()):
        for offset, strategy in zip((-0.004, 0.004), ("keep_low", "random")):
            rows = grid[grid.strategy == strategy].sort_values("keep_ratio")
            ax.errorbar(rows.keep_ratio + offset, scale * rows[metric], yerr=_err(rows, metric, scale), marker="o",
                        capsize=4, color=_color(strategy), label=strategy)
        if base is not None:
            ax.axhline(scale * base[metric], ls="--", lw=1, color=_color("baseline"), label="baseline (no compression)")
            ax.axhspan(scale * base[f"{metric}_lo"], scale * base[f"{metric}_hi"], color=_color("baseline"),
                       alpha=0.12, lw=0, label="baseline 95% CI")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_xlabel("keep_ratio (share of fix_kv_size kept for the most recent tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8, title=f"error bars: {CI_LABEL}",
               title_fontsize=8)
    fig.suptitle(f"Effect of keep_ratio: {describe(exp)}", fontsize=11)
    return fig


def _label(run: pd.Series) -> str:
    text = f"{run.strategy} {run.keep_ratio:g}"
    if not pd.isna(run.sort_by_time) and not run.sort_by_time:
        text += " unsorted"
    return text


DIRECTIONS = [(1, 1), (-1, 1), (1, -1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)]
RADII_PT = (6, 12, 20, 30, 42, 56, 72)
ALIGN = {1: (0.0, "left", "bottom"), 0: (0.5, "center", "center"), -1: (1.0, "right", "top")}


def _place_labels(ax, xy: np.ndarray, labels: list[str], colors: list[str], markers: list[Bbox],
                  bars: list[Bbox]) -> None:
    """Greedy label placement for points at data coordinates `xy`: try offsets at growing distance
    in 8 directions and take the first free spot, else the cheapest one (leaving the axes, then
    covering a label, then a marker, then an error bar costs most to least)."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px_per_pt = ax.figure.dpi / 72
    placed: list[Bbox] = []
    style = {"fontsize": 8, "bbox": {"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}}
    for (x, y), (px, py), text, color in zip(xy, ax.transData.transform(xy), labels, colors):
        probe = ax.text(0, 0, text, **style)
        w, h = probe.get_window_extent(renderer).padded(2).size
        probe.remove()
        best = None
        for radius in RADII_PT:
            for dx, dy in DIRECTIONS:
                x0 = px + dx * radius * px_per_pt - ALIGN[dx][0] * w
                y0 = py + dy * radius * px_per_pt - ALIGN[dy][0] * h
                box = Bbox.from_bounds(x0, y0, w, h)
                inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
                cost = (100 * (not inside) + 10 * sum(box.overlaps(b) for b in placed)
                        + 3 * sum(box.overlaps(b) for b in markers) + sum(box.overlaps(b) for b in bars))
                if best is None or cost < best[0]:
                    best = (cost, radius, dx, dy, box)
            if best[0] == 0:
                break
        _, radius, dx, dy, box = best
        placed.append(box)
        ann = ax.annotate(text, (x, y), xytext=(dx * radius, dy * radius), textcoords="offset points", color=color,
                          ha=ALIGN[dx][1], va=ALIGN[dy][2], **style,
                          arrowprops=None if radius < 12 else {"arrowstyle": "-", "color": color, "lw": 0.7})
        ann.set_in_layout(False)


def ppl_accuracy_tradeoff(runs: pd.DataFrame, texts: pd.DataFrame | None = None) -> Figure:
    """Delta PPL % against delta accuracy % vs the baseline, one point per distinct config."""
    exp = runs[runs.experiment.isin(["strategies", "keep_ratio", "ablations"]) & (runs.role == "compressed")]
    exp = exp.dropna(subset=["delta_ppl_pct", "delta_accuracy_pct"])
    exp = exp.drop_duplicates(["strategy", "keep_ratio", "sort_by_time", "n_sink", "fix_kv_size", "model", "dataset"])
    exp = exp.assign(label=[_label(r) for _, r in exp.iterrows()])
    fig, axes = _figure(9, 6.5, ncols=1)
    ax = axes[0]
    if exp.empty:
        return _no_data(fig, "no compressed runs with deltas")
    for strategy in _ordered(exp.strategy):
        rows = exp[exp.strategy == strategy]
        ax.errorbar(rows.delta_ppl_pct, rows.delta_accuracy_pct, xerr=_err(rows, "delta_ppl_pct"),
                    yerr=_err(rows, "delta_accuracy_pct"), fmt="o", ms=6, capsize=3, lw=0.9, alpha=0.9,
                    color=_color(strategy), label=strategy)
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
    fig.suptitle(f"Perplexity vs accuracy cost of each compressed run\n{describe(exp)}", fontsize=11)
    fig.canvas.draw()  # fix the layout and limits before measuring label boxes
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    to_px = ax.transData.transform
    markers = [Bbox.from_bounds(x - 5, y - 5, 10, 10) for x, y in to_px(exp[["delta_ppl_pct", "delta_accuracy_pct"]])]
    markers.append(ax.get_legend().get_window_extent())
    bars = []
    for r in exp.itertuples():
        (x0, y0), (x1, y1) = to_px([(r.delta_ppl_pct_lo, r.delta_accuracy_pct), (r.delta_ppl_pct_hi, r.delta_accuracy_pct)])
        bars.append(Bbox([[x0, y0 - 1], [x1, y1 + 1]]))
        (x0, y0), (x1, y1) = to_px([(r.delta_ppl_pct, r.delta_accuracy_pct_lo), (r.delta_ppl_pct, r.delta_accuracy_pct_hi)])
        bars.append(Bbox([[x0 - 1, y0], [x1 + 1, y1]]))
    bars = [b for b in bars if np.isfinite(b.bounds).all()]
    # runs with the same numbers (e.g. an ablation that changes nothing) share one label
    points = exp.groupby(["delta_ppl_pct", "delta_accuracy_pct"], sort=False).agg(
        label=("label", " = ".join), strategy=("strategy", "first")).reset_index()
    _place_labels(ax, points[["delta_ppl_pct", "delta_accuracy_pct"]].to_numpy(float), points.label.tolist(),
                  [_color(s) for s in points.strategy], markers, bars)
    return fig


def improvement_summary(runs: pd.DataFrame, texts: pd.DataFrame) -> Figure:
    """The seed's two claimed improvements as paired effects with 95% CIs beside the claimed ranges."""
    fig, axes = _figure(11, 4.2)
    names = list(CLAIMED)
    for ax, (metric, (_, label)) in zip(axes, METRICS.items()):
        span = [0.0]
        for y, name in enumerate(names):
            claimed = CLAIMED[name][metric]
            ax.fill_betweenx([y - 0.25, y + 0.25], *claimed, color="gold", alpha=0.4, lw=0)
            e = improvement(runs, texts, name, metric)
            note = "not measured (runs missing)"
            if e is not None:
                lo, hi = (e.est, e.est) if np.isnan(e.lo) else (e.lo, e.hi)
                ax.errorbar(e.est, y, xerr=[[e.est - lo], [hi - e.est]], fmt="o", ms=8, capsize=5, color="tab:blue")
                note = verdict(e, claimed) + (": identical per-text NLLs" if e.identical else f": {e}")
                span += [lo, hi]
            span += list(claimed)
            ax.text(0.02, y + 0.3, note, transform=ax.get_yaxis_transform(), fontsize=8, va="bottom")
        pad = 0.15 * (max(span) - min(span))
        ax.set_xlim(min(span) - pad, max(span) + pad)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(range(len(names)), [f"{n}\n({IMPROVEMENT_LABELS[n]})" for n in names])
        ax.set_ylim(-0.5, len(names) - 0.2)
        ax.set_xlabel(f"change in {metric.replace('ppl', 'perplexity')}, % of the reference run")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=[Line2D([], [], color="tab:blue", marker="o", label=f"measured (paired {CI_LABEL})"),
                        Patch(color="gold", alpha=0.4, label="seed's claimed range")],
               loc="outside lower center", ncols=2, fontsize=8)
    ablations = runs[runs.experiment == "ablations"]
    fig.suptitle(f"The seed's two improvements, keep_low at keep_ratio 0.5\n{describe(ablations)}", fontsize=11)
    return fig


FIGURES: dict[str, Callable[[pd.DataFrame, pd.DataFrame], Figure]] = {
    "strategy_comparison.png": strategy_comparison,
    "keep_ratio_analysis.png": keep_ratio_analysis,
    "ppl_accuracy_tradeoff.png": ppl_accuracy_tradeoff,
    "improvement_summary.png": improvement_summary,
}


def save_all(runs: pd.DataFrame, texts: pd.DataFrame, out_dir: str | Path = "results") -> list[Path]:
    """Write the four figures; a figure whose runs are missing says so instead of failing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in FIGURES.items():
        draw(runs, texts).savefig(out / name, dpi=150)
        paths.append(out / name)
    return paths

