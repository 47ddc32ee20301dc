"""Write results/summary.md: the seed's tables rebuilt from the exported runs, beside the seed's
numbers, a verdict per seed claim computed from the data, and every experiment's runs."""

import argparse
import sys
from pathlib import Path

from knormpress.errors import ConfigError
from knormpress.report.runs import read_results
from knormpress.report.summary import summary_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="results", help="folder with the exported CSVs (default: results)")
    parser.add_argument("--out", help="output file (default: <results>/summary.md)")
    args = parser.parse_args()
    try:
        runs, texts = read_results(args.results)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    out = Path(args.out or Path(args.results) / "summary.md")
    out.write_text(summary_markdown(runs, texts))
    print("wrote", out)


if __name__ == "__main__":
    main()
