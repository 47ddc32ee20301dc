"""Write results/metrics.json, the headline numbers DVC tracks (`dvc metrics show`, `dvc metrics
diff`): per model, task and strategy at the task's default compression setting (the Compression
spec's defaults and the task's declared `setting`, one experiment per model and task:
knormpress.report.study_headline), from the CSVs
written by scripts/export_results.py; and each model's verdicts on the seed's claims under `claims`
(knormpress.report.claims.verdict_metrics), in the summary's words."""

import argparse
import json
from pathlib import Path

from knormpress.report.claims import verdict_metrics
from knormpress.report.study_headline import study_headline
from knormpress.report.runs import parse_and_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="output file (default: <results>/metrics.json)")
    args, runs, texts = parse_and_read(parser)
    out = Path(args.out or Path(args.results) / "metrics.json")
    numbers = study_headline(runs)
    for model, verdicts in verdict_metrics(runs, texts).items():
        numbers.setdefault(model, {})["claims"] = verdicts
    out.write_text(json.dumps(numbers, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
