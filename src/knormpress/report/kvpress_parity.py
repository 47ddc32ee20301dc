"""The agreement with NVIDIA kvpress as a table, from results/kvpress_parity.jsonl
(`scripts/kvpress_parity.py`): for the docs' generated block and results/summary.md."""

from __future__ import annotations

import json
from pathlib import Path


PARITY = "kvpress_parity.jsonl"  # in the results folder


def read_parity(path: str | Path) -> list[dict]:
    """The script's JSON lines (results/kvpress_parity.jsonl), one per press and mode; none when it has not been run."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def verdict(row: dict) -> str:
    """bit for bit: same kept sets and identical logits; same kept sets: the logits differ by float
    rounding only (how attention is computed, or the cache's order); differ: some kept set differs."""
    if row["kept_sets_differ"]:
        return "differ"
    return "bit for bit" if row["max_abs_logit_diff"] == 0 else "same kept sets"


def _first(row: dict) -> str:
    f = row["first_difference"]
    return "" if f is None else f" (first after token {f['after_token']}, layer {f['layer']}, KV head {f['kv_head']})"


def _setting(row: dict) -> str:
    s = row["setting"]
    return (f"{s['model']} in {s['dtype']}, the first {s['tokens']} tokens of {s['text']}, fix_kv_size "
            f"{s['fix_kv_size']}, keep_ratio {s['keep_ratio']:g}, every layer pruned after every token, "
            f"{s['threads']} thread{'s' if s['threads'] != 1 else ''}. kvpress {s['kvpress_versions']['kvpress']} "
            f"(transformers {s['kvpress_versions']['transformers']}): "
            f"`{s['kvpress_press'].replace(row['kvpress'], '<kvpress>')}` with the press of the first column; ours: the "
            f"token-by-token engine (transformers {s['transformers']}). \"our tie rule\": kvpress' "
            "selection replaced at run time by ours (equal scores go to the earlier position, kept tokens in "
            "time order, KnormPress' norms rounded to 10 significant bits).")


def parity_block(rows: list[dict]) -> str:
    """Setting line and table, one row per press and mode."""
    if not rows:
        return "Not measured yet: run `python scripts/kvpress_parity.py`."
    lines = [f"Generated from `results/kvpress_parity.jsonl` (`scripts/kvpress_parity.py`): {_setting(rows[0])}", "",
             "| kvpress | ours | kvpress selection | kept sets that differ | PPL kvpress | PPL ours | "
             "max abs logit difference (before any pruning) | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kvpress']} | {r['ours']} | {r['mode']} | {r['kept_sets_differ']:,} of {r['kept_sets']:,}"
                     f"{_first(r)} | {r['ppl_kvpress']:.4f} | {r['ppl_ours']:.4f} | {r['max_abs_logit_diff']:.2g} "
                     f"({r['max_abs_logit_diff_unpruned']:.2g}) | "
                     f"{verdict(r)} |")
    return "\n".join(lines)

