"""How far the one-pass engines are from token by token in the model's dtype, as measured by
`scripts/bench_engines.py --out results/engine_agreement.jsonl`, for the summary's setup section."""

from __future__ import annotations

import json
from pathlib import Path

ENGINE_AGREEMENT = "engine_agreement.jsonl"  # in the results folder, written by scripts/bench_engines.py --out


def read_engine_agreement(results: str | Path) -> list[dict]:
    """The bench's JSON lines for the study, one per strategy; none when the bench has not been run."""
    path = Path(results) / ENGINE_AGREEMENT
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def engine_lines(rows: list[dict]) -> list[str]:
    """Setup lines: per measured strategy, how far the one-pass engine's numbers are from the
    token-by-token engine's (what "exact" means in the model's dtype; README, engines)."""
    out = []
    for r in rows:
        if "rel_ppl_diff" not in r:
            continue
        c = r["compress"]
        kept = ("" if "kept_set_queries" not in r else
                f", kept sets differ at {r['kept_set_diff_queries']:,} of {r['kept_set_queries']:,} queries "
                f"({r['kept_set_swapped_frac']:.1e} of kept tokens)")
        out.append(
            f"- engines in {r['dtype']}, {r['onepass_engine']} vs token by token (`scripts/bench_engines.py`, git "
            f"{r['git']}; {r['model']}, {r['texts']} text{'s' if r['texts'] != 1 else ''} x {max(r['tokens'])} tokens; "
            f"{r['strategy']}, fix_kv_size "
            f"{c['fix_kv_size']}, keep_ratio {c['keep_ratio']:g}, skip_layers {c['skip_layers']}): PPL "
            f"{r['rel_ppl_diff']:+.1e} relative, accuracy {100 * r['accuracy_diff']:+.3f} pp "
            f"({r['correct_flips']} tokens change), max per-token NLL difference {r['max_abs_nll_diff']:.3g}{kept}")
    return out
