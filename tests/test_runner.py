"""The runner end to end on a tiny random model: resume, failures, the shared baseline, the CLI, launchers."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from omegaconf import OmegaConf

from knormpress import fingerprint
from knormpress.config import CONF_DIR
from knormpress.fingerprint import Fingerprint
from knormpress.report.runs import load_runs
from knormpress.cli import cli
from knormpress.runner import Job, _library_bars, run_job
from knormpress.sources.models import load_model
from knormpress.tracking import Tracker, resolve_uri

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"ppl", "accuracy", "ppl_lo", "ppl_hi", "accuracy_lo", "accuracy_hi", "n_texts", "n_tokens", "kv_tokens_peak",
           "kv_tokens_mean", "kv_bytes_peak", "kv_bytes_mean", "memory_saving_pct", "tokens_per_s", "wall_s", "kv_tokens_last",
           "kv_bytes_last", "memory_saving_last_pct"}
DELTAS = {"baseline_ppl", "baseline_accuracy", "delta_ppl_pct", "delta_ppl_pct_lo", "delta_ppl_pct_hi",
          "delta_accuracy_pct", "delta_accuracy_pct_lo", "delta_accuracy_pct_hi"}
QUIET = ["progress=false", "hydra/job_logging=none", "hydra/hydra_logging=none"]  # in-process: leave pytest's logging alone


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """Two texts the tiny random model partly predicts, so accuracy > 0: a few Jacobi steps of
    "replace each token by the model's (ASCII) prediction" make a growing prefix its own greedy output."""
    folder = tmp_path_factory.mktemp("texts")
    bundle = load_model(OmegaConf.to_container(compose_config(["model=tiny_random"]).model), seed=0)
    for i, start in enumerate("AK"):
        ids = torch.tensor(bundle.tokenizer.encode(start * 150))
        with torch.no_grad():
            for _ in range(12):
                ids = torch.cat([ids[:1], 35 + bundle.model(ids[None]).logits[0, :-1, 35:130].argmax(-1)])
        (folder / f"text{i}.txt").write_text(bundle.tokenizer.decode(ids))
    return folder


@pytest.fixture
def args(tmp_path, texts, empty_db) -> list[str]:
    """Overrides for a fast tiny job logging into a fresh store in tmp_path."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return ["model=tiny_random", "dataset=local_text", f"dataset.path={texts}", "eval.max_tokens=120", "eval.n_samples=2",
            "compress.fix_kv_size=32", "eval.n_boot=200", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"cache={tmp_path}/cache"]


def job(args: list[str], tmp_path: Path, *more: str):
    return run_job(compose_config([*args, "progress=false", *more]), Job(cwd=tmp_path, out_dir=tmp_path / "out"))


def runs(tmp_path: Path, **tags: str) -> list:
    if not (tmp_path / "mlflow.db").exists():
        return []
    client = MlflowClient(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path))
    query = " and ".join(f"tags.`knormpress.{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([e.experiment_id for e in client.search_experiments()], query)


def status(tmp_path: Path, **tags: str) -> list[str]:
    return sorted(r.info.status for r in runs(tmp_path, **tags))


def test_failed_run_ends_failed_and_a_rerun_completes_it(args, tmp_path, monkeypatch):
    from knormpress import engines  # the lm task looks evaluate up there when it runs

    real = engines.evaluate

    def broken(model, ids, compression=None, *a, **k):
        if compression is not None:
            raise RuntimeError("boom")
        return real(model, ids, compression, *a, **k)

    monkeypatch.setattr(engines, "evaluate", broken)
    with pytest.raises(RuntimeError, match="boom"):
        job(args, tmp_path)
    assert status(tmp_path, role="baseline") == ["FINISHED"]
    assert status(tmp_path, role="compressed") == ["FAILED"]

    monkeypatch.setattr(engines, "evaluate", real)
    metrics = job(args, tmp_path)
    assert METRICS | DELTAS <= set(metrics) and metrics["accuracy"] > 0
    assert status(tmp_path, role="compressed") == ["FAILED", "FINISHED"]
    assert status(tmp_path, role="baseline") == ["FINISHED"]  # reused, not measured again
    assert job(args, tmp_path) is None  # done: skipped
    assert len(runs(tmp_path)) == 3


def test_interrupt_and_sigterm_end_the_run_failed(args, tmp_path, monkeypatch):
    from knormpress import engines

    for error in (KeyboardInterrupt, SystemExit(143)):
        monkeypatch.setattr(engines, "evaluate", lambda *a, **k: (_ for _ in ()).throw(error))
        with pytest.raises(BaseException):
            job(args, tmp_path, "compress=none")
    assert status(tmp_path) == ["FAILED", "FAILED"]


def test_run_left_running_by_a_dead_process_is_marked_failed(args, tmp_path):
    job(args, tmp_path)
    (done,) = runs(tmp_path, role="compressed")
    tracker = Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "knormpress")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tracker.start("stale", {"knormpress.config_hash": done.data.tags["knormpress.config_hash"]})
    tracker.client.set_tag(stale, "knormpress.pid", str(dead.pid))
    assert job(args, tmp_path) is None
    assert tracker.client.get_run(stale).info.status == "FAILED"


