"""The engines' speed and float32 agreement as tables, from `scripts/bench_engines.py`'s JSON lines
(results/engine_speed.jsonl and results/engine_agreement.jsonl), for the docs' engines page."""

from __future__ import annotations

import json
from pathlib import Path

from knormpress.report.agreement import ENGINE_AGREEMENT

ENGINE_SPEED = "engine_speed.jsonl"  # in the results folder: `scripts/bench_engines.py --out ...` lines, oldest first


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def field(row: dict, name: str, default: object = None) -> object:
    """A compress setting of a bench line: top-level in older lines, under "compress" in newer ones."""
    return row.get(name, row.get("compress", {}).get(name, default))


def setting(row: dict) -> str:
    """What a bench line measured, in words: the strategy and what differs from the study's defaults."""
    parts = [row["strategy"]]
    if str(field(row, "positions", "true")) != "true":
        parts.append(f"positions={field(row, 'positions')}")
    if field(row, "interval", 1) != 1:
        parts.append(f"interval {field(row, 'interval')}")
    parts.append(f"{row['texts']} text{'s' if row['texts'] != 1 else ''}, {row['threads']} "
                 f"thread{'s' if row['threads'] != 1 else ''}")
    return ", ".join(parts)


def speed_rows(rows: list[dict]) -> list[dict]:
    """The newest line of each setting; a line timed without the streaming pass (`--no-streaming`)
    borrows the newest streaming time of its setting, marked as such."""
    newest: dict[str, dict] = {}
    streaming: dict[str, float] = {}
    for r in rows:
        key = setting(r)
        newest[key] = dict(r, borrowed=False)
        if r.get("streaming_s"):
            streaming[key] = r["streaming_s"]
    for key, r in newest.items():
        if not r.get("streaming_s") and key in streaming:
            r.update(streaming_s=streaming[key], borrowed=True)
    return list(newest.values())


def speed_table(results: str | Path) -> str:
    """One row per measured setting: forward pass, one-pass engine and token-by-token engine times."""
    rows = speed_rows(_read(Path(results) / ENGINE_SPEED) + _read(Path(results) / ENGINE_AGREEMENT))
    if not rows:
        return "Not measured yet: run `python scripts/bench_engines.py --out results/engine_speed.jsonl`."
    first = rows[0]  # the setting every row shares; lines of another budget are the agreement table's
    budget = (field(first, "fix_kv_size"), field(first, "keep_ratio"))
    rows = [r for r in rows if (field(r, "fix_kv_size"), field(r, "keep_ratio")) == budget]
    lines = [f"Generated from `results/{ENGINE_SPEED}` and `results/{ENGINE_AGREEMENT}` "
             f"(`scripts/bench_engines.py`): {first['model']} in {first['dtype']}, {max(first['tokens'])}-token "
             f"{first['dataset']} texts, fix_kv_size {budget[0]}, keep_ratio {budget[1]:g}, "
             "skip_layers [0, 1]; times in seconds.", "",
             "| setting | one-pass engine | forward | one-pass | one-pass / forward | token by token | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stream = "" if not r.get("streaming_s") else f"{r['streaming_s']:.1f}" + (" (earlier run)" if r["borrowed"] else "")
        speedup = "" if not r.get("streaming_s") else f"{r['streaming_s'] / r['onepass_s']:.1f}x"
        lines.append(f"| {setting(r)} | {r['onepass_engine']} | {r['forward_s']:.2f} | {r['onepass_s']:.2f} | "
                     f"{r['onepass_s'] / r['forward_s']:.2f} | {stream} | {speedup} |")
    return "\n".join(lines)


def agreement_table(rows: list[dict]) -> str:
    """How far a one-pass engine's numbers are from token by token in float32, one row per bench line."""
    rows = [r for r in rows if "rel_ppl_diff" in r]
    if not rows:
        return "Not measured yet: run `python scripts/bench_engines.py --n-samples 3 --out results/engine_agreement.jsonl`."
    lines = ["Generated from `results/engine_agreement.jsonl` (`scripts/bench_engines.py --n-samples 3`).", "",
             "| setting | PPL one-pass / token by token - 1 | accuracy change | tokens whose prediction changes | "
             "max per-token NLL difference | queries whose kept set differs | kept tokens that differ |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["compress"]
        name = (f"{setting(r)}, {r['onepass_engine']}, fix_kv_size {c['fix_kv_size']}, keep_ratio {c['keep_ratio']:g}, "
                f"skip_layers {c['skip_layers']}")
        kept = ("", "") if "kept_set_queries" not in r else (
            f"{r['kept_set_diff_queries']:,} of {r['kept_set_queries']:,}", f"{r['kept_set_swapped_frac']:.1e}")
        lines.append(f"| {name} | {r['rel_ppl_diff']:+.1e} | {100 * r['accuracy_diff']:+.3f} pp | {r['correct_flips']} | "
                     f"{r['max_abs_nll_diff']:.3g} | {kept[0]} | {kept[1]} |")
    return "\n".join(lines)
