"""The experiment runner: one Hydra job = one MLflow run, resumable, compared with a shared baseline.

A job validates its config, skips itself if a run of the same config FINISHED with today's code
(the same numbers fingerprint, `knormpress.fingerprint`), loads the model and the task's samples,
finds (or computes and logs, once, under a lock) the uncompressed baseline for its model + task +
samples + eval settings and today's code, runs its compression and logs what the task measured.
A FINISHED run that other code computed is never reused: the job reruns and says why in one log
line. Runs with one baseline_key are compared with each other, so once a job has a run of today's
code (reused or new), every FINISHED run with its baseline_key (in any experiment) that other code
computed is tagged `superseded_by` it, and runs of today's code lose that tag: the export shows
runs of one code version per baseline. The task (`knormpress.tasks`) decides the samples, records
and metrics; the runner adds kv_{tokens,bytes}_{peak,mean} (mean over samples), memory_saving_pct
(bytes at the peak or, for prefill, in the cache the answer is decoded from, against the baseline's),
wall_s (time in the engines) and tokens_per_s. Also logged: the task's curves (metric histories),
its samples as the run's dataset input, the one-line result as the run's description. Artifacts:
config.yaml, records.parquet, per_text.csv. The console gets one log line per run and, when
progress is on, one bar per job over its texts (library loading bars only then too).
"""

from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from knormpress import fingerprint
from knormpress.compression import Compression
from knormpress.config import RunConfig, as_baseline, baseline_key, config_hash, flatten, validate
from knormpress.fingerprint import Fingerprint
from knormpress.sources.models import ModelBundle, load_model
from knormpress.tasks import Task
from knormpress.sweeps import note_reused, sweep_dir, sweep_parent
from knormpress.tracking import TAGS, Tracker, resolve_uri, show_progress, tags

log = logging.getLogger("knormpress")
RECORDS, PER_TEXT = "records.parquet", "per_text.csv"
HELD = {"peak": "at peak", "answer": "at the answer"}  # which cache memory_saving_pct compares (`_held_at`)


@dataclass
class Job:
    """Where a job runs; from Hydra's runtime config, or built by hand in tests."""

    cwd: Path  # launch directory: relative tracking paths resolve here
    out_dir: Path  # the job's Hydra output dir: artifacts are written here first
    sweep: Path | None = None  # the multirun's sweep dir; None for a single run
    preset: str = "none"  # the experiment preset, if any

    @classmethod
    def from_hydra(cls) -> Job:
        hc = HydraConfig.get()
        sweep = sweep_dir(hc) if hc.mode == RunMode.MULTIRUN else None
        return cls(Path(hc.runtime.cwd), Path(hc.runtime.output_dir), sweep, hc.runtime.choices.get("experiment") or "none")


@dataclass
class Measured:
    """One evaluated (or reloaded) run: the task's records, its metrics and MLflow run id."""

    records: pd.DataFrame
    metrics: dict[str, float]
    run_id: str | None = None


@dataclass
class Context:
    """What every measurement of one job shares."""

    rc: RunConfig
    job: Job
    task: Task
    tracker: Tracker | None
    code: Fingerprint | None  # today's numbers fingerprint; None without tracking
    bundle: ModelBundle
    samples: list
    samples_hash: str
    labels: dict[str, str]  # tags every run of this job carries
    bar: tqdm  # the job's progress over its texts (disabled when progress is off)


def run_job(cfg: DictConfig, job: Job) -> dict[str, float] | None:
    """Run one composed config; returns its metrics, or None when skipped as already done."""
    rc, plain = validate(cfg)
    task, compression = rc.build_task(), rc.build_compression()
    tracker = Tracker(resolve_uri(rc.tracking.uri, job.cwd), rc.tracking.experiment) if rc.tracking.enabled else None
    code = fingerprint.current() if tracker else None
    if tracker:  # runs (sweep parents too) that a killed process on this host left RUNNING end FAILED now
        tracker.reap({}, everywhere=True)
        tracker.show_columns(table_columns(task))
    key = baseline_key(plain)
    if tracker and not rc.force and (done := _done(tracker, code, compression, plain)):
        tracker.supersede({"baseline_key": key}, done.info.run_id, code.digest, everywhere=True)
        if job.sweep:
            note_reused(job.sweep, done.info.run_id)
        log.info("skip %s: run %s already FINISHED with this config and code (force=true reruns it)", _name(compression),
                 done.info.run_id)
        return None

    parent = sweep_parent(job.sweep, tracker) if tracker and job.sweep else None  # created by the first job that runs
    labels = tags(baseline_key=key, experiment_preset=job.preset, sweep=job.sweep, parent=parent, task=task.name)
    labels |= code.tags() if code else {}
    progress = show_progress(rc.progress)
    with _library_bars(progress):
        bundle = load_model(rc.model, dtype=rc.eval.dtype, device=rc.eval.device, cache=rc.cache, seed=rc.eval.seed,
                            positions=compression.positions if compression else "true")
        samples = task.samples(bundle, rc.build_dataset(), rc.eval, rc.cache)
    runs = 1 if compression is None else 2  # the baseline, unless reused, then the compressed run
    with tqdm(total=runs * len(samples), desc=_name(compression), unit="text", disable=not progress, leave=False) as bar:
        ctx = Context(rc, job, task, tracker, code, bundle, samples, _samples_hash(samples), labels, bar)
        with FileLock(str((job.sweep or Path(tempfile.gettempdir())) / f".knormpress-baseline-{key}.lock")):
            # force distrusts everything logged before this command: reuse only a baseline of this sweep
            baseline = None
            if tracker and (parent or not rc.force):
                baseline = _reuse_baseline(ctx, key, {"parent": parent} if rc.force else {})
            if baseline is None:
                baseline = _measure(ctx, as_baseline(plain), None, None, job.out_dir / ("" if compression is None else "baseline"))
            elif compression is not None:
                if job.sweep:
                    note_reused(job.sweep, baseline.run_id)
                bar.total = len(samples)
                bar.refresh()
        if compression is None:
            return baseline.metrics
        return _measure(ctx, plain, compression, baseline, job.out_dir).metrics


