"""The summary's diagnose section: rho over all and over the pruned full-attention layers, and the
recall table with the misses per 1000 and the strategies experiment's PPL change, from hand-made runs."""

from __future__ import annotations

import pandas as pd

from knormpress.report.diagnose_summary import MISSED, TITLE, section


def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([
        {"run_id": "b", "model": "M", "experiment": "diagnose", "task": "diagnose", "role": "baseline", "strategy": None},
        {"run_id": "k", "model": "M", "experiment": "diagnose", "task": "diagnose", "role": "compressed", "strategy": "keep_low"},
        {"run_id": "r", "model": "M", "experiment": "diagnose", "task": "diagnose", "role": "compressed", "strategy": "random"},
        {"run_id": "s", "model": "M", "experiment": "strategies", "task": "lm", "role": "compressed", "strategy": "keep_low",
         "delta_ppl_pct": 2.5},
    ])
    texts = pd.DataFrame(
        # the baseline's cells: layer 0 is skipped by the study's compression, layers 2 and 3 are pruned
        [{"run_id": "b", "layer": layer, "window": 0, "spearman": rho, "spearman_projected": rho}
         for layer, rho in ((0, -0.5), (2, -0.1), (3, 0.3))]
        # each strategy's recall per (text, layer, head)
        + [{"run_id": "k", "layer": 2, "recall": r} for r in (0.999, 0.997)]
        + [{"run_id": "r", "layer": 2, "recall": r} for r in (0.99, 0.98)])
    return runs, texts


def test_the_section_reports_rho_and_recall_with_its_misses_per_1000():
    text = "\n\n".join(section(*tables()))
    assert text.startswith(TITLE)
    # mean rho over all 3 layers (-0.5 - 0.1 + 0.3) / 3 = -0.1; over the pruned layers 2, 3: +0.1; 2 of 3 cells negative
    assert "mean rho -0.100 over all 3 layers, +0.100 over the 2 full-attention layers" in text and "67% of" in text
    assert f"| strategy | attention recall | {MISSED} | PPL change % (strategies) |" in text
    assert "| keep_low | 0.9980 | 2.000 | +2.5 |" in text  # (0.999 + 0.997) / 2; (1 - 0.998) x 1000; the lm run
    assert "| random | 0.9850 | 15.000 | - |" in text  # no strategies run for random
    assert text.index("| keep_low |") < text.index("| random |")  # best recall first


def test_no_diagnose_runs_no_section():
    runs, texts = tables()
    assert section(runs[runs.task == "lm"], texts) == []