def other_code(monkeypatch) -> tuple[Fingerprint, Fingerprint]:
    """Today's fingerprint, and the one this process reports from now on: as if strategies/norms.py changed."""
    today = fingerprint.current()
    other = Fingerprint(today.parts | {"src/knormpress/strategies/norms.py": "0" * 12})
    monkeypatch.setattr(fingerprint, "current", lambda: other)
    return today, other


def test_runs_of_other_code_are_rerun_superseded_and_not_exported_until_the_code_comes_back(args, tmp_path, monkeypatch, caplog):
    uri = resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    job(args, tmp_path)
    old = {r.data.tags["knormpress.role"]: r.info.run_id for r in runs(tmp_path)}
    today, other = other_code(monkeypatch)
    with caplog.at_level(logging.INFO, logger="knormpress"):
        assert job(args, tmp_path) is not None
    why = f"FINISHED with other code (fingerprint {today.digest} != {other.digest}: src/knormpress/strategies/norms.py changed)"
    assert f"rerun keep_low kv=32 r=0.5: run {old['compressed']} {why}" in caplog.messages
    assert f"measure a new baseline: run {old['baseline']} {why}" in caplog.messages
    new = {r.data.tags["knormpress.role"]: r.info.run_id for r in runs(tmp_path, fingerprint=other.digest)}
    assert set(new) == {"baseline", "compressed"} and status(tmp_path) == ["FINISHED"] * 4
    marks = {r.info.run_id: r.data.tags.get("knormpress.superseded_by") for r in runs(tmp_path)}
    assert {marks[i] for i in old.values()} <= set(new.values()) and {marks[i] for i in new.values()} == {None}
    assert set(load_runs("knormpress", uri).run_id) == set(new.values())

    monkeypatch.setattr(fingerprint, "current", lambda: today)  # the edit reverted
    assert job(args, tmp_path) is None  # the old run is reused
    marks = {r.info.run_id: r.data.tags.get("knormpress.superseded_by") for r in runs(tmp_path)}
    assert {marks[i] for i in new.values()} <= set(old.values()) and {marks[i] for i in old.values()} == {None}
    assert set(load_runs("knormpress", uri).run_id) == set(old.values())


def test_a_baseline_job_of_other_code_reruns(args, tmp_path, monkeypatch, caplog):
    job(args, tmp_path, "compress=none")
    (old,) = runs(tmp_path)
    other_code(monkeypatch)
    with caplog.at_level(logging.INFO, logger="knormpress"):
        assert job(args, tmp_path, "compress=none") is not None
    assert [m for m in caplog.messages if m.startswith(f"rerun baseline: run {old.info.run_id} FINISHED with other code")]
    assert status(tmp_path, role="baseline") == ["FINISHED", "FINISHED"]


def test_compress_none_is_the_baseline_and_force_reruns(args, tmp_path):
    base = job(args, tmp_path, "compress=none")
    assert METRICS <= set(base) and not DELTAS & set(base) and base["memory_saving_pct"] == 0
    assert job(args, tmp_path, "compress=none") is None
    compressed = job(args, tmp_path, "compress=random", "compress.keep_ratio=0.25")
    assert compressed["baseline_ppl"] == pytest.approx(base["ppl"])
    assert 0 < compressed["memory_saving_pct"] < 100
    job(args, tmp_path, "compress=none", "force=true")
    assert status(tmp_path, role="baseline") == ["FINISHED", "FINISHED"]
    (run,) = runs(tmp_path, role="compressed")
    params, tags = run.data.params, run.data.tags
    assert (params["compress.strategy.name"], params["compress.strategy.seed"], params["compress.keep_ratio"]) == ("random", "0", "0.25")
    assert (params["model.source.kind"], params["task.name"]) == ("random", "lm")
    assert tags["knormpress.strategy"] == "random" and tags["knormpress.engine"] == "masked" and tags["knormpress.task"] == "lm"
    assert tags["git.dirty"] in ("true", "false") and "knormpress.sweep" not in tags


