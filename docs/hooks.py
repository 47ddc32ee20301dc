"""MkDocs hooks: render every generated block from results/ into the pages as they are built, and
publish the figures of results/ under results/ in the site, so the docs never restate a number."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

from knormpress.report.blocks import render_blocks

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def on_files(files, config):
    """Add results/*.png to the site (pages link them as results/<name>.png)."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Each `<!-- name:begin -->` ... `<!-- name:end -->` block rendered from results/."""
    return render_blocks(markdown, RESULTS)