def _same_code(tracker: Tracker, code: Fingerprint, where: dict[str, str], everywhere: bool, action: str) -> Run | None:
    """The newest FINISHED run matching `where` that today's code computed; when only runs of other
    code match, None and one log line: `<action>: run <id> FINISHED with other code (<why>)`."""
    runs = tracker.search(where, everywhere=everywhere)
    same = next((r for r in runs if code.matches(r)), None)
    if same is None and runs:
        log.info("%s: run %s FINISHED with other code (%s)", action, runs[0].info.run_id, code.difference(runs[0]))
    return same


def _done(tracker: Tracker, code: Fingerprint, compression: Compression | None, plain: dict[str, Any]) -> Run | None:
    """A FINISHED run this job would repeat, computed by today's code: for a baseline any run with
    its baseline_key (in any experiment), otherwise a run with the same config_hash in this experiment."""
    if compression is None:
        return _same_code(tracker, code, {"role": "baseline", "baseline_key": baseline_key(plain)}, True, "rerun baseline")
    return _same_code(tracker, code, {"config_hash": config_hash(plain)}, False, f"rerun {_name(compression)}")


def _reuse_baseline(ctx: Context, key: str, scope: dict[str, str]) -> Measured | None:
    """The newest FINISHED baseline run for `key` (any experiment; `scope`: more fields it must
    match) that today's code computed, with its records; None if there is none or it saw other
    tokens (edited texts)."""
    run = _same_code(ctx.tracker, ctx.code, {"role": "baseline", "baseline_key": key} | scope, True, "measure a new baseline")
    if run is None:
        return None
    if run.data.tags.get(TAGS["samples_hash"]) != ctx.samples_hash:
        log.warning("baseline run %s was measured on other tokens than these samples; measuring a new one", run.info.run_id)
        return None
    artifacts = {a.path for a in ctx.tracker.client.list_artifacts(run.info.run_id)}
    if RECORDS not in artifacts:
        log.warning("baseline run %s has no %s (logged by an older version); measuring a new one", run.info.run_id, RECORDS)
        return None
    records = pd.read_parquet(ctx.tracker.download(run.info.run_id, RECORDS, ctx.job.out_dir / "baseline"))
    log.info("reusing baseline run %s (%s)", run.info.run_id, ctx.task.headline(run.data.metrics))
    return Measured(records, dict(run.data.metrics), run.info.run_id)


def _measure(ctx: Context, plain: dict[str, Any], compression: Compression | None, baseline: Measured | None, out: Path) -> Measured:
    """Run the task on every sample under `compression` (None: the baseline) as one run, logged if tracking."""
    rc, name = ctx.rc, _name(compression)
    strategy = plain["compress"]["strategy"]["name"]
    labels = ctx.labels | tags(role="baseline" if compression is None else "compressed", strategy=strategy,
                               config_hash=config_hash(plain))
    ctx.bar.set_description(name)
    with ctx.tracker.run(run_name(ctx.bundle.name, ctx.task.name, name), labels) if ctx.tracker else nullcontext() as run_id:
        if ctx.tracker and (info := ctx.task.dataset_info(ctx.samples, rc.build_dataset())):
            ctx.tracker.log_dataset(run_id, info, ctx.samples_hash)
        outcomes = []
        for sample in ctx.samples:
            outcomes.append(ctx.task.run(ctx.bundle.model, sample, compression, rc.eval.engine, not ctx.bar.disable))
            ctx.bar.update()
        records = pd.concat([o.records for o in outcomes], ignore_index=True)
        metrics = ctx.task.metrics(records, None if baseline is None else baseline.records, rc.eval.n_boot, rc.eval.seed)
        held = _held_at(compression, outcomes[0].memory)
        metrics |= _resources(outcomes, ctx.samples, baseline, held)
        files = _write_artifacts(out, plain, records, ctx.task.per_sample(records))
        result = _result_line(name, ctx.task, metrics, ctx.samples, held)
        if ctx.tracker:
            more = tags(engine=outcomes[0].engine, samples_hash=ctx.samples_hash, device=ctx.bundle.model.device,
                        model=ctx.bundle.name, description=result)
            ctx.tracker.log(run_id, flatten(plain), metrics, more, files)
            ctx.tracker.log_histories(run_id, ctx.task.histories(records))
    if ctx.tracker:
        ctx.tracker.supersede({"baseline_key": baseline_key(plain)}, run_id, ctx.code.digest, everywhere=True)
    log.info("%s%s", result, f" [run {run_id}]" if run_id else "")
    return Measured(records, metrics, run_id)


