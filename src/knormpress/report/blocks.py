"""Generated blocks: the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in README.md and
docs/*.md is rendered from results/ by the function registered under NAME, so no page restates a
measured number by hand. `scripts/render_blocks.py` rewrites them, the docs build renders them afresh
(docs/hooks.py), and tests/test_report_blocks.py fails when a committed block drifts from its data."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from knormpress.errors import ConfigError
from knormpress.report.agreement import read_engine_agreement
from knormpress.report.diagnose_summary import TITLE as DIAGNOSE_TITLE
from knormpress.report.engine_tables import agreement_table, speed_table
from knormpress.report.first_run import first_run_block, read_first_run
from knormpress.report.kvpress_parity import PARITY, parity_block, read_parity

# name -> render(results folder): the one list of generated blocks
BLOCKS: dict[str, Callable[[Path], str]] = {
    "first-run": lambda results: first_run_block(read_first_run(results)),
    "kvpress-parity": lambda results: parity_block(read_parity(results / PARITY)),
    "engine-speed": lambda results: speed_table(results),
    "engine-agreement": lambda results: agreement_table(read_engine_agreement(results)),
    "results-summary": lambda results: summary_body(results),
    "diagnose-summary": lambda results: summary_section(results, DIAGNOSE_TITLE),
    "study-params": lambda results: study_params(results.parent / "params.yaml"),
}
_COMMIT = re.compile(r"(; )?\bgit [0-9a-f]{7,40}(\+dirty)?(; )?")  # provenance for results/, not for pages
_MARKER = re.compile(r"^<!-- ([a-z0-9-]+):begin -->$", re.MULTILINE)  # a marker is a line of its own


def markers(name: str) -> tuple[str, str]:
    """The begin and end comments of block `name` (invisible in rendered Markdown)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _span(text: str, name: str) -> tuple[int, int]:
    """Where block `name`'s content lies: after its begin line, up to its end line."""
    begin, end = markers(name)
    found = re.search(rf"^{re.escape(begin)}$(.*?)^{re.escape(end)}$", text, re.MULTILINE | re.DOTALL)
    if found is None:
        raise ConfigError(f"no {begin} ... {end} block (each marker on a line of its own)")
    return found.start(1), found.end(1)


def with_block(text: str, name: str, block: str) -> str:
    """`text` with what lies between block `name`'s markers replaced by `block`."""
    start, stop = _span(text, name)
    return f"{text[:start]}\n{block}\n{text[stop:]}"


def current_block(text: str, name: str) -> str:
    """What lies between block `name`'s markers now (without the line breaks next to them)."""
    start, stop = _span(text, name)
    return text[start:stop].strip("\n")


def block_names(text: str) -> list[str]:
    """The blocks `text` holds, in order; an unregistered name is a mistake, named with the valid ones."""
    names = _MARKER.findall(text)
    unknown = sorted(set(names) - set(BLOCKS))
    if unknown:
        raise ConfigError(f"unknown generated block {', '.join(unknown)}; choose one of {', '.join(BLOCKS)}")
    return names


def render_blocks(text: str, results: str | Path) -> str:
    """`text` with every generated block it holds rendered afresh from `results`."""
    for name in block_names(text):
        text = with_block(text, name, BLOCKS[name](Path(results)))
    return text


def summary_body(results: Path) -> str:
    """results/summary.md (written by `scripts/make_summary.py` from the exported runs) without its
    title, its sections one level down so they sit under the page's own title."""
    path = results / "summary.md"
    if not path.exists():
        return "Not built yet: run `dvc repro`."
    lines = path.read_text().splitlines()
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    text = "\n".join(f"#{line}" if line.startswith("#") else line for line in body).strip("\n")
    return _COMMIT.sub(lambda m: "; " if m.group(1) and m.group(3) else "", text)


def summary_section(results: Path, title: str) -> str:
    """The section of results/summary.md headed `title` (to the next section), one level down."""
    body = summary_body(results).splitlines()
    heading = f"#{title}"
    if heading not in body:
        return f"Not built yet: run `dvc repro` (results/summary.md has no section {title.lstrip('# ')!r})."
    start = body.index(heading) + 1
    stop = next((i for i in range(start, len(body)) if body[i].startswith(("## ", "### "))), len(body))
    return "\n".join(body[start:stop]).strip("\n")


def study_params(path: Path) -> str:
    """params.yaml as it is, in a YAML code block: the study's size is stated once, there."""
    if not path.exists():
        return f"Not found: {path} (the study's params.yaml, beside results/)."
    return f"```yaml\n{path.read_text().strip()}\n```"
