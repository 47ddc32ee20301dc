"""The seed write-up's published numbers and claimed effects (see /work/shared/seed/SUMMARY.md).

They only fill the "seed" comparison columns and the claimed ranges that verdicts test against;
every number we report ourselves comes from a logged run. Accuracy is a fraction, deltas are
relative changes in percent of the reference run, as in the seed's dPPL/dAcc columns.
"""

SETUP = "EleutherAI/pythia-70m-deduped on PG-19, fix_kv_size 512, max_tokens 3000, skip_layers [0, 1]"

# Table 1: strategies at keep_ratio 0.5, 3-sample means. Key "baseline" = no compression.
STRATEGIES_AT_0_5 = {
    "baseline": {"ppl": 47.04, "accuracy": 0.3566},
    "recent_only": {"ppl": 53.00, "accuracy": 0.3381, "delta_ppl_pct": 12.7, "delta_accuracy_pct": -5.2},
    "random": {"ppl": 51.90, "accuracy": 0.3386, "delta_ppl_pct": 10.3, "delta_accuracy_pct": -5.0},
    "keep_low": {"ppl": 49.24, "accuracy": 0.3459, "delta_ppl_pct": 4.7, "delta_accuracy_pct": -3.0},
}

# Table 2: keep_ratio -> strategy -> (PPL, accuracy), 3-sample means.
KEEP_RATIO = {
    0.3: {"keep_low": (49.87, 0.3448), "random": (50.94, 0.3396)},
    0.4: {"keep_low": (49.59, 0.3466), "random": (50.76, 0.3416)},
    0.5: {"keep_low": (49.24, 0.3459), "random": (51.90, 0.3386)},
    0.6: {"keep_low": (49.43, 0.3458), "random": (51.79, 0.3386)},
}

# Appendix: 10-sample means at keep_ratio 0.7.
STRATEGIES_AT_0_7 = {
    "baseline": {"ppl": 40.28, "accuracy": 0.3483},
    "keep_low": {"ppl": 42.01, "accuracy": 0.3429},
    "random": {"ppl": 43.47, "accuracy": 0.3373},
    "recent_only": {"ppl": 44.11, "accuracy": 0.3359},
}

# The two claimed improvements: metric -> claimed range of the relative change (%), from the
# seed's "improvement effect" table (temporal order: PPL -2..-5 %, Acc +0.5..1 %; mixed
# retention: PPL -3..-5 %, Acc +1..2 %).
TEMPORAL_ORDER = {"ppl": (-5.0, -2.0), "accuracy": (0.5, 1.0)}
MIXED_RETENTION = {"ppl": (-5.0, -3.0), "accuracy": (1.0, 2.0)}

BEST_KEEP_RATIO = (0.4, 0.5)  # "best configuration keep_ratio = 0.4-0.5"
MEMORY_SAVING_PCT = 83.0  # "3000 tokens -> 512 tokens"
