"""The `diagnose` task's figures, from its runs' per-(text, layer, KV head) rows (per_text.csv): the
norm-attention rank correlation per layer x KV head (uncompressed runs), and each strategy's
attention recall per compressed layer; a row of panels per model (`panels.model_rows`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from knormpress.report.claims import load_claims
from knormpress.report.diagnose_summary import TASK, diagnose_rows
from knormpress.report.panels import model_rows, no_data, palette, per_model, titles
from knormpress.report.runs import NOT_DEPLOYABLE
from knormpress.report.summary import describe

def norm_attention(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> Figure:
    """Spearman(|k_j|, attention key j receives from later queries) per layer (x) and KV head (y), mean
    over texts: the key as the cache holds it, and (models that normalise keys) before that normalisation."""
    models = diagnose_rows(runs, texts, "baseline")
    fig, rows = model_rows(models, 12, 3.2, ncols=2)
    if not models:
        return no_data(fig, f"no uncompressed runs of task '{TASK}' (python run.py task={TASK})")
    for model, _, _, axes in rows:
        table = models[model]
        for ax, column, what in zip(axes, ("spearman", "spearman_projected"),
                                    ("key as cached (keep_low's norm)", "key projection, before key normalisation")):
            grid = table.groupby(["head", "layer"])[column].mean().unstack("layer")
            if grid.isna().all().all():
                ax.set_axis_off()
                ax.set_title(f"{what}: not measured for this model", fontsize=9)
                continue
            image = ax.imshow(grid.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", origin="lower")
            step = -(-grid.shape[1] // 16)  # at most 16 layer labels: 30 would overlap
            ax.set_xticks(range(0, grid.shape[1], step), [str(int(c)) for c in grid.columns[::step]], fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [str(int(i)) for i in grid.index], fontsize=7)
            sliding = sorted(set(table[table.window > 0].layer))
            ax.set_xlabel("layer" + (f" (sliding-window layers: {_spans(sliding)})" if sliding else ""))
            ax.set_ylabel("KV head")
            ax.set_title(f"{what}: mean {np.nanmean(grid.to_numpy(float)):+.3f}", fontsize=9)
            ax.figure.colorbar(image, ax=ax, label="rho (< 0: low norm, more attention)")
    titles(fig, rows, "Key norm against attention received (Spearman per layer and KV head)",
           lambda rows_of_model: describe(runs[runs.run_id.isin(rows_of_model.run_id)]))
    return fig


def attention_recall(runs: pd.DataFrame, texts: pd.DataFrame, claims: dict | None = None) -> Figure:
    """Each strategy's attention recall per compressed layer (mean over KV heads and texts); the legend
    gives its mean over layers. Non-deployable references (the oracle) dashed."""
    models = diagnose_rows(runs, texts, "compressed")
    fig, rows = model_rows(models, 10, 4.2, ncols=1)
    if not models:
        return no_data(fig, f"no compressed runs of task '{TASK}' (python run.py -m task={TASK} compress=keep_low,tova,oracle)")
    color = palette(runs, claims or load_claims())
    for model, _, _, (ax,) in rows:
        table = models[model]
        means = table.groupby("strategy").recall.mean().sort_values(ascending=False)
        for strategy in means.index:
            by_layer = table[table.strategy == strategy].groupby("layer").recall.mean()
            ax.plot(by_layer.index, by_layer.to_numpy(), marker="o", ms=3, label=f"{strategy} ({means[strategy]:.3f})",
                    ls="--" if strategy.endswith(NOT_DEPLOYABLE) else "-", color=color(strategy))
        ax.set_xlabel("layer (compressed layers only)")
        ax.set_ylabel("attention recall (1 = the next query's top tokens kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="strategy (mean over layers)", title_fontsize=8, loc="lower left")
    titles(fig, rows, "Attention recall: next query's attention kept / best possible",
           lambda rows_of_model: describe(runs[runs.run_id.isin(rows_of_model.run_id)]))
    return fig


def _spans(layers: list[int]) -> str:
    return ", ".join(str(v) for v in layers) if len(layers) <= 8 else f"{len(layers)} of them"
