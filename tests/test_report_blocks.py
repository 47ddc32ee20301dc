"""Generated blocks: rewritten between their markers and nowhere else, unknown names refused with the
valid ones, the README in step with results/, and the renderers of the first run and the engine
tables checked against hand-written inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from knormpress.errors import ConfigError
from knormpress.report.blocks import BLOCKS, block_names, current_block, markers, render_blocks, with_block
from knormpress.report.engine_tables import speed_rows, speed_table
from knormpress.report.first_run import first_run_block, numbers, result_lines

ROOT = Path(__file__).resolve().parents[1]


def test_the_block_between_the_markers_is_rewritten_and_nothing_else():
    begin, end = markers("first-run")
    text = f"intro `{begin}` inline\n\n{begin}\nold table\n{end}\n\nrest\n"
    new = with_block(text, "first-run", "new\ntable")
    assert new == f"intro `{begin}` inline\n\n{begin}\nnew\ntable\n{end}\n\nrest\n"
    assert current_block(new, "first-run") == "new\ntable"
    assert block_names(new) == ["first-run"]  # the inline mention is no block
    with pytest.raises(ConfigError, match="first-run:begin"):
        with_block("no markers here", "first-run", "x")


def test_an_unknown_block_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="unknown generated block nope; choose one of first-run, kvpress-parity"):
        block_names("<!-- nope:begin -->\n<!-- nope:end -->\n")


def test_the_readme_blocks_are_what_the_renderers_make_of_the_results():
    """Fails when README.md and results/ drift apart: rerun `python scripts/first_run.py --render-only`."""
    readme = (ROOT / "README.md").read_text()
    assert "first-run" in block_names(readme)
    for name in block_names(readme):
        assert current_block(readme, name) == BLOCKS[name](ROOT / "results"), name


def test_every_block_in_the_docs_is_registered_and_renders(tmp_path):
    pages = sorted((ROOT / "docs").glob("*.md"))
    names = {name for page in pages for name in block_names(page.read_text())}
    assert names == set(BLOCKS) - {"first-run"}  # the first run is the README's
    for page in pages:
        assert render_blocks(page.read_text(), tmp_path).count("Not ") >= len(block_names(page.read_text()))


def test_the_summary_block_leaves_out_commit_hashes(tmp_path):
    (tmp_path / "summary.md").write_text("# Summary\n\n## Setup\n\n- a: 9 runs; engine masked; git 42382615\n"
                                         "- b (`x.py`, git 016b5573+dirty; M, 3 texts)\n- c; git abcdef01; d\n")
    assert BLOCKS["results-summary"](tmp_path) == "### Setup\n\n- a: 9 runs; engine masked\n- b (`x.py`, M, 3 texts)\n- c; d"


def test_a_summary_section_is_cut_at_the_next_section_and_params_come_verbatim(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.md").write_text("# Summary\n\nlead\n\n## When does the key norm carry attention?\n\n"
                                        "rho -0.1\n\n#### a table\n\n| a |\n\n## Next\n\nnot this\n")
    assert BLOCKS["diagnose-summary"](results) == "rho -0.1\n\n##### a table\n\n| a |"
    (results / "summary.md").write_text("# Summary\n\n## Other\n")
    assert BLOCKS["diagnose-summary"](results).startswith("Not built yet")
    assert BLOCKS["study-params"](results).startswith("Not found")
    (tmp_path / "params.yaml").write_text("study:\n  n_samples: 3\n")
    assert BLOCKS["study-params"](results) == "```yaml\nstudy:\n  n_samples: 3\n```"


LOG = """[2026-12-06 10:16:23,248][knormpress.sources][INFO] - loaded model M (source pypi) in 2.6 s
[2026-12-06 10:19:10,683][knormpress][INFO] - baseline: ppl 38.686, accuracy 35.99%, 3 samples in 159.8 s [run 343ebc]
some warning
[2026-12-06 10:21:41,571][knormpress][INFO] - keep_low r=0.5: ppl 42.609 (+10.14%), 3 samples in 144.5 s [run ddaf23]
"""


def test_the_first_run_keeps_the_result_lines_and_compares_them_without_timings():
    lines = result_lines(LOG)
    assert lines == ["baseline: ppl 38.686, accuracy 35.99%, 3 samples in 159.8 s",
                     "keep_low r=0.5: ppl 42.609 (+10.14%), 3 samples in 144.5 s"]
    assert numbers(lines[1]) == "keep_low r=0.5: ppl 42.609 (+10.14%), 3 samples"
    assert numbers("keep_low r=0.5: ppl 42.609, 3 samples in 1.5 s, peak RSS 2.41 GiB") == "keep_low r=0.5: ppl 42.609, 3 samples"
    block = first_run_block({"lines": lines, "wall_s": 154.6, "cpu_s": 252.0, "peak_rss_gb": 2.56, "cpu_cores": 2,
                             "load_avg_at_start": 1.5})
    assert block.startswith("```text\nbaseline: ppl 38.686")
    assert "On 2 CPU cores (load average 1.5 as it started" in block
    assert "it took 2 min 35 s (4.2 min of CPU time) and peaked at 2.6 GB of memory" in block
    assert first_run_block(None) == "Not measured yet: run `python scripts/first_run.py`."


def bench(strategy: str, onepass: float, streaming: float | None, positions: str = "true") -> dict:
    return {"model": "M", "dtype": "float32", "dataset": "gutenberg", "tokens": [3000], "texts": 1, "threads": 2,
            "fix_kv_size": 512, "keep_ratio": 0.5, "strategy": strategy, "positions": positions, "interval": 1,
            "onepass_engine": "replay", "forward_s": 10.0, "onepass_s": onepass, "streaming_s": streaming}


def test_the_speed_table_keeps_the_newest_line_of_a_setting_and_borrows_its_streaming_time(tmp_path):
    rows = [bench("h2o", 30.0, 300.0), bench("keep_low", 150.0, 330.0, "rerotate"), bench("keep_low", 66.0, None, "rerotate")]
    newest = speed_rows(rows)
    assert [(r["strategy"], r["onepass_s"], r["streaming_s"], r["borrowed"]) for r in newest] == [
        ("h2o", 30.0, 300.0, False), ("keep_low", 66.0, 330.0, True)]
    (tmp_path / "engine_speed.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    table = speed_table(tmp_path).splitlines()
    assert table[-1] == ("| keep_low, positions=rerotate, 1 text, 2 threads | replay | 10.00 | 66.00 | 6.60 | "
                         "330.0 (earlier run) | 5.0x |")  # 330 / 66


def test_the_speed_table_reads_the_settings_of_newer_lines_under_compress(tmp_path):
    """scripts/bench_engines.py now writes the compress settings under "compress"; older lines kept them flat."""
    old = bench("keep_low", 73.0, 344.0, "rerotate")
    new = {k: v for k, v in bench("keep_low", 14.0, 298.0).items() if k not in ("fix_kv_size", "keep_ratio", "positions", "interval")}
    new["compress"] = {"fix_kv_size": 512, "keep_ratio": 0.5, "positions": "rerotate", "interval": 64}
    (tmp_path / "engine_speed.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in (old, new)))
    table = speed_table(tmp_path).splitlines()
    assert table[-2:] == ["| keep_low, positions=rerotate, 1 text, 2 threads | replay | 10.00 | 73.00 | 7.30 | 344.0 | 4.7x |",
                          "| keep_low, positions=rerotate, interval 64, 1 text, 2 threads | replay | 10.00 | 14.00 | 1.40 | "
                          "298.0 | 21.3x |"]
