"""The docs site: every nav page exists, every relative link in README.md and docs/ resolves, and
(where mkdocs is installed, the dev extra) the site builds with --strict into a temporary folder."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def nav_pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    return [page for entry in config["nav"] for page in entry.values()]


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    pages = nav_pages()
    assert all((ROOT / "docs" / page).is_file() for page in pages), pages
    assert sorted(pages) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))])
def test_every_relative_link_resolves(page):
    path = ROOT / page
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = target.split("#")[0]
        if page.startswith("docs/") and file.startswith("results/"):  # figures the docs build copies from results/
            assert (ROOT / file).is_file(), target
        else:
            assert (path.parent / file).exists(), f"{page}: {target}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs comes with the dev extra")
def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = (tmp_path / "site" / "results" / "index.html").read_text()
    assert "How verdicts are decided" in results and "Not built yet" not in results
    assert (tmp_path / "site" / "results" / "strategy_comparison.png").is_file()
    engines = (tmp_path / "site" / "engines" / "index.html").read_text()
    assert "Generated from <code>results/engine_speed.jsonl</code>" in engines
