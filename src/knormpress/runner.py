"""The experiment runner: one Hydra job = one MLflow run, resumable, compared with a shared baseline.

A job validates its config, skips itself if an identical run already FINISHED, loads the model
and texts, finds (or computes and logs, once, under a lock) the uncompressed baseline for its
model + texts + eval settings, evaluates its compression and logs metrics and per-token data.

Metrics: ppl, accuracy (+ _lo/_hi bootstrap bounds over texts), n_texts, n_tokens,
kv_{tokens,bytes}_{peak,mean} (mean over texts), memory_saving_pct, tokens_per_s, wall_s (time in
`evaluate`); compressed runs add baseline_ppl, baseline_accuracy, delta_{ppl,accuracy}_pct(_lo/_hi).
Artifacts: config.yaml, per_token.parquet (text_id, title, position, nll, correct; position p is
token p predicted from tokens < p), per_text.csv (text_id, title, n_tokens, ppl, accuracy).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm.auto import tqdm

from knormpress.compression import Compression
from knormpress.config import CONF_DIR, RunConfig, baseline_key, config_hash, flatten, validate
from knormpress.engines import evaluate
from knormpress.errors import ConfigError
from knormpress.metrics import EvalResult, summarize
from knormpress.sources.models import ModelBundle, load_model
from knormpress.sources.texts import Sample, load_samples
from knormpress.tracking import Tracker, end_sweep, git_tags, read_parent, resolve_uri, show_progress, sweep_dir

log = logging.getLogger("knormpress")
KV = ("kv_tokens_peak", "kv_tokens_mean", "kv_bytes_peak", "kv_bytes_mean")


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
    """One evaluated (or reloaded) run: per-text results, its metrics and MLflow run id."""

    results: list[EvalResult]
    metrics: dict[str, float]
    run_id: str | None = None


def main(cfg: DictConfig) -> dict[str, float] | None:
    """Hydra task function."""
    job = Job.from_hydra()
    try:
        with _sigterm_raises():
            return run_job(cfg, job)
    except ConfigError as error:
        if not job.sweep:
            _exit_with(error)  # SystemExit passes through Hydra, which would print more lines
        log.error("job failed: %s", error)  # the sweep re-raises only its first failure: say which one failed
        raise
    except Exception:
        if job.sweep:
            log.exception("job failed")
        raise


def run_job(cfg: DictConfig, job: Job) -> dict[str, float] | None:
    """Run one composed config; returns its metrics, or None when skipped as already done."""
    rc, plain = validate(cfg)
    tracker = Tracker(resolve_uri(rc.tracking.uri, job.cwd), rc.tracking.experiment) if rc.tracking.enabled else None
    key = baseline_key(plain)
    tags = {"knormpress.config_hash": config_hash(plain), "knormpress.baseline_key": key,
            "knormpress.experiment_preset": job.preset, **git_tags()}
    if job.sweep:
        tags["knormpress.sweep"] = str(job.sweep)
        if tracker and (parent := read_parent(job.sweep)):
            tags["mlflow.parentRunId"] = parent
    if tracker and (done := _done(tracker, rc, tags)) and not rc.force:
        log.info("skip %s: run %s already FINISHED with config_hash %s (force=true reruns it)",
                 _label(rc), done.info.run_id, tags["knormpress.config_hash"])
        return None

    bundle = load_model(rc.model.source, name=rc.model.name, revision=rc.model.revision, dtype=rc.eval.dtype,
                        device=rc.eval.device, cache=rc.cache, random_config=rc.model.random_config, seed=rc.eval.seed)
    samples = load_samples(asdict(rc.dataset), bundle.tokenizer, bundle.name, n_samples=rc.eval.n_samples,
                           max_tokens=rc.eval.max_tokens, start_offset=rc.eval.start_offset, seed=rc.eval.seed, cache=rc.cache)
    context = dict(rc=rc, job=job, tracker=tracker, bundle=bundle, samples=samples)

    with FileLock(str((job.sweep or Path(tempfile.gettempdir())) / f".knormpress-baseline-{key}.lock")):
        baseline = None
        # force distrusts everything logged before this command: reuse only a baseline of this sweep
        scope = {"mlflow.parentRunId": tags["mlflow.parentRunId"]} if rc.force and "mlflow.parentRunId" in tags else {}
        if tracker and (scope or not rc.force):
            baseline = _reuse_baseline(tracker, key, scope, samples, job.out_dir / "baseline")
        if baseline is None:
            base_plain = {**plain, "compress": {**plain["compress"], "strategy": "none"}}
            base_tags = tags | {"knormpress.config_hash": config_hash(base_plain)}
            baseline = _measure(plain=base_plain, tags=base_tags, compression=None, baseline=None,
                                out=job.out_dir / ("" if rc.role == "baseline" else "baseline"), **context)
    if rc.role == "baseline":
        return baseline.metrics
    compression = rc.compress.build(rc.eval.seed)
    return _measure(plain=plain, tags=tags, compression=compression, baseline=baseline, out=job.out_dir, **context).metrics


def _done(tracker: Tracker, rc: RunConfig, tags: dict[str, str]) -> Run | None:
    """A FINISHED run this job would repeat: for a baseline any run with its baseline_key (in any
    experiment), otherwise a run with the same config_hash in this experiment. Runs of the same
    identity left RUNNING by a dead process are marked FAILED first."""
    if rc.role == "baseline":
        identity, everywhere = {"knormpress.role": "baseline", "knormpress.baseline_key": tags["knormpress.baseline_key"]}, True
    else:
        identity, everywhere = {"knormpress.config_hash": tags["knormpress.config_hash"]}, False
    tracker.reap(identity, everywhere)
    return next(iter(tracker.search(identity, everywhere=everywhere)), None)


def _reuse_baseline(tracker: Tracker, key: str, scope: dict[str, str], samples: list[Sample], into: Path) -> Measured | None:
    """The newest FINISHED baseline run for `key` (any experiment; `scope`: extra tags it must have),
    rebuilt from its per-token data; None if there is none or it saw other tokens (edited texts)."""
    identity = {"knormpress.role": "baseline", "knormpress.baseline_key": key}
    tracker.reap(identity, everywhere=True)
    runs = tracker.search(identity | scope, everywhere=True)
    if not runs:
        return None
    run = runs[0]
    if run.data.tags.get("knormpress.texts_hash") != _texts_hash(samples):
        log.warning("baseline run %s was measured on other tokens than these texts; measuring a new one", run.info.run_id)
        return None
    table = pd.read_parquet(tracker.download(run.info.run_id, "per_token.parquet", into))
    nan = float("nan")
    results = []
    for s in samples:
        rows = table[table.text_id == s.id].sort_values("position")
        results.append(EvalResult(torch.tensor(rows.nll.to_numpy()), torch.tensor(rows.correct.to_numpy()),
                                  nan, nan, nan, nan, engine=run.data.tags.get("knormpress.engine", "unknown")))
    log.info("reusing baseline run %s (ppl %.3f, accuracy %.2f%%)", run.info.run_id, run.data.metrics["ppl"], 100 * run.data.metrics["accuracy"])
    return Measured(results, dict(run.data.metrics), run.info.run_id)


def _measure(
    *, rc: RunConfig, plain: dict[str, Any], tags: dict[str, str], job: Job, tracker: Tracker | None, bundle: ModelBundle,
    samples: list[Sample], compression: Compression | None, baseline: Measured | None, out: Path,
) -> Measured:
    """Evaluate every text under `compression` (None: the baseline) as one run, logged if tracking."""
    role = "baseline" if compression is None else "compressed"
    strategy = plain["compress"]["strategy"]
    tags = tags | {"knormpress.role": role, "knormpress.strategy": strategy}
    name = "baseline" if compression is None else f"{strategy} r={compression.keep_ratio:g}"
    progress = show_progress(rc.progress)
    with tracker.run(name, tags) if tracker else nullcontext() as run_id:
        results = [
            evaluate(bundle.model, s.input_ids, compression, rc.eval.engine, progress)
            for s in tqdm(samples, desc=f"{name}: texts", unit="text", disable=not progress, leave=False)
        ]
        metrics = _metrics(results, baseline, rc)
        files = _write_artifacts(out, plain, samples, results)
        if tracker:
            extra = {"knormpress.engine": results[0].engine, "knormpress.texts_hash": _texts_hash(samples),
                     "knormpress.device": str(bundle.model.device), "knormpress.model": bundle.name}
            tracker.log(run_id, flatten(plain), metrics, extra, files)
    _report(name, metrics, run_id)
    return Measured(results, metrics, run_id)


def _metrics(results: list[EvalResult], baseline: Measured | None, rc: RunConfig) -> dict[str, float]:
    m = summarize(results, baseline.results if baseline else None, rc.eval.n_boot, rc.eval.seed)
    m |= {k: float(np.mean([getattr(r, k) for r in results])) for k in KV}
    m["wall_s"] = sum(r.wall_s for r in results)
    m["tokens_per_s"] = m["n_tokens"] / m["wall_s"] if m["wall_s"] > 0 else float("nan")
    m["memory_saving_pct"] = 100 * (1 - m["kv_bytes_peak"] / baseline.metrics["kv_bytes_peak"]) if baseline else 0.0
    return m


def _write_artifacts(out: Path, plain: dict[str, Any], samples: list[Sample], results: list[EvalResult]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.yaml", out / "per_token.parquet", out / "per_text.csv"]
    files[0].write_text(OmegaConf.to_yaml(plain))
    pd.concat(
        [pd.DataFrame({"text_id": s.id, "title": s.title, "position": np.arange(1, r.n_tokens + 1),
                       "nll": r.nll.float().numpy(), "correct": r.correct.bool().numpy()})
         for s, r in zip(samples, results)], ignore_index=True,
    ).to_parquet(files[1], index=False)
    pd.DataFrame([{"text_id": s.id, "title": s.title, "n_tokens": r.n_tokens, "ppl": r.ppl, "accuracy": r.accuracy}
                  for s, r in zip(samples, results)]).to_csv(files[2], index=False)
    return files


def _texts_hash(samples: list[Sample]) -> str:
    """Fingerprint of the exact tokens evaluated, so a baseline is reused only for the same tokens."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(s.id.encode() + b"\0" + s.input_ids.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def _label(rc: RunConfig) -> str:
    return "baseline" if rc.role == "baseline" else f"{rc.compress.strategy} r={rc.compress.keep_ratio:g}"


