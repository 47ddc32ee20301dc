"""The summary's section "When does the key norm carry attention?", from the `diagnose` task's runs:
per model, the norm-attention rank correlation (over all layers, over the layers a compression
prunes, and before the model's key normalisation), and each strategy's attention recall beside what
it costs in perplexity in the `strategies` experiment, when that experiment has the model's runs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from knormpress.report.effects import by_model
from knormpress.report.panels import per_model

TASK = "diagnose"
TITLE = "## When does the key norm carry attention?"
MISSED = "attention missed per 1000 (1 - recall)"
PPL_FROM = "strategies"  # the experiment whose delta_ppl_pct stands beside each strategy's recall


def diagnose_rows(runs: pd.DataFrame, texts: pd.DataFrame, role: str) -> dict[str, pd.DataFrame]:
    """Per model: the per-(text, layer, head) rows of its diagnose runs of `role`, with the run's strategy."""
    if "task" not in runs or texts.empty or "layer" not in texts:
        return {}
    own = runs[(runs.task == TASK) & (runs.role == role)]
    out = {}
    for model, part in per_model(runs, own).items():
        rows = texts.merge(part[["run_id", "strategy"]], on="run_id")
        if not rows.empty:
            out[model] = rows
    return out


def section(runs: pd.DataFrame, texts: pd.DataFrame) -> list[str]:
    """The section's markdown blocks; none when no diagnose run was exported."""
    stats, recall = diagnose_rows(runs, texts, "baseline"), diagnose_rows(runs, texts, "compressed")
    if not stats and not recall:
        return []
    parts = [TITLE, ("KnormPress keeps low-norm keys because they are said to draw high attention. Spearman's rho "
                     "between a key's norm and the mean attention later queries give it (negative: low norm, more "
                     "attention), and each strategy's attention recall: the share of the next query's attention on "
                     "the tokens it keeps, over the best kept set of the same size (docs/diagnostics.md).")]
    for model in by_model(runs):
        if model in stats:
            parts.append(_correlation(model, stats[model]))
        if model in recall:
            parts.append(_recall_table(model, recall[model], runs))
    return parts


def _correlation(model: str, rows: pd.DataFrame) -> str:
    full = rows[rows.window == 0]
    pruned = full[full.layer > 1]  # the study's compression skips layers 0 and 1
    line = (f"**{model}**: mean rho {rows.spearman.mean():+.3f} over all {rows.layer.nunique()} layers, "
            f"{pruned.spearman.mean():+.3f} over the {pruned.layer.nunique()} full-attention layers a compression "
            f"prunes (skip [0, 1]); {(rows.spearman < 0).mean():.0%} of (layer, KV head, text) cells are negative.")
    if rows.spearman_projected.notna().any():
        line += (f" Before the key normalisation (the key projection's output) rho is {rows.spearman_projected.mean():+.3f}"
                 f" ({pruned.spearman_projected.mean():+.3f} on the pruned layers): "
                 + _normalisation(rows.spearman.mean(), rows.spearman_projected.mean()))
    return line


def _normalisation(after: float, before: float) -> str:
    """What the pair says about the key normalisation (QK-norm)."""
    if np.isclose(after, before, atol=0.02):
        return "the same, so this model's keys are not normalised or the normalisation keeps their order."
    if abs(after) < abs(before) / 2:
        return "the normalisation removes most of the norm's signal."
    if np.sign(after) != np.sign(before):
        return "the normalisation reverses the sign: the norm keep_low ranks is not the projection's norm."
    return "the normalisation changes the signal's strength, not its sign."


def _recall_table(model: str, rows: pd.DataFrame, runs: pd.DataFrame) -> str:
    table = rows.groupby("strategy").recall.mean().rename("attention recall").to_frame()
    table[MISSED] = (1 - table["attention recall"]) * 1000  # recall sits near 1: the misses tell strategies apart
    costs = runs[(runs.experiment == PPL_FROM) & (runs.model == model) & (runs.role == "compressed")]
    if "delta_ppl_pct" in costs and not costs.empty:
        table = table.join(costs.groupby("strategy").delta_ppl_pct.mean().rename(f"PPL change % ({PPL_FROM})"))
    table = table.sort_values("attention recall", ascending=False)
    lines = [f"{model}, attention recall per strategy (mean over compressed layers, KV heads and texts):", "",
             "| strategy | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(v, c) for c, v in row.items()) + " |" for name, row in table.iterrows()]
    return "\n".join(lines)


def _cell(value: float, column: str) -> str:
    if value != value:
        return "-"
    return f"{value:+.1f}" if column.startswith("PPL") else f"{value:.3f}" if column == MISSED else f"{value:.4f}"
