"""Export the finished MLflow runs of one experiment to results/<experiment>.csv (one row per run)
and results/per_text/<experiment>.csv (each run's per_text.csv: what pairs runs for the summary's intervals)."""

import argparse
import sys

from knormpress.errors import ConfigError
from knormpress.report.runs import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (preset) name, e.g. strategies")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args()
    try:
        paths = export(args.experiment, args.out, args.tracking_uri)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
