"""Draw the seed's four figures (strategy_comparison, keep_ratio_analysis, ppl_accuracy_tradeoff,
improvement_summary) from the CSVs written by scripts/export_results.py."""

import argparse

from knormpress.report.figures import save_all
from knormpress.report.runs import parse_and_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="folder for the PNGs (default: the --results folder)")
    args, runs, texts = parse_and_read(parser)
    print("wrote", *save_all(runs, texts, args.out or args.results))


if __name__ == "__main__":
    main()
