"""The first run a newcomer makes, recorded: `python run.py` with the defaults, its console result
lines, wall time and peak memory (results/first_run.json, written by `scripts/first_run.py`), for
the README's generated block; `--check` reruns it and compares the numbers it prints."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_RUN = "first_run.json"  # in the results folder
_RESULT = re.compile(r"^\[[^\]]*\]\[knormpress\]\[INFO\] - (.*?)(?: \[run [0-9a-f]+\])?$")
_TIMING = re.compile(r" in [0-9.]+ s(?:, peak RSS [0-9.]+ GiB)?$")  # time and memory vary by machine


def result_lines(output: str) -> list[str]:
    """The run's one-line results (logger `knormpress`), without timestamp and run id."""
    return [m.group(1) for m in map(_RESULT.match, output.splitlines()) if m]


def numbers(line: str) -> str:
    """A result line without its timing and peak memory, the part that must not change from machine to machine."""
    return _TIMING.sub("", line)


def measure(root: Path) -> dict:
    """Run `python run.py` from an empty folder (so a fresh MLflow store, mlflow.db and mlartifacts/,
    and Hydra's outputs/ land there) and record what it prints, its wall time and its peak memory."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    load = os.getloadavg()[0]  # other work on the machine stretches the time
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(root / "run.py")], cwd=scratch, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"python run.py exited {done.returncode}:\n{done.stdout[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the run: this process waits for no other child
    return {"command": "python run.py", "lines": result_lines(done.stdout), "wall_s": round(seconds, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # what other work on the machine does not stretch
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2), "cpu_cores": os.cpu_count(),
            "load_avg_at_start": round(load, 1)}


def read_first_run(results: str | Path) -> dict | None:
    """The recorded first run, or None when `scripts/first_run.py` has not been run."""
    path = Path(results) / FIRST_RUN
    return json.loads(path.read_text()) if path.exists() else None


def first_run_block(record: dict | None) -> str:
    """What the README shows of the first run: the printed lines in a code block, time and memory."""
    if record is None:
        return "Not measured yet: run `python scripts/first_run.py`."
    minutes, seconds = divmod(round(record["wall_s"]), 60)
    cpu = "" if "cpu_s" not in record else f" ({record['cpu_s'] / 60:.1f} min of CPU time)"
    return "\n".join([
        "```text", *record["lines"], "```", "",
        f"One line per run: the baseline (no compression) and keep_low at its defaults. On "
        f"{record['cpu_cores']} CPU cores (load average {record['load_avg_at_start']:g} as it started; more "
        f"load, more time), with the model and texts already cached, it took {minutes} min {seconds:02d} s{cpu} "
        f"and peaked at {record['peak_rss_gb']:.1f} GB of memory (generated from "
        f"`results/{FIRST_RUN}` by `python scripts/first_run.py`, which `--check` reruns)."])
