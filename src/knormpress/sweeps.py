"""Multiruns in MLflow: one parent run per sweep, created when its first job really runs, named
from the preset or the sweep overrides, closed with a comparison of its children (drawn by the
function the callback's config names: the sweep code never imports the report).

Child jobs (in this process or, with joblib/submitit, in others) find the parent through
<sweep dir>/mlflow_parent.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig
from tqdm.auto import tqdm

from knormpress.tracking import HISTORY_PREFIX, TAGS, Tracker, retry, show_progress, tags

log = logging.getLogger("knormpress.sweeps")
REUSED_FILE = "mlflow_reused.txt"  # runs this multirun's jobs reused, one id a line (`note_reused`)
PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes find their parent run
COMPARISON = "comparison.png"  # the sweep parent's figure of its children

def sweep_dir(hydra_cfg: DictConfig) -> Path:
    return Path(hydra_cfg.runtime.cwd, hydra_cfg.sweep.dir).resolve()


def _sweep_overrides(config: DictConfig) -> tuple[list[str], int | None]:
    """The command line's sweep overrides (e.g. compress.keep_ratio=0.3,0.5) and the number of jobs
    in a basic-sweeper grid (preset params, then command line), None if unknown."""
    params = config.hydra.sweeper.get("params") or {}
    task = list(config.hydra.overrides.task)
    try:
        parser = OverridesParser.create()
        swept = [o.input_line for o in parser.parse_overrides(task) if o.is_sweep_override()]
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
        sizes = {o.get_key_element(): len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in parsed}
    except Exception:  # other sweepers' syntax (interval, optuna, ...)
        return [], None
    return swept, math.prod(sizes.values())


def count_jobs(config: DictConfig) -> int | None:
    """Jobs in a basic-sweeper grid (preset params, then command line overrides), None if unknown."""
    return _sweep_overrides(config)[1]


def sweep_name(config: DictConfig) -> str:
    """The parent run's name: the preset ("strategies sweep") and/or the command line's sweep
    overrides, then the start time (so repeated sweeps stay apart in the runs table)."""
    preset = config.hydra.runtime.choices.get("experiment")
    label = " ".join(([f"{preset} sweep"] if preset else []) + _sweep_overrides(config)[0]) or "sweep"
    return f"{label} @ {time.strftime('%b %d %H:%M')}"


_sweep: dict[str, Any] = {}  # this process's parent-run file and jobs bar (never pickled into workers)


class SweepRun(Callback):
    """Hydra callback: one parent MLflow run per multirun, which child jobs (in this process or,
    with joblib/submitit, in others) create and find through <sweep dir>/mlflow_parent.json."""

    def __init__(self, figure: str | None = None) -> None:
        self.figure = figure  # dotted name of the comparison figure's function (conf/config.yaml); None: no figure

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = sweep_dir(config.hydra)
        sweep.mkdir(parents=True, exist_ok=True)
        _sweep["bar"] = tqdm(total=count_jobs(config), desc="jobs", unit="job", disable=not show_progress(config.progress))
        if not config.tracking.enabled:
            return
        preset = config.hydra.runtime.choices.get("experiment") or "none"
        labels = tags(sweep=sweep, experiment_preset=preset, pid=os.getpid(), host=socket.gethostname())  # no role: not a result
        _write_json(sweep / PARENT_FILE, {"name": sweep_name(config), "tags": labels})
        _sweep["file"], _sweep["figure"] = sweep / PARENT_FILE, self.figure

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if "bar" in _sweep:  # only in the launching process, i.e. for in-process launchers
            _sweep["bar"].update()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        end_sweep("FINISHED")


def _write_json(file: Path, data: dict) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, file)  # readers never see half a file


def sweep_parent(sweep: Path, tracker: Tracker) -> str | None:
    """The multirun's parent run id, created by the first of its jobs that gets here (after the
    skip check), so a sweep whose jobs are all skipped leaves no empty parent; None outside a
    tracked multirun."""
    file = sweep / PARENT_FILE
    if not file.exists():
        return None
    with FileLock(str(file.with_name(f".{file.name}.lock"))):
        spec = json.loads(file.read_text())
        if "run_id" not in spec:
            spec |= {"run_id": tracker.start(spec["name"], spec["tags"]), "uri": tracker.uri, "experiment": tracker.experiment}
            _write_json(file, spec)
            log.info("multirun parent run %s (%s) in experiment %r (%s)", spec["run_id"], spec["name"], tracker.experiment, tracker.uri)
    return spec["run_id"]


def note_reused(sweep: Path, run_id: str) -> None:
    """Record a FINISHED run a job of this multirun reused instead of running (skipped as already
    done, or a baseline measured before), so the parent's description and figure still show it."""
    file = sweep / REUSED_FILE
    with FileLock(str(file.with_name(f".{file.name}.lock"))):
        with file.open("a") as out:
            out.write(run_id + "\n")


