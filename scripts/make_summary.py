"""Write results/summary.md: the seed's tables rebuilt from the exported runs, beside the seed's
numbers, a verdict per seed claim computed from the data, and every experiment's runs; the setup
quotes results/engine_agreement.jsonl (scripts/bench_engines.py --out) and a section the agreement with
NVIDIA kvpress, results/kvpress_parity.jsonl (scripts/kvpress_parity.py), and each experiment stage's
wall time, results/timings/ (written by scripts/export_results.py), where they exist."""

import argparse
from pathlib import Path

from knormpress.report.runs import parse_and_read
from knormpress.report.agreement import read_engine_agreement
from knormpress.report.kvpress_parity import PARITY, read_parity
from knormpress.report.summary import summary_markdown
from knormpress.report.timings import read_timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="output file (default: <results>/summary.md)")
    args, runs, texts = parse_and_read(parser)
    out = Path(args.out or Path(args.results) / "summary.md")
    out.write_text(summary_markdown(runs, texts, engines=read_engine_agreement(args.results),
                                    parity=read_parity(Path(args.results) / PARITY),
                                    timings=read_timings(args.results)))
    print("wrote", out)


if __name__ == "__main__":
    main()
