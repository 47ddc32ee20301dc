"""Write results/metrics.json, the headline numbers DVC tracks (`dvc metrics show`, `dvc metrics
diff`): per model and strategy at the default compression setting (conf/config.yaml), from the
CSVs written by scripts/export_results.py."""

import argparse
import json
from pathlib import Path

import yaml

from knormpress.report.headline import headline
from knormpress.report.runs import parse_and_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/config.yaml", help="where the default compress setting is (default: conf/config.yaml)")
    parser.add_argument("--out", help="output file (default: <results>/metrics.json)")
    args, runs, _ = parse_and_read(parser)
    setting = yaml.safe_load(Path(args.config).read_text())["compress"]
    out = Path(args.out or Path(args.results) / "metrics.json")
    out.write_text(json.dumps(headline(runs, setting), indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
