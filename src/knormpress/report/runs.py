"""Runs as tidy tables: read from MLflow, written to and read back from the exported CSVs.

One row per run: identity columns (what was run, from params and tags; the compression's come
from the `Compression` spec's settings, typed as their fields are) and one column per metric the
runs logged (curves, i.e. metric histories, left out), whatever the task. Metric columns: the
legacy task's (`lm`, what runs without a task column ran) and the runner's always, in a fixed
order (so old and new CSVs line up), then each task's declared `columns` that some run logged,
then any others sorted by name. The strategy column is the strategy's label (its name, plus the
settings that differ from their defaults: `h2o[normalise=mean]`), so variants stay apart; older
exports hold the name alone, which is the label of the default variant. Per-text rows come from
each run's `per_text.csv` artifact (one row per sample) with the run id added.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from knormpress.errors import ConfigError
from knormpress.settings import settings_of
from knormpress.spec import Compression
from knormpress.report.timings import sweep_timing, write_timing
from knormpress.tasks import TASKS, Task

FIRST = ["strategy", "keep_ratio", "fix_kv_size", "sort_by_time", "n_sink", "skip_layers"]  # the first exports'
# compression columns in their order (old and new CSVs line up); later settings follow in field order
TAIL = ["model", "model_source", "dataset", "engine", "max_tokens", "n_samples", "eval_seed", "config_hash",
        "baseline_key", "sweep", "git_commit", "git_dirty", "start_time"]
LEGACY_TASK = "lm"  # what runs without a task column ran: its metric columns are in every table
RUNNER_METRICS = ["kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak", "kv_bytes_mean", "memory_saving_pct",
                  "tokens_per_s", "wall_s", "kv_tokens_last", "kv_bytes_last", "memory_saving_last_pct"]  # logged by
# the runner (the last three by tasks that read a text to its end: lm)
OTHER_PARAMS = {  # identity column -> MLflow param(s), the first one logged wins (older runs: the later names)
    "task": ["task.name"], "model": ["model.name"], "model_source": ["model.source.kind", "model.source"],
    "dataset": ["dataset.name", "dataset.source"], "max_tokens": ["eval.max_tokens"], "n_samples": ["eval.n_samples"],
    "eval_seed": ["eval.seed"],
}  # params are the flattened resolved config; a param wins over a tag of the same column
TAGGED = ["role", "task", "strategy", "model", "engine", "config_hash", "baseline_key", "sweep", "git_commit",
          "git_dirty"]  # identity columns named like their field in knormpress.tracking.TAGS
PER_TEXT = "per_text.csv"  # the run artifact: one row per sample
NOT_DEPLOYABLE = " (not deployable)"  # after the label of a strategy that reads what a real cache cannot know (oracle)
TEXT_COLUMNS = ["run_id", "text_id", "title", "n_tokens", "nll_sum", "n_correct"]  # lm columns, in this order


@dataclass(frozen=True)
class Schema:
    """The identity columns of a spec class's runs, and how each is typed."""

    head: list[str]  # run, experiment, role, task, then the compression's columns
    params: dict[str, list[str]]
    ints: list[str]
    floats: list[str]
    bools: list[str]
    texts: list[str]  # read back as text even where a CSV reader sees booleans (positions: true)
    before: dict[str, object]  # what compressed runs logged before these settings existed computed

    @property
    def identity(self) -> list[str]:
        return self.head + TAIL


@cache
def schema(spec: type = Compression) -> Schema:
    """The tidy table's identity columns, derived from the spec's settings (see the module docstring)."""
    settings = settings_of(spec)
    names = ["strategy", *(s.name for s in settings)]
    compress = [c for c in FIRST if c in names] + [c for c in names if c not in FIRST]
    of = {kind: [s.name for s in settings if s.kind is kind and not s.sequence] for kind in (int, float, bool, str)}
    params = {"strategy": ["compress.strategy.name", "compress.strategy"], **{s.name: [f"compress.{s.name}"] for s in settings},
              **OTHER_PARAMS}
    return Schema(["run_id", "experiment", "role", "task", *compress], params,
                  of[int] + list(task_class(LEGACY_TASK).sizes) + ["max_tokens", "n_samples", "eval_seed", "start_time"],
                  of[float],
                  of[bool] + ["git_dirty"], of[str], {s.name: s.before for s in settings if s.before is not MISSING})


def task_class(name: object) -> type[Task]:
    """The registered task of that name; the legacy task for runs that logged none; the base
    class's defaults for a task this process does not know (a plug-in not imported)."""
    name = LEGACY_TASK if name is None or pd.isna(name) else name
    return TASKS.get(name, Task)


HEAD = schema().head
IDENTITY = schema().identity


