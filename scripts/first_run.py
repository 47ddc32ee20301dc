"""Record the README's first run: `python run.py` with the defaults, from an empty folder, into
results/first_run.json (its result lines, wall time, peak memory), then rewrite the README's
generated blocks. `--check` reruns it and fails when the printed numbers differ from the record
(timings aside); `--render-only` only rewrites the blocks.

Example: python scripts/first_run.py   (about 2.5 min and 2.6 GB on 2 cores)
"""

import argparse
import json
import sys
from pathlib import Path

from knormpress.report.blocks import render_blocks
from knormpress.report.first_run import FIRST_RUN, measure, numbers, read_first_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="rerun and compare with the record; write nothing")
    mode.add_argument("--render-only", action="store_true", help="only rewrite the README's blocks")
    args = p.parse_args()
    if args.check:
        recorded, now = read_first_run(args.results), measure(ROOT)
        want = [numbers(line) for line in (recorded or {}).get("lines", [])]
        got = [numbers(line) for line in now["lines"]]
        print(*now["lines"], f"{now['wall_s']:.0f} s, peak {now['peak_rss_gb']:.2f} GB", sep="\n")
        if got != want:
            sys.exit(f"the first run printed other numbers than results/{FIRST_RUN}:\n" + "\n".join(want))
        print("the first run prints the recorded numbers")
        return
    if not args.render_only:
        record = measure(ROOT)
        (args.results / FIRST_RUN).write_text(json.dumps(record, indent=1) + "\n")
        print(*record["lines"], f"{record['wall_s']:.0f} s, peak {record['peak_rss_gb']:.2f} GB", sep="\n")
    args.readme.write_text(render_blocks(args.readme.read_text(), args.results))
    print("rewrote the generated blocks of", args.readme)


if __name__ == "__main__":
    main()
