"""Draw the seed's four figures (strategy_comparison, keep_ratio_analysis, ppl_accuracy_tradeoff,
improvement_summary) from the CSVs written by scripts/export_results.py."""

import argparse
import sys

from knormpress.errors import ConfigError
from knormpress.report.figures import save_all
from knormpress.report.runs import read_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="results", help="folder with the exported CSVs (default: results)")
    parser.add_argument("--out", help="folder for the PNGs (default: the --results folder)")
    args = parser.parse_args()
    try:
        runs, texts = read_results(args.results)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print("wrote", *save_all(runs, texts, args.out or args.results))


if __name__ == "__main__":
    main()
