"""MLflow bookkeeping: the tag schema, where the store lives, runs that never stay RUNNING,
resume lookups, sweep parents.

Run schema (the contract with the report code): params = the flattened resolved config; tags =
`TAGS` (the one list); metrics = the task's metrics plus the runner's memory and time; artifacts
= config.yaml, records.parquet (the task's per-item records), per_text.csv (one row per sample).
A multirun's parent run has the sweep, preset and git tags but no role.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from tqdm.auto import tqdm

from knormpress.errors import ConfigError

log = logging.getLogger("knormpress.tracking")
PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes find their parent run
SQLITE = "sqlite:///"
T = TypeVar("T")

TAGS = {  # field -> MLflow tag: everything a run is labelled with, and how lookups find runs
    **{f: f"knormpress.{f}" for f in (
        "role", "strategy", "task", "engine", "config_hash", "baseline_key", "sweep", "experiment_preset",
        "samples_hash", "model", "device", "pid", "host")},
    "git_commit": "git.commit", "git_dirty": "git.dirty", "parent": "mlflow.parentRunId",
}


def tags(**fields: Any) -> dict[str, str]:
    """MLflow tags from schema fields (None values are left out); an unknown field is a bug."""
    return {TAGS[k]: str(v) for k, v in fields.items() if v is not None}


def resolve_uri(uri: str | None, root: str | Path) -> str:
    """Config, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db. Relative paths are taken from
    `root` (the launch directory, not Hydra's job dir), and sqlite gets a 60 s busy timeout so
    parallel jobs wait for each other's writes instead of failing with "database is locked"."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or SQLITE + "mlflow.db"
    if uri.startswith(SQLITE):
        path, _, query = uri[len(SQLITE):].partition("?")
        query = query if "timeout=" in query else "&".join(filter(None, [query, "timeout=60"]))
        return f"{SQLITE}{Path(root, path).resolve()}?{query}"
    if "://" not in uri and not uri.startswith("file:"):  # a plain folder: MLflow's file store
        return str(Path(root, uri).resolve())
    return uri


def retry(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call an MLflow client method, backing off (jittered, up to ~1 min in all) while another
    process holds the sqlite write lock."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # MlflowException or sqlalchemy's OperationalError
            if attempt == attempts - 1 or "locked" not in str(error).lower():
                raise
            time.sleep(min(0.25 * 2**attempt, 15) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def git_tags(path: Path = Path(__file__).parent) -> dict[str, str]:
    """Code version of this checkout: any uncommitted or untracked change makes it dirty."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired):
        return tags(git_commit="unknown", git_dirty="true")
    if commit.returncode:
        return tags(git_commit="unknown", git_dirty="true")
    return tags(git_commit=commit.stdout.strip(), git_dirty=str(bool(status.stdout.strip())).lower())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Tracker:
    """One MLflow store and experiment; every call retried so parallel jobs can share a sqlite file."""

    def __init__(self, uri: str, experiment: str) -> None:
        for name in ("alembic", "mlflow"):  # schema migrations on a fresh database are not news
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file per job
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = experiment
        self.experiment_id = retry(self._experiment_id, experiment)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_root())
            except MlflowException:  # another job created it a moment ago
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {name!r} is deleted; restore it, purge it with `mlflow gc`, or set tracking.experiment to another name"
            )
        return found.experiment_id

    def _artifact_root(self) -> str | None:
        """Artifacts next to a sqlite file (mlartifacts/), not wherever the process happens to run."""
        if not self.uri.startswith(SQLITE):
            return None
        return (Path(self.uri[len(SQLITE):].partition("?")[0]).parent / "mlartifacts").as_uri()

    def search(self, where: dict[str, str], status: str = "FINISHED", everywhere: bool = False) -> list[Run]:
        """Runs whose schema fields (`TAGS`) equal `where`, with this status, newest first, in this
        experiment or in all active ones."""
        ids = [e.experiment_id for e in retry(self.client.search_experiments)] if everywhere else [self.experiment_id]
        query = " and ".join([f"tags.`{k}` = '{v}'" for k, v in tags(**where).items()] + [f"attributes.status = '{status}'"])
        return retry(self.client.search_runs, ids, query, order_by=["attributes.start_time DESC"], max_results=1000)

    def finished(self, where: dict[str, str], everywhere: bool = False) -> Run | None:
        """The newest FINISHED run matching `where`, after marking FAILED the matching runs that a
        dead process left RUNNING."""
        self.reap(where, everywhere)
        return next(iter(self.search(where, everywhere=everywhere)), None)

    def reap(self, where: dict[str, str], everywhere: bool = False) -> None:
        """Mark FAILED the RUNNING runs matching `where` whose process (on this host) is gone."""
        for run in self.search(where, "RUNNING", everywhere):
            t = run.data.tags
            if t.get(TAGS["host"]) == socket.gethostname() and not _alive(int(t.get(TAGS["pid"], "-1"))):
                log.warning("run %s was left RUNNING by dead process %s; marking it FAILED", run.info.run_id, t.get(TAGS["pid"]))
                retry(self.client.set_terminated, run.info.run_id, "FAILED")

    def start(self, name: str, labels: dict[str, str]) -> str:
        labels = labels | git_tags() | tags(pid=os.getpid(), host=socket.gethostname())
        return retry(self.client.create_run, self.experiment_id, tags=labels, run_name=name).info.run_id

    @contextmanager
    def run(self, name: str, labels: dict[str, str]) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED on any exception, Ctrl-C or (see runner) SIGTERM."""
        run_id = self.start(name, labels)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            retry(self.client.set_terminated, run_id, status)

    def log(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], labels: dict[str, str], files: list[Path]) -> None:
        now = int(time.time() * 1000)
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            retry(self.client.log_batch, run_id, params=items[i : i + 100])
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        retry(self.client.log_batch, run_id, metrics=[Metric(k, v, now, 0) for k, v in finite.items()],
              tags=[RunTag(k, v) for k, v in labels.items()])
        for f in files:
            retry(self.client.log_artifact, run_id, str(f))

    def download(self, run_id: str, path: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        return Path(retry(self.client.download_artifacts, run_id, path, str(into)))


def sweep_dir(hydra_cfg: DictConfig) -> Path:
    return Path(hydra_cfg.runtime.cwd, hydra_cfg.sweep.dir).resolve()


def read_parent(sweep: Path) -> str | None:
    """The parent run id the multirun's callback left in the sweep dir, if any."""
    file = sweep / PARENT_FILE
    return json.loads(file.read_text())["run_id"] if file.exists() else None


def show_progress(wanted: bool) -> bool:
    """Progress bars only for a person watching: not in CI, not into a log file."""
    return wanted and not os.environ.get("CI") and sys.stderr.isatty()


def count_jobs(config: DictConfig) -> int | None:
    """Jobs in a basic-sweeper grid (preset params, then command line overrides), None if unknown."""
    params = config.hydra.sweeper.get("params") or {}
    try:
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task))
        sizes = {o.get_key_element(): len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in parsed}
    except Exception:  # other sweepers (interval, optuna, ...)
        return None
    return math.prod(sizes.values())


_sweep: dict[str, Any] = {}  # this process's open parent run and jobs bar (never pickled into workers)


class SweepRun(Callback):
    """Hydra callback: one parent MLflow run per multirun, which child jobs (in this process or,
    with joblib/submitit, in others) find through <sweep dir>/mlflow_parent.json."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = sweep_dir(config.hydra)
        sweep.mkdir(parents=True, exist_ok=True)
        _sweep["bar"] = tqdm(total=count_jobs(config), desc="jobs", unit="job", disable=not show_progress(config.progress))
        if not config.tracking.enabled:
            return
        tracker = Tracker(resolve_uri(config.tracking.uri, config.hydra.runtime.cwd), config.tracking.experiment)
        preset = config.hydra.runtime.choices.get("experiment") or "none"
        run_id = tracker.start(f"sweep {preset} {sweep.name}", tags(sweep=sweep, experiment_preset=preset))  # no role: not a result
        (sweep / PARENT_FILE).write_text(json.dumps({"run_id": run_id, "uri": tracker.uri, "experiment_id": tracker.experiment_id}))
        _sweep.update(tracker=tracker, run_id=run_id)
        log.info("multirun parent run %s in experiment %r (%s)", run_id, tracker.experiment, tracker.uri)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if "bar" in _sweep:  # only in the launching process, i.e. for in-process launchers
            _sweep["bar"].update()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        end_sweep("FINISHED")


def end_sweep(status: str) -> None:
    """Close the multirun's parent run; the CLI calls it with FAILED when a job or the sweep failed."""
    if bar := _sweep.pop("bar", None):
        bar.close()
    if tracker := _sweep.pop("tracker", None):
        retry(tracker.client.set_terminated, _sweep.pop("run_id"), status)
