"""Write .dvc/plots/offline_page.html, the page template `dvc plots show` uses (.dvc/config), with
Vega, Vega-Lite and Vega-Embed inlined, so the plots render without internet. Run once after
installing (it needs the dev extra's vl-convert-python); `dvc plots show` fails with "HTML template
has to contain '{plot_divs}'" until it has been run.

Example: python scripts/offline_plots.py && dvc plots show
"""

import argparse
from pathlib import Path

from knormpress.report.offline_plots import remote_loads, write_template

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    path = write_template(ROOT)
    html = path.read_text(encoding="utf8")
    assert not remote_loads(html), remote_loads(html)
    print(f"wrote {path.relative_to(ROOT)} ({len(html) / 1e6:.1f} MB, loads nothing from the internet)")


if __name__ == "__main__":
    main()
