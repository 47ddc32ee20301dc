"""MLflow bookkeeping: the tag schema, where the store lives, runs that never stay RUNNING,
resume lookups (a sweep's parent run lives in sweeps.py).

Run schema (the contract with the report code): params = the flattened resolved config; tags =
`TAGS` (the one list; the description is the run's one-line result); metrics = the task's
metrics plus the runner's memory and time; metric histories = the task's curves under
`HISTORY_PREFIX` (step = position for `lm`; not results: the export skips them); dataset input =
the samples read (name, source, digest = samples hash, profile = sizes); artifacts = config.yaml,
records.parquet (the task's per-item records), per_text.csv (one row per sample). A job's runs
carry the numbers fingerprint (`knormpress.fingerprint`); once a job has a run of today's code, the
FINISHED runs sharing its baseline_key that other code computed are tagged `superseded_by` it
(`Tracker.supersede`; the export skips them). A multirun's parent run has the sweep, preset,
pid/host and git tags but no role; it is created by the first job that runs (none if every job is
skipped) and ends with `comparison.png`, its children's key metrics side by side. Experiments are
marked as classic ML (`EXPERIMENT_KIND`).
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
from typing import TYPE_CHECKING, Any, TypeVar

from knormpress.errors import ConfigError

if TYPE_CHECKING:  # mlflow is imported when a Tracker is made: the schema and the sweep callback load without it
    from mlflow.entities import Run

log = logging.getLogger("knormpress.tracking")
HISTORY_PREFIX = "curve/"  # metric histories (a task's curves) are logged as curve/<name>
SQLITE = "sqlite:///"
T = TypeVar("T")

TAGS = {  # field -> MLflow tag: everything a run is labelled with, and how lookups find runs
    **{f: f"knormpress.{f}" for f in (
        "role", "strategy", "task", "engine", "config_hash", "baseline_key", "sweep", "experiment_preset",
        "samples_hash", "model", "device", "pid", "host", "fingerprint", "fingerprint_parts", "superseded_by")},
    "git_commit": "git.commit", "git_dirty": "git.dirty", "parent": "mlflow.parentRunId",
    "description": "mlflow.note.content", "dataset_context": "mlflow.data.context",
}
# MLflow 3's experiment type: classic ML. MLflow 3.17's UI no longer reads it to choose a page: it
# follows the sidebar's GenAI / Model training switch (the URL's `workflowType`, else the browser's
# localStorage `mlflow.workflowType`, default genai), so `browse_url` names the mode in the link.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# The runs table's columns: the UI shows Source, Models and Dataset unless a view says otherwise. A
# view is an experiment tag `mlflow.sharedViewState.<key>` (JSON of the table's state), opened by the
# URL's `viewStateShareKey=<key>`, as the UI's own Share button writes it.
VIEW_KEY = "knormpress"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY


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
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = experiment
        self.experiment_id = retry(self._experiment_id, experiment)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

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

    def show_columns(self, metrics: list[str]) -> None:
        """Add `metrics` to the columns of the experiment's runs-table view (`VIEW_TAG`), after those
        it shows already (one experiment may hold several tasks' runs)."""
        found = retry(self.client.get_experiment, self.experiment_id).tags.get(VIEW_TAG)
        state = json.loads(found) if found else {"selectedColumns": []}
        columns = state.get("selectedColumns", [])
        state["selectedColumns"] = columns + [c for c in (f"metrics.`{m}`" for m in metrics) if c not in columns]
        if found is None or state["selectedColumns"] != columns:
            retry(self.client.set_experiment_tag, self.experiment_id, VIEW_TAG, json.dumps(state))

    def browse_url(self, base: str = "http://127.0.0.1:5000") -> str:
        """The MLflow UI's page of this experiment's runs table, in Model training mode, with the view
        `show_columns` keeps (`base`: where `mlflow ui` serves; a tracking server serves itself)."""
        if self.uri.startswith(("http://", "https://")):
            base = self.uri
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"

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

    def reap(self, where: dict[str, str], everywhere: bool = False) -> None:
        """Mark FAILED the RUNNING runs matching `where` whose process (on this host) is gone."""
        for run in self.search(where | {"host": socket.gethostname()}, "RUNNING", everywhere):
            pid = run.data.tags.get(TAGS["pid"], "-1")
            if not _alive(int(pid)):
                log.warning("run %s (%s) was left RUNNING by dead process %s; marking it FAILED", run.info.run_id,
                            run.info.run_name, pid)
                retry(self.client.set_terminated, run.info.run_id, "FAILED")

    def supersede(self, where: dict[str, str], keeper: str, fingerprint: str, everywhere: bool = False) -> None:
        """The FINISHED runs matching `where` are compared with each other: tag those of another
        `fingerprint` (other code) superseded by run `keeper` (the export skips them), and clear the
        tag on those of this one (their code is back)."""
        for run in self.search(where, everywhere=everywhere):
            mark = run.data.tags.get(TAGS["superseded_by"])
            same = run.data.tags.get(TAGS["fingerprint"]) == fingerprint
            if same and mark is not None:
                retry(self.client.delete_tag, run.info.run_id, TAGS["superseded_by"])
            elif not same and mark is None:
                retry(self.client.set_tag, run.info.run_id, TAGS["superseded_by"], keeper)

    def start(self, name: str, labels: dict[str, str]) -> str:
        """A RUNNING run tagged with the code version and, unless `labels` name another (a sweep
        parent: its launcher), this process, so `reap` can tell when it died."""
        labels = git_tags() | tags(pid=os.getpid(), host=socket.gethostname()) | labels
        return retry(self.client.create_run, self.experiment_id, tags=labels, run_name=name).info.run_id

    @contextmanager
    def run(self, name: str, labels: dict[str, str]) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED on any exception, Ctrl-C or (see cli.py) SIGTERM."""
        run_id = self.start(name, labels)
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        finally:
            retry(self.client.set_terminated, run_id, status)

    def log(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], labels: dict[str, str], files: list[Path]) -> None:
        from mlflow.entities import Metric, Param, RunTag

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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(HISTORY_PREFIX + name, float(v), now, int(step))
                  for name, curve in histories.items() for step, v in curve if math.isfinite(float(v))]
        for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
            retry(self.client.log_batch, run_id, metrics=points[i : i + 1000])

    def log_dataset(self, run_id: str, info: Any, digest: str) -> None:
        """The samples a run read (a `tasks.DatasetInfo`) as its evaluation dataset input."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(info.name, digest, info.source_type, json.dumps(info.source), profile=json.dumps(info.profile))
        retry(self.client.log_inputs, run_id, [DatasetInput(dataset, [InputTag(TAGS["dataset_context"], "eval")])])

    def download(self, run_id: str, path: str, into: Path) -> Path:
        into.mkdir(parents=True, exist_ok=True)
        return Path(retry(self.client.download_artifacts, run_id, path, str(into)))


def show_progress(wanted: bool) -> bool:
    """Progress bars only for a person watching: not in CI, not into a log file."""
    return wanted and not os.environ.get("CI") and sys.stderr.isatty()