def test_a_run_logs_its_texts_curves_and_one_line_result(args, tmp_path, texts):
    job(args, tmp_path)
    (run,) = runs(tmp_path, role="compressed")
    client = MlflowClient(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path))
    (given,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.source_type) == (texts.name, "local")
    assert json.loads(given.dataset.source) == {"uri": str(texts)} and json.loads(given.dataset.profile) == {"texts": 2, "tokens": 240}
    assert given.dataset.digest == run.data.tags["knormpress.samples_hash"]
    curve = client.get_metric_history(run.info.run_id, "curve/nll_by_position")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [0, 100]  # positions 1-99 and 100-119
    assert run.data.tags["mlflow.note.content"].startswith("keep_low kv=32 r=0.5: ppl ")
    assert not [c for c in load_runs("knormpress", resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)).columns
                if c.startswith("curve/")]  # the export's columns are results, not the last point of a curve


def test_a_sweep_whose_jobs_are_all_skipped_logs_no_parent(args, tmp_path, monkeypatch):
    job(args, tmp_path)
    job(args, tmp_path, "compress.keep_ratio=0.25")
    assert cli_exit(["-m", *args, "compress.keep_ratio=0.25,0.5", f"hydra.sweep.dir={tmp_path}/sweep"], monkeypatch) == 0
    assert len(runs(tmp_path)) == 3 and all("knormpress.role" in r.data.tags for r in runs(tmp_path))


def test_library_bars_only_when_progress_is_on():
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    converter_bar = gguf.tqdm
    with _library_bars(False):
        assert not hf_logging.is_progress_bar_enabled() and gguf.tqdm(range(3), desc="GGUF").disable
    assert hf_logging.is_progress_bar_enabled() and gguf.tqdm is converter_bar
    with _library_bars(True):
        assert hf_logging.is_progress_bar_enabled() and gguf.tqdm is converter_bar


def test_without_tracking_nothing_is_logged(args, tmp_path):
    (tmp_path / "mlflow.db").unlink()
    metrics = job(args, tmp_path, "tracking=disabled")
    assert DELTAS <= set(metrics) and not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "out" / "records.parquet").exists() and (tmp_path / "out" / "baseline" / "per_text.csv").exists()