def metric_order(rows: pd.DataFrame, spec: type = Compression) -> list[str]:
    """The metric columns of a tidy table in order (see the module docstring)."""
    fixed = [*task_class(LEGACY_TASK).columns, *RUNNER_METRICS]
    logged = sorted(c for c in rows.columns if c not in schema(spec).identity and c not in fixed)
    tasks = dict.fromkeys(task_class(t) for t in rows.get("task", pd.Series(dtype=object)).dropna().unique())
    declared = [c for task in tasks for pattern in task.columns for c in fnmatch.filter(logged, pattern)]
    return fixed + list(dict.fromkeys(declared + logged))


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The metric columns of a tidy table (everything that is not identity), in table order."""
    return [c for c in runs.columns if c not in IDENTITY]


def tidy(rows: pd.DataFrame, spec: type = Compression) -> pd.DataFrame:
    """Fixed columns, dtypes and row order, whether the rows come from MLflow (strings) or a CSV.
    Rows: per experiment, baselines first, then by strategy, keep_ratio, sorted before unsorted."""
    s = schema(spec)
    df = rows.reindex(columns=[*s.head, *metric_order(rows, spec), *TAIL])
    for col in df.columns:
        if col in s.ints:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif col in s.floats or col not in s.identity:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in s.bools:
        df[col] = df[col].astype(str).str.lower().map({"true": True, "false": False}).astype("boolean")
    for col in s.texts:  # a CSV reader turns a column of "true" into booleans
        df[col] = df[col].map(lambda v: v if pd.isna(v) else str(v).lower() if isinstance(v, (bool, np.bool_))
                              else str(v)).astype(object)
    for col, value in s.before.items():
        df.loc[df.role.ne("baseline") & df[col].isna(), col] = value
    keys = df.assign(_compressed=df.role.ne("baseline"), _unsorted=~df.sort_by_time.fillna(True))
    keys = keys.sort_values(["experiment", "_compressed", "strategy", "keep_ratio", "positions", "_unsorted", "interval"],
                            kind="stable")
    return keys.drop(columns=["_compressed", "_unsorted"]).reset_index(drop=True)


def _texts(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-text rows of several runs: the lm columns first (as old exports had them), then the rest."""
    if not frames:
        return pd.DataFrame(columns=TEXT_COLUMNS)
    texts = pd.concat(frames, ignore_index=True)
    first = [c for c in TEXT_COLUMNS if c in texts.columns]
    return texts[first + [c for c in texts.columns if c not in first]]


# ---- MLflow ---------------------------------------------------------------------------------------

def tracking_uri(uri: str | None = None) -> str:
    """The runner's rule (`tracking.resolve_uri`), relative to the current directory."""
    from knormpress.tracking import resolve_uri

    return resolve_uri(uri, Path.cwd())


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _tags() -> dict[str, str]:
    from knormpress.tracking import TAGS  # field -> tag name, the runner's single definition

    return TAGS


def _paged(search: Callable, *args, **kwargs) -> list:
    """Every result of an MLflow search call (search_runs, search_experiments), page by page."""
    found, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        found += list(page)
        token = page.token
        if not token:
            return found


def _row(run, experiment: str, tag_names: dict[str, str], spec: type = Compression) -> dict:
    from knormpress.strategies import label
    from knormpress.tracking import HISTORY_PREFIX

    params, tags = run.data.params, run.data.tags
    # every metric the run logged, whatever its task, but not the last point of a curve
    row = {k: v for k, v in run.data.metrics.items() if not k.startswith(HISTORY_PREFIX)}
    row |= {"run_id": run.info.run_id, "experiment": experiment, "start_time": run.info.start_time}
    row |= {col: tags.get(tag_names.get(col, "")) for col in TAGGED}
    for col, keys in schema(spec).params.items():
        row[col] = next((params[k] for k in keys if k in params), row.get(col))
    strategy = {k.removeprefix("compress.strategy."): v for k, v in params.items() if k.startswith("compress.strategy.")}
    if "name" in strategy:  # its label: variants of one strategy stay apart; a reference no cache can use says so
        row["strategy"] = label(strategy) + ("" if deployable(strategy["name"]) else NOT_DEPLOYABLE)
    return row


def deployable(name: str) -> bool:
    """Whether a logged strategy name is one a real cache can run (`Strategy.deployable`); unknown names
    (a plug-in not loaded now) count as deployable."""
    from knormpress.strategies import STRATEGIES

    return getattr(STRATEGIES.get(name), "deployable", True)


def _newest(runs: list, experiment: str, key: str, tag_names: dict[str, str]) -> pd.DataFrame:
    """Rows of child and single runs (not sweep parents, which have no role), the newest per `key`."""
    rows = [_row(r, experiment, tag_names) for r in runs if tag_names["role"] in r.data.tags]
    if not rows:
        return pd.DataFrame(columns=IDENTITY)
    df = pd.DataFrame(rows)
    df[key] = df[key].fillna(df.run_id)
    return df.sort_values("start_time").drop_duplicates(key, keep="last")


