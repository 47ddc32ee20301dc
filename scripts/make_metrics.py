"""Write results/metrics.json, the headline numbers DVC tracks (`dvc metrics show`, `dvc metrics
diff`): per model, task and strategy at the task's default compression setting, from the CSVs
written by scripts/export_results.py. The default setting is conf/config.yaml's `compress` node,
overridden by `conf/experiment/<task>.yaml`'s where that preset exists (the retrieval tasks give
their budget as a ratio of the prompt)."""

import argparse
import json
from pathlib import Path

import yaml

from knormpress.report.headline import headline
from knormpress.report.runs import parse_and_read


def task_setting(config: Path, task: str) -> dict:
    """The compress node a task's headline numbers are read at."""
    setting = yaml.safe_load(config.read_text())["compress"]
    preset = config.parent / "experiment" / f"{task}.yaml"
    if preset.exists():
        setting |= yaml.safe_load(preset.read_text()).get("compress") or {}
    return setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="conf/config.yaml", help="where the default compress setting is (default: conf/config.yaml)")
    parser.add_argument("--out", help="output file (default: <results>/metrics.json)")
    args, runs, _ = parse_and_read(parser)
    settings = {task: task_setting(Path(args.config), task) for task in runs.task.fillna("?").unique()}
    out = Path(args.out or Path(args.results) / "metrics.json")
    out.write_text(json.dumps(headline(runs, settings), indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
