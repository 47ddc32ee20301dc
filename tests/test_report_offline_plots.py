"""`dvc plots show` offline: the page template carries the plotting libraries inline and DVC's
placeholders but not its CDN scripts; the page DVC writes with it loads nothing from the internet
(DVC's own page does), and, where Chromium is installed, the plots render with the network cut off."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knormpress.report.offline_plots import VEGA_LITE, page_template, remote_loads

ROOT = Path(__file__).resolve().parents[1]
needs_bundle = pytest.mark.skipif(importlib.util.find_spec("vl_convert") is None,
                                  reason="vl-convert-python comes with the dev extra")


def test_the_template_inlines_the_bundle_and_leaves_out_dvcs_scripts():
    page = page_template("window.vegaEmbed = function () {};")
    assert "{plot_divs}" in page and "{refresh_tag}" in page and "{scripts}" not in page
    assert "<script type=\"text/javascript\">\nwindow.vegaEmbed = function () {};\n</script>" in page
    with pytest.raises(ValueError, match="closes its own"):
        page_template("var s = '</script>';")


def test_only_what_a_browser_fetches_by_itself_counts_as_a_remote_load():
    assert remote_loads('<script src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>') == [
        "https://cdn.jsdelivr.net/npm/vega@5.20.2"]
    assert remote_loads("<link rel='stylesheet' href='http://x.org/a.css'><style>@import url(https://y.org/b.css);</style>"
                        ) == ["http://x.org/a.css", "https://y.org/b.css"]
    assert remote_loads('<script>var ns = "http://www.w3.org/2000/svg";</script><img src="static/a.png">') == []


def show(out: Path, template: Path | None = None) -> str:
    """`dvc plots show` of this repository into `out`, with `template` if given; the page's text."""
    extra = [] if template is None else ["--html-template", str(template)]
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return (out / "index.html").read_text()


@needs_bundle
def test_the_page_dvc_writes_with_the_template_loads_nothing_from_the_internet(tmp_path):
    import vl_convert

    assert VEGA_LITE in vl_convert.get_vegalite_versions()
    template = tmp_path / "page.html"
    template.write_text(page_template(vl_convert.javascript_bundle(vl_version=VEGA_LITE)))
    assert remote_loads(show(tmp_path / "dvc", template=template)) == []
    default = subprocess.run([sys.executable, "-c", "from dvc_render.vega import VegaRenderer; print(VegaRenderer.SCRIPTS)"],
                             capture_output=True, text=True, check=True).stdout
    assert remote_loads(default)  # what DVC's own page would load: the test can fail
    page = (tmp_path / "dvc" / "index.html").read_text()
    assert page.count("vegaEmbed(") == 3  # the three plots of dvc.yaml


@needs_bundle
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_plots_render_with_the_network_cut_off(tmp_path):
    import vl_convert

    template = tmp_path / "page.html"
    template.write_text(page_template(vl_convert.javascript_bundle(vl_version=VEGA_LITE)))
    show(tmp_path / "dvc", template=template)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                          "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=15000", "--dump-dom",
                          (tmp_path / "dvc" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    drawn = re.findall(r"<canvas[^>]*class=\"marks\"|<svg[^>]*class=\"marks\"", dom)
    assert len(drawn) == 3, dom[-2000:]