def _finished_runs(client, experiment) -> pd.DataFrame:
    """FINISHED runs of one experiment (not superseded), newest per config_hash, plus the baselines
    they were compared with: the runner shares one baseline per model, texts and eval settings across
    experiments, so it may have been logged elsewhere (then: the newest for its baseline_key)."""
    tag_names = _tags()
    # a run superseded by one of newer code (knormpress.tracking.Tracker.supersede) is not a result
    finished = f"attributes.status = 'FINISHED' and tags.`{tag_names['superseded_by']}` IS NULL"
    runs = _newest(_paged(client.search_runs, [experiment.experiment_id], finished, max_results=1000),
                   experiment.name, "config_hash", tag_names)
    missing = set(runs.baseline_key.dropna()) - set(runs[runs.role == "baseline"].baseline_key)
    if missing:
        everywhere = [e.experiment_id for e in _paged(client.search_experiments)]
        query = f"{finished} and tags.`{tag_names['role']}` = 'baseline'"
        baselines = _newest(_paged(client.search_runs, everywhere, query, max_results=1000), experiment.name,
                            "baseline_key", tag_names)
        runs = pd.concat([runs, baselines[baselines.baseline_key.isin(missing)]], ignore_index=True)
    return runs if runs.empty else tidy(runs)


def load_runs(experiment: str, uri: str | None = None) -> pd.DataFrame:
    """One tidy row per run of `experiment`; a ConfigError names the experiments that exist."""
    uri = tracking_uri(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = pd.DataFrame() if exp is None else _finished_runs(client, exp)
    if runs.empty:
        names = ", ".join(sorted(e.name for e in _paged(client.search_experiments))) or "none"
        problem = "no MLflow experiment" if exp is None else "no finished runs in experiment"
        raise ConfigError(f"{problem} {experiment!r} at {uri}; existing experiments: {names}")
    return runs


def load_all(uri: str | None = None) -> pd.DataFrame:
    """Runs of every experiment that has finished knormpress runs."""
    client = _client(tracking_uri(uri))
    frames = [_finished_runs(client, e) for e in _paged(client.search_experiments)]
    frames = [f for f in frames if not f.empty]
    return tidy(pd.concat(frames, ignore_index=True)) if frames else tidy(pd.DataFrame(columns=IDENTITY))


def load_texts(runs: pd.DataFrame, uri: str | None = None) -> pd.DataFrame:
    """Each run's per_text.csv with its run_id: what pairs two runs text by text. Runs without
    that artifact contribute no rows."""
    client = _client(tracking_uri(uri))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run is noise
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in runs.run_id.unique():  # a shared baseline can be listed by several experiments
            if PER_TEXT not in {a.path for a in client.list_artifacts(run_id)}:
                continue
            table = pd.read_csv(client.download_artifacts(run_id, PER_TEXT, tmp))
            frames.append(table.drop(columns="run_id", errors="ignore").assign(run_id=run_id))
    return _texts(frames)


def export(experiment: str, out_dir: str | Path = "results", uri: str | None = None) -> list[Path]:
    """Write <out>/<experiment>.csv (runs), <out>/per_text/<experiment>.csv (per-text rows) and
    <out>/timings/<experiment>.json (the newest sweep's wall time, `knormpress.report.timings`)."""
    runs = load_runs(experiment, uri)
    texts = load_texts(runs, uri)
    out = Path(out_dir)
    (out / "per_text").mkdir(parents=True, exist_ok=True)
    paths = [out / f"{experiment}.csv", out / "per_text" / f"{experiment}.csv"]
    runs.to_csv(paths[0], index=False)
    texts.to_csv(paths[1], index=False)
    timing = sweep_timing(_client(tracking_uri(uri)), experiment, _tags())
    return paths + ([write_timing(timing, out)] if timing else [])


# ---- exported CSVs --------------------------------------------------------------------------------

def read_results(results_dir: str | Path = "results") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The exported runs and per-text tables of every experiment in `results_dir`."""
    root = Path(results_dir)
    run_files = sorted(root.glob("*.csv"))
    if not run_files:
        raise ConfigError(f"no exported runs in {root}/; run scripts/export_results.py --experiment NAME first")
    runs = tidy(pd.concat([pd.read_csv(f) for f in run_files], ignore_index=True))
    texts = _texts([pd.read_csv(f) for f in sorted((root / "per_text").glob("*.csv"))])
    return runs, texts.drop_duplicates()  # a shared baseline is in several files (a task may give a text several rows)


def parse_and_read(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, pd.DataFrame, pd.DataFrame]:
    """For the report scripts: add --results, parse the command line and read the exported CSVs,
    exiting with one line when there are none."""
    parser.add_argument("--results", default="results", help="folder with the exported CSVs (default: results)")
    args = parser.parse_args()
    try:
        runs, texts = read_results(args.results)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return args, runs, texts