def _reused(sweep: Path) -> list[str]:
    file = sweep / REUSED_FILE
    return list(dict.fromkeys(file.read_text().split())) if file.exists() else []


def end_sweep(status: str) -> None:
    """Close the multirun's parent run, if a job created one: describe and draw its children, then
    end it; the CLI calls it with FAILED when a job or the sweep failed."""
    if bar := _sweep.pop("bar", None):
        bar.close()
    file, figure = _sweep.pop("file", None), _sweep.pop("figure", None)
    spec = json.loads(file.read_text()) if file is not None and file.exists() else {}
    if "run_id" not in spec:
        return
    tracker = Tracker(spec["uri"], spec["experiment"])
    try:
        _summarize_children(tracker, spec["run_id"], spec["name"], figure, _reused(file.parent))
    except Exception:  # a figure must never leave the parent RUNNING
        log.warning("could not summarize the children of sweep run %s", spec["run_id"], exc_info=True)
    finally:
        retry(tracker.client.set_terminated, spec["run_id"], status)
    log.info("sweep %r %s (run %s); browse it: %s", spec["name"], status, spec["run_id"], browse_hint(tracker))


def browse_hint(tracker: Tracker) -> str:
    """How to open an experiment's runs table in the MLflow UI (`Tracker.browse_url`)."""
    if tracker.uri.startswith(("http://", "https://")):
        return tracker.browse_url()
    return f"mlflow ui --backend-store-uri {tracker.uri.partition('?')[0]}, then {tracker.browse_url()}"


def _summarize_children(tracker: Tracker, run_id: str, name: str, figure: str | None, reused: list[str] = ()) -> None:
    """The parent's description (one line per child, then per `reused` run) and comparison figure
    (`figure`, the dotted name of a function from the runs' table and a title to a matplotlib Figure
    or None)."""
    import pandas as pd

    children = sorted(tracker.search({"parent": run_id}, status=None), key=lambda r: r.info.start_time)
    own = {r.info.run_id for r in children}
    children += [retry(tracker.client.get_run, i) for i in reused if i not in own]
    done = [r for r in children if r.info.status == "FINISHED"]
    lines = [f"- {r.data.tags.get(TAGS['description'], r.info.run_name)}" + ("" if r.info.status == "FINISHED" else f" ({r.info.status})")
             + ("" if r.info.run_id in own else " (reused)") for r in children]
    note = f"{len(done)} of {len(children)} runs finished.\n\n" + "\n".join(lines)
    retry(tracker.client.set_tag, run_id, TAGS["description"], note)
    if figure is None or not done:
        return
    rows = pd.DataFrame([{"name": r.info.run_name, "role": r.data.tags.get(TAGS["role"]), "task": r.data.tags.get(TAGS["task"])}
                         | {k: v for k, v in r.data.metrics.items() if not k.startswith(HISTORY_PREFIX)} for r in done])
    drawn = get_method(figure)(rows, name)
    if drawn is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, COMPARISON)
        drawn.savefig(path, dpi=120)
        retry(tracker.client.log_artifact, run_id, str(path))