def cli_exit(argv: list[str], monkeypatch) -> int:
    """run.py in this process (Hydra's basic launcher runs jobs here too)."""
    monkeypatch.setattr(sys, "argv", ["run.py", *argv, *QUIET])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    handler = signal.getsignal(signal.SIGTERM)
    GlobalHydra.instance().clear()
    try:
        cli()
        return 0
    except SystemExit as exit:
        return exit.code
    finally:
        GlobalHydra.instance().clear()
        assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize(
    "bad,reason",
    [
        ("compress=keep_lo", "error: unknown compress 'keep_lo'; choose one of "),  # the choices grow: not spelled out here
        ("compress.strategy.name=keep_lo", "error: unknown strategy 'keep_lo'; choose one of "),
        ("compress.keep_ratio=1.5", "error: keep_ratio must lie in [0, 1], got 1.5"),
        ("compress=none compress.n_sink=-3", "error: n_sink must be an integer in [0, fix_kv_size="),
        ("model=nonexistent", "error: unknown model 'nonexistent'; choose one of "),
        ("compress.strategy.window=3", "error: strategy 'keep_low' has no setting 'window'; its settings are: none"),
        ("task.depth=3", "error: task 'lm' has no setting 'depth'; its settings are: none"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line(bad, reason, args, tmp_path, monkeypatch, capsys):
    assert cli_exit([*args, *bad.split(), f"hydra.run.dir={tmp_path}/run"], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(reason) and "\n" not in err
    assert "RUNNING" not in status(tmp_path) and not runs(tmp_path)


def test_failed_job_does_not_stop_the_multirun(args, tmp_path, monkeypatch, capsys):
    sweep = ["compress.keep_ratio=1.5,0.5", f"hydra.sweep.dir={tmp_path}/sweep"]
    assert cli_exit(["-m", *args, *sweep], monkeypatch) == 2
    assert "keep_ratio must lie in [0, 1], got 1.5" in capsys.readouterr().err
    assert status(tmp_path, role="compressed") == ["FINISHED"]
    assert status(tmp_path) == ["FAILED", "FINISHED", "FINISHED"]  # the parent, the baseline, keep_ratio 0.5


def test_force_reruns_everything_but_shares_one_new_baseline_per_sweep(args, tmp_path, monkeypatch):
    job(args, tmp_path)
    assert cli_exit(["-m", *args, "compress.keep_ratio=0.3,0.5", "force=true", f"hydra.sweep.dir={tmp_path}/sweep"], monkeypatch) == 0
    assert status(tmp_path, role="compressed") == ["FINISHED"] * 3
    assert status(tmp_path, role="baseline") == ["FINISHED"] * 2


@pytest.mark.slow
def test_two_job_multirun_end_to_end(args, tmp_path):
    """The real CLI in a subprocess: two FINISHED runs plus the baseline under one parent; a rerun skips both."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", *args, "compress.keep_ratio=0.3,0.5", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=os.environ | {"CI": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,) = [r for r in runs(tmp_path) if "knormpress.role" not in r.data.tags]
    children = runs(tmp_path, role="compressed") + runs(tmp_path, role="baseline")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert parent.info.run_name.startswith("compress.keep_ratio=0.3,0.5 @ ")
    client = MlflowClient(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path))
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["comparison.png"]
    for run in children:
        assert run.info.status == "FINISHED" and METRICS <= set(run.data.metrics)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["knormpress.sweep"] == str(sweep) == parent.data.tags["knormpress.sweep"]
        files = {a.path for a in MlflowClient(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)).list_artifacts(run.info.run_id)}
        assert files == {"config.yaml", "records.parquet", "per_text.csv"}
    compressed = runs(tmp_path, role="compressed")
    assert sorted(r.data.params["compress.keep_ratio"] for r in compressed) == ["0.3", "0.5"]
    assert all(DELTAS <= set(r.data.metrics) for r in compressed)
    table = pd.read_parquet(sweep / "0" / "records.parquet")
    assert list(table.columns) == ["text_id", "title", "position", "nll", "correct"] and len(table) == 2 * 119
    per_text = pd.read_csv(sweep / "0" / "per_text.csv")
    assert list(per_text.columns) == ["text_id", "title", "n_tokens", "nll_sum", "n_correct", "ppl", "accuracy"]
    by_hand = table.groupby("text_id").agg(nll_sum=("nll", "sum"), n_correct=("correct", "sum"), n=("nll", "size"))
    assert per_text.set_index("text_id").nll_sum.to_dict() == pytest.approx(by_hand.nll_sum.to_dict(), rel=1e-6)
    assert per_text.set_index("text_id").n_correct.to_dict() == by_hand.n_correct.to_dict()

    again = subprocess.run([*cmd[:-1], f"hydra.sweep.dir={tmp_path}/again"], cwd=tmp_path, env=os.environ | {"CI": "1"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skip keep_low") == 2, again.stdout[-3000:]
    assert len(runs(tmp_path, role="compressed")) == 2


@pytest.mark.slow
def test_two_parallel_joblib_jobs_both_finish(args, tmp_path):
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *args,
           "compress=keep_low,random", f"hydra.sweep.dir={tmp_path}/sweep"]
    done = subprocess.run(cmd, cwd=tmp_path, env=os.environ | {"CI": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert status(tmp_path, role="compressed") == ["FINISHED", "FINISHED"]
    assert status(tmp_path, role="baseline") == ["FINISHED"]  # the lock let one job measure it, the other reuse it
    assert len({r.data.tags.get("mlflow.parentRunId") for r in runs(tmp_path)} - {None}) == 1


@pytest.mark.slow
def test_sigterm_ends_the_open_run_failed(args, tmp_path):
    """A real SIGTERM (kill, scancel) to a job stuck in evaluate: the run ends FAILED, the process exits 143."""
    stuck = ("import sys, time, knormpress.cli as r, knormpress.engines as e; e.evaluate = lambda *a, **k: time.sleep(600); "
             "sys.argv = sys.argv[:1] + sys.argv[2:]; r.cli()")
    cmd = [sys.executable, "-c", stuck, "--", *args, f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=os.environ | {"CI": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while status(tmp_path) != ["RUNNING"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status(tmp_path) == ["FAILED"]


@pytest.mark.slow
def test_a_sweep_killed_with_sigkill_is_marked_failed_by_the_next_start(args, tmp_path):
    """SIGKILL runs no handler: the parent and the open child stay RUNNING until the next job on this host reaps them."""
    stuck = ("import sys, time, knormpress.cli as r, knormpress.engines as e; e.evaluate = lambda *a, **k: time.sleep(600); "
             "sys.argv = sys.argv[:1] + sys.argv[2:]; r.cli()")
    cmd = [sys.executable, "-c", stuck, "--", "-m", *args, "compress.keep_ratio=0.3,0.5", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=os.environ | {"CI": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while status(tmp_path) != ["RUNNING", "RUNNING"]:  # the parent and the baseline it is measuring
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (parent,) = [r for r in runs(tmp_path) if "knormpress.role" not in r.data.tags]
    assert parent.info.status == "RUNNING" and parent.data.tags["knormpress.pid"] == str(proc.pid)
    job(args, tmp_path, "compress=none")
    assert status(tmp_path) == ["FAILED", "FAILED", "FINISHED"]  # parent and baseline reaped, a new baseline measured


def test_a_misspelled_strategy_setting_names_the_valid_ones(args, tmp_path, monkeypatch, capsys):
    assert cli_exit([*args, "compress=random", "compress.strategy.sed=3", f"hydra.run.dir={tmp_path}/run"], monkeypatch) == 2
    assert capsys.readouterr().err.strip() == "error: strategy 'random' has no setting 'sed'; its settings are: seed; did you mean 'seed'?"


def test_a_run_is_named_by_its_model_task_strategy_label_and_budget():
    from knormpress import Compression
    from knormpress.runner import _name, run_name

    assert _name(Compression({"name": "h2o", "normalise": "mean"}, fix_kv_size=None, ratio=0.5, when="prefill")) == \
        "h2o[normalise=mean] r=0.5 ratio=0.5 prefill"
    assert _name(Compression({"name": "random", "seed": 3}, fix_kv_size=256, keep_ratio=0.3)) == "random kv=256 r=0.3"
    assert run_name("gemma-3-270m", "passkey", _name(None)) == "gemma-3-270m passkey baseline"


def test_a_prefill_run_is_judged_by_the_cache_its_answer_is_decoded_from():
    """Prefill reads the prompt whole, so its peak equals the baseline's; the saving is that of the
    pruned cache the answer is decoded from (streaming runs keep the peak)."""
    from types import SimpleNamespace

    from knormpress import Compression
    from knormpress.runner import Measured, _held_at, _resources, _result_line
    from knormpress.tasks import get_task

    sample = SimpleNamespace(input_ids=torch.zeros(11))
    full = {"kv_tokens_peak": 400.0, "kv_tokens_mean": 200.0, "kv_bytes_peak": 4000.0, "kv_bytes_mean": 2000.0,
            "kv_tokens_answer": 400.0, "kv_bytes_answer": 4000.0}
    pruned = full | {"kv_tokens_answer": 40.0, "kv_bytes_answer": 400.0}
    baseline = Measured(pd.DataFrame(), full)
    prefill = Compression("keep_low", fix_kv_size=None, ratio=0.9, when="prefill")
    held = _held_at(prefill, pruned)
    m = _resources([SimpleNamespace(memory=pruned, wall_s=1.0)], [sample], baseline, held)
    assert held == "answer" and m["memory_saving_pct"] == pytest.approx(100 * (1 - 400 / 4000))
    line = _result_line("keep_low r=0.5 ratio=0.9 prefill", get_task("passkey"), m | {"accuracy": 1.0, "accuracy_lo": 0.9, "accuracy_hi": 1.0, "n_trials": 10}, [sample],
                        held)
    assert "kv 40 tokens at the answer (90% less memory)" in line
    assert _held_at(Compression("keep_low"), full) == _held_at(None, full) == "peak"