def _report(name: str, m: dict[str, float], run_id: str | None) -> None:
    """The one summary line per run."""

    def delta(key: str) -> str:
        return f" ({m[key]:+.2f}%)" if key in m else ""

    log.info("%s: ppl %.3f%s, accuracy %.2f%%%s, kv %.0f tokens (%.0f%% less memory), %d texts x %d tokens in %.1f s%s",
             name, m["ppl"], delta("delta_ppl_pct"), 100 * m["accuracy"], delta("delta_accuracy_pct"),
             m["kv_tokens_peak"], m["memory_saving_pct"], m["n_texts"], m["n_tokens"] / m["n_texts"], m["wall_s"],
             f" [run {run_id}]" if run_id else "")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM (kill, scancel, timeouts) into SystemExit while inside, so open runs end
    FAILED, not RUNNING; the previous handler comes back after (launcher workers outlive jobs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(error: Exception) -> str:
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"unknown {group} {name!r}; choose one of {', '.join(sorted(error.options))}"
    lines = [str(e).strip().splitlines()[0].rstrip(".") for e in (error, error.__cause__) if e is not None and str(e).strip()]
    return ": ".join(lines) or type(error).__name__


def _exit_with(error: Exception) -> None:
    print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(2)


def cli() -> None:
    """run.py: the Hydra app, printing a user mistake as one line on stderr (exit 2), not a traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # errors reach the handler below instead of Hydra's printer
    status = "FAILED"
    try:
        with _sigterm_raises():
            hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(main)()
        status = "FINISHED"
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        _exit_with(error)
    finally:
        end_sweep(status)