def _result_line(name: str, task: Task, metrics: dict[str, float], samples: list, held: str) -> str:
    """The run's one-line result: the console's log line and the MLflow run description, with the
    process's peak resident memory so far (a multirun's jobs share one process)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return (f"{name}: {task.headline(metrics)}, kv {metrics[f'kv_tokens_{held}']:.0f} tokens {HELD[held]} "
            f"({metrics['memory_saving_pct']:.0f}% less memory), {len(samples)} samples in {metrics['wall_s']:.1f} s, "
            f"peak RSS {peak:.2f} GiB")


def _held_at(compression: Compression | None, memory: dict[str, float]) -> str:
    """Which cache a run's memory is judged by: a prefill run reads its prompt whole (its peak is the
    baseline's), so the cache its answer is decoded from; otherwise the peak."""
    return "answer" if compression is not None and compression.when == "prefill" and "kv_bytes_answer" in memory else "peak"


def _resources(outcomes: list, samples: list, baseline: Measured | None, held: str) -> dict[str, float]:
    """Memory held (mean over samples of each sample's peak, mean and, for prompts, at the answer),
    engine time, throughput, and memory_saving_pct: the bytes `held` (peak or answer) against the baseline's."""
    m = {k: float(np.mean([o.memory[k] for o in outcomes])) for k in outcomes[0].memory}
    m["wall_s"] = sum(o.wall_s for o in outcomes)
    predicted = sum(len(s.input_ids) - 1 for s in samples)
    m["tokens_per_s"] = predicted / m["wall_s"] if m["wall_s"] > 0 else float("nan")

    def saving(key: str) -> float:  # % fewer bytes than the baseline held at the same point
        return 100 * (1 - m[key] / baseline.metrics[key]) if baseline else 0.0

    m["memory_saving_pct"] = saving(f"kv_bytes_{held}")
    if "kv_bytes_last" in m and (baseline is None or "kv_bytes_last" in baseline.metrics):  # the seed's measure:
        m["memory_saving_last_pct"] = saving("kv_bytes_last")  # the cache held at the end of each text
    return m


def _write_artifacts(out: Path, plain: dict[str, Any], records: pd.DataFrame, per_text: pd.DataFrame) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.yaml", out / RECORDS, out / PER_TEXT]
    files[0].write_text(OmegaConf.to_yaml(plain))
    records.to_parquet(files[1], index=False)
    per_text.to_csv(files[2], index=False)
    return files


def _samples_hash(samples: list) -> str:
    """Fingerprint of the exact tokens evaluated, so a baseline is reused only for the same tokens."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.id.encode() + b"\0" + s.input_ids.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def _library_bars(show: bool) -> Iterator[None]:
    """transformers' own bars (loading weights, Hub downloads, GGUF conversion) only when ours are
    on: a log file or CI output gets the log lines, not a bar per model load."""
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    if show or not hf_logging.is_progress_bar_enabled():
        yield
        return
    converter_bar = gguf.tqdm
    hf_logging.disable_progress_bar()
    gguf.tqdm = partial(converter_bar, disable=True)  # transformers' GGUF converter calls tqdm directly
    try:
        yield
    finally:
        gguf.tqdm = converter_bar
        hf_logging.enable_progress_bar()


def _name(compression: Compression | None) -> str:
    return "baseline" if compression is None else compression.label


def table_columns(task: Task) -> list[str]:
    """The metrics the MLflow runs table shows for a task: its key metrics, their changes against the
    baseline (no intervals) and the memory saved."""
    changes = [c for c in task.columns if c.startswith("delta_") and not c.endswith(("_lo", "_hi"))]
    return [*task.key_metrics, *changes, "memory_saving_pct"]


def run_name(model: str, task: str, label: str) -> str:
    """The MLflow run name: model, task, then the compression's label (strategy and budget), so runs
    of several models and tasks in one experiment read apart (`SmolLM2-135M-Instruct lm keep_low kv=512 r=0.5`)."""
    return f"{model} {task} {label}"
