"""The agreement with NVIDIA kvpress as rendered: the table from hand-built lines and the summary's
section (the docs page's block: tests/test_report_blocks.py)."""

from __future__ import annotations

from report_data import V1

from knormpress.report.kvpress_parity import parity_block, verdict
from knormpress.report.runs import read_results
from knormpress.report.summary import summary_markdown

SETTING = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "text": "Hamlet", "tokens": 800, "fix_kv_size": 128,
           "keep_ratio": 0.0, "threads": 1, "transformers": "5.25.0", "git": "abcdef12",
           "kvpress_versions": {"kvpress": "0.5.5", "transformers": "5.2.0"},
           "kvpress_press": "DecodingPress(base_press=KnormPress(), compression_interval=1, target_size=128)"}


def row(mode: str, differ: int, logit_diff: float, first: dict | None = None, unpruned: float = 0.0) -> dict:
    return {"press": "knorm", "kvpress": "KnormPress", "ours": "keep_low", "mode": mode, "kept_sets_differ": differ,
            "kept_sets": 60390, "first_difference": first, "ppl_ours": 55.123456, "ppl_kvpress": 56.0,
            "max_abs_logit_diff": logit_diff, "max_abs_logit_diff_unpruned": unpruned, "setting": SETTING}


def test_the_verdict_separates_bit_for_bit_from_same_kept_sets():
    assert verdict(row("our tie rule", 0, 0.0)) == "bit for bit"
    assert verdict(row("our tie rule", 0, 8e-5)) == "same kept sets"
    assert verdict(row("stock", 3, 0.0)) == "differ"


def test_the_table_has_one_row_per_press_and_mode():
    rows = [row("stock", 1234, 1.5, {"after_token": 130, "layer": 2, "kv_head": 1}, 8.2e-5), row("our tie rule", 0, 0.0)]
    lines = parity_block(rows).splitlines()
    assert lines[0].startswith("Generated from `results/kvpress_parity.jsonl`")
    assert "SmolLM2-135M-Instruct in float32, the first 800 tokens of Hamlet, fix_kv_size 128, keep_ratio 0," in lines[0]
    assert "`DecodingPress(base_press=<kvpress>(), compression_interval=1, target_size=128)` with the press" in lines[0]
    assert lines[-2:] == [
        "| KnormPress | keep_low | stock | 1,234 of 60,390 (first after token 130, layer 2, KV head 1) | 56.0000 | "
        "55.1235 | 1.5 (8.2e-05) | differ |",
        "| KnormPress | keep_low | our tie rule | 0 of 60,390 | 56.0000 | 55.1235 | 0 (0) | bit for bit |"]
    assert parity_block([]) == "Not measured yet: run `python scripts/kvpress_parity.py`."


def test_the_summary_quotes_the_agreement_only_when_measured():
    runs, texts = read_results(V1)
    rows = [row("our tie rule", 0, 0.0)]
    with_parity = summary_markdown(runs, texts, parity=rows)
    assert f"## Agreement with NVIDIA kvpress\n\n{parity_block(rows)}" in with_parity
    assert "## Agreement with NVIDIA kvpress" not in summary_markdown(runs, texts)
