"""`dvc plots show` offline. DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without
internet its interactive plots stay blank. `.dvc/config` names a page template instead
(`plots.html_template`), and this module writes it with the three libraries inlined from
vl-convert-python's bundle (a dev dependency): the page then loads nothing from the internet. The
template is generated, never committed, as the libraries are third-party code."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = Path(".dvc") / "plots" / "offline_page.html"  # .dvc/config: plots.html_template = plots/offline_page.html
VEGA_LITE = "5.21"  # the Vega-Lite the templates in .dvc/plots/ declare ($schema .../vega-lite/v5.json)
# what makes a browser fetch a URL by itself: an element's src or href, a CSS import or url()
_LOADS = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*["']?(https?://[^"'\s>]+)"""
                    r"""|@import\s+(?:url\()?["']?(https?://[^"')\s]+)|url\(\s*["']?(https?://[^"')\s]+)""", re.I)


def page_template(bundle: str) -> str:
    """DVC's page with `bundle` inlined. DVC fills `{plot_divs}` and `{refresh_tag}`; the template has
    no `{scripts}`, the placeholder where DVC would put its CDN script tags."""
    if "</script" in bundle.lower():
        raise ValueError("the bundle closes its own <script> element; it cannot be inlined as is")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n<title>DVC Plot</title>\n"
            f"<script type=\"text/javascript\">\n{bundle}\n</script>\n"
            "<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


def write_template(root: str | Path) -> Path:
    """Write the offline template under `root` (the repository) and return its path."""
    import vl_convert  # dev extra; imported here so the report never needs it

    path = Path(root) / TEMPLATE
    path.write_text(page_template(vl_convert.javascript_bundle(vl_version=VEGA_LITE)), encoding="utf8")
    return path


def remote_loads(html: str) -> list[str]:
    """The http(s) URLs a browser would fetch on its own when opening `html` (not links a user clicks)."""
    return [next(url for url in m.groups() if url) for m in _LOADS.finditer(html)]
