"""MLflow bookkeeping: the tag schema, where the store lives, runs that never stay RUNNING,
resume lookups, sweep parents.

Run schema (the contract with the report code): params = the flattened resolved config; tags =
`TAGS` (the one list; the description is the run's one-line result); metrics = the task's
metrics plus the runner's memory and time; metric histories = the task's curves under
`HISTORY_PREFIX` (step = position for `lm`; not results: the export skips them); dataset input =
the samples read (name, source, digest = samples hash, profile = sizes); artifacts = config.yaml,
records.parquet (the task's per-item records), per_text.csv (one row per sample).
A multirun's parent run has the sweep, preset, pid/host and git tags but no role; it is created by
the first job that runs (none if every job is skipped) and ends with `comparison.png`, its
children's key metrics side by side. Experiments are marked as classic ML (`EXPERIMENT_KIND`).
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
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from tqdm.auto import tqdm

from knormpress.errors import ConfigError

log = logging.getLogger("knormpress.tracking")
PARENT_FILE = "mlflow_parent.json"  # in the sweep dir: how jobs in other processes find their parent run
COMPARISON = "comparison.png"  # the sweep parent's figure of its children
HISTORY_PREFIX = "curve/"  # metric histories (a task's curves) are logged as curve/<name>
SQLITE = "sqlite:///"
T = TypeVar("T")

TAGS = {  # field -> MLflow tag: everything a run is labelled with, and how lookups find runs
    **{f: f"knormpress.{f}" for f in (
        "role", "strategy", "task", "engine", "config_hash", "baseline_key", "sweep", "experiment_preset",
        "samples_hash", "model", "device", "pid", "host")},
    "git_commit": "git.commit", "git_dirty": "git.dirty", "parent": "mlflow.parentRunId",
    "description": "mlflow.note.content", "dataset_context": "mlflow.data.context",
}
# MLflow 3's experiment type: classic ML, so its UI opens the experiment on the runs table, not on
# the GenAI traces overview (recent UIs, 3.17 here, follow the sidebar's GenAI / Model training
# switch first: see the README).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


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
        kind, value = EXPERIMENT_KIND
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_root(), tags={kind: value})
            except MlflowException:  # another job created it a moment ago
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {name!r} is deleted; restore it, purge it with `mlflow gc`, or set tracking.experiment to another name"
            )
        if kind not in found.tags:  # made by an older version: mark it, but leave a kind someone chose alone
            self.client.set_experiment_tag(found.experiment_id, kind, value)
        return found.experiment_id

    def _artifact_root(self) -> str | None:
        """Artifacts next to a sqlite file (mlartifacts/), not wherever the process happens to run."""
        if not self.uri.startswith(SQLITE):
            return None
        return (Path(self.uri[len(SQLITE):].partition("?")[0]).parent / "mlartifacts").as_uri()

    def search(self, where: dict[str, str], status: str | None = "FINISHED", everywhere: bool = False) -> list[Run]:
        """Runs whose schema fields (`TAGS`) equal `where`, with this status (None: any), newest
        first, in this experiment or in all active ones."""
        ids = [e.experiment_id for e in retry(self.client.search_experiments)] if everywhere else [self.experiment_id]
        query = [f"tags.`{k}` = '{v}'" for k, v in tags(**where).items()] + ([f"attributes.status = '{status}'"] if status else [])
        return retry(self.client.search_runs, ids, " and ".join(query), order_by=["attributes.start_time DESC"], max_results=1000)

    def finished(self, where: dict[str, str], everywhere: bool = False) -> Run | None:
        """The newest FINISHED run matching `where`, after marking FAILED the matching runs that a
        dead process left RUNNING."""
        self.reap(where, everywhere)
        return next(iter(self.search(where, everywhere=everywhere)), None)

    def reap(self, where: dict[str, str], everywhere: bool = False) -> None:
        """Mark FAILED the RUNNING runs matching `where` whose process (on this host) is gone."""
        for run in self.search(where | {"host": socket.gethostname()}, "RUNNING", everywhere):
            pid = run.data.tags.get(TAGS["pid"], "-1")
            if not _alive(int(pid)):
                log.warning("run %s (%s) was left RUNNING by dead process %s; marking it FAILED", run.info.run_id,
                            run.info.run_name, pid)
                retry(self.client.set_terminated, run.info.run_id, "FAILED")

    def start(self, name: str, labels: dict[str, str]) -> str:
        """A RUNNING run tagged with the code version and, unless `labels` name another (a sweep
        parent: its launcher), this process, so `reap` can tell when it died."""
        labels = git_tags() | tags(pid=os.getpid(), host=socket.gethostname()) | labels
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

    def log_histories(self, run_id: str, histories: dict[str, list[tuple[int, float]]]) -> None:
        """Each curve as the metric history `HISTORY_PREFIX + name`, one point per step."""
        now = int(time.time() * 1000)
        points = [Metric(HISTORY_PREFIX + name, float(v), now, int(step))
                  for name, curve in histories.items() for step, v in curve if math.isfinite(float(v))]
        for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
            retry(self.client.log_batch, run_id, metrics=points[i : i + 1000])

    def log_dataset(self, run_id: str, info: Any, digest: str) -> None:
        """The samples a run read (a `tasks.DatasetInfo`) as its evaluation dataset input."""
        dataset = Dataset(info.name, digest, info.source_type, json.dumps(info.source), profile=json.dumps(info.profile))
        retry(self.client.log_inputs, run_id, [DatasetInput(dataset, [InputTag(TAGS["dataset_context"], "eval")])])

    def download(self, run_id: str, path: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        return Path(retry(self.client.download_artifacts, run_id, path, str(into)))


def sweep_dir(hydra_cfg: DictConfig) -> Path:
    return Path(hydra_cfg.runtime.cwd, hydra_cfg.sweep.dir).resolve()


def show_progress(wanted: bool) -> bool:
    """Progress bars only for a person watching: not in CI, not into a log file."""
    return wanted and not os.environ.get("CI") and sys.stderr.isatty()


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

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = sweep_dir(config.hydra)
        sweep.mkdir(parents=True, exist_ok=True)
        _sweep["bar"] = tqdm(total=count_jobs(config), desc="jobs", unit="job", disable=not show_progress(config.progress))
        if not config.tracking.enabled:
            return
        preset = config.hydra.runtime.choices.get("experiment") or "none"
        labels = tags(sweep=sweep, experiment_preset=preset, pid=os.getpid(), host=socket.gethostname())  # no role: not a result
        _write_json(sweep / PARENT_FILE, {"name": sweep_name(config), "tags": labels})
        _sweep["file"] = sweep / PARENT_FILE

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


def end_sweep(status: str) -> None:
    """Close the multirun's parent run, if a job created one: describe and draw its children, then
    end it; the CLI calls it with FAILED when a job or the sweep failed."""
    if bar := _sweep.pop("bar", None):
        bar.close()
    file = _sweep.pop("file", None)
    spec = json.loads(file.read_text()) if file is not None and file.exists() else {}
    if "run_id" not in spec:
        return
    tracker = Tracker(spec["uri"], spec["experiment"])
    try:
        _summarize_children(tracker, spec["run_id"], spec["name"])
    except Exception:  # a figure must never leave the parent RUNNING
        log.warning("could not summarize the children of sweep run %s", spec["run_id"], exc_info=True)
    finally:
        retry(tracker.client.set_terminated, spec["run_id"], status)
    log.info("sweep %r %s (run %s); browse it: %s", spec["name"], status, spec["run_id"], browse_hint(tracker))


def browse_hint(tracker: Tracker) -> str:
    """How to open an experiment's runs table in the MLflow UI (the workflowType query opens recent
    UIs in their "Model training" mode, whatever the sidebar switch was last set to)."""
    page = f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
    if tracker.uri.startswith(("http://", "https://")):
        return f"{tracker.uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracker.uri.partition('?')[0]}, then http://127.0.0.1:5000/{page}"


def _summarize_children(tracker: Tracker, run_id: str, name: str) -> None:
    """The parent's description (one line per child) and comparison figure (its children's key metrics)."""
    import pandas as pd

    children = sorted(tracker.search({"parent": run_id}, status=None), key=lambda r: r.info.start_time)
    done = [r for r in children if r.info.status == "FINISHED"]
    lines = [f"- {r.data.tags.get(TAGS['description'], r.info.run_name)}" + ("" if r.info.status == "FINISHED" else f" ({r.info.status})")
             for r in children]
    note = f"{len(done)} of {len(children)} runs finished.\n\n" + "\n".join(lines)
    retry(tracker.client.set_tag, run_id, TAGS["description"], note)
    metrics = _key_metrics(done)
    if not metrics:
        return
    from knormpress.report.figures import sweep_comparison

    rows = pd.DataFrame([{"name": r.info.run_name, "role": r.data.tags.get(TAGS["role"])} | r.data.metrics for r in done])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, COMPARISON)
        sweep_comparison(rows, metrics, name).savefig(path, dpi=120)
        retry(tracker.client.log_artifact, run_id, str(path))


def _key_metrics(runs: list[Run]) -> list[str]:
    """What the comparison shows: the tasks' `key_metrics` that every run logged, else the first
    result they share (by name; not an interval, a count or the runner's resources)."""
    import pandas as pd

    from knormpress.report.headline import headline_columns
    from knormpress.tasks import TASKS

    if not runs:
        return []
    shared = set.intersection(*(set(r.data.metrics) for r in runs))
    names = dict.fromkeys(r.data.tags.get(TAGS["task"]) for r in runs)
    wanted = [m for n in names if n in TASKS for m in TASKS[n].key_metrics if m in shared]
    results = [m for m in headline_columns(pd.DataFrame(columns=sorted(shared))) if not m.startswith(HISTORY_PREFIX)]
    return list(dict.fromkeys(wanted)) or results[:1]
