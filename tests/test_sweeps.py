"""Sweep parents in MLflow: created lazily, named from the sweep, closed with a comparison, reaped when killed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from knormpress.config import CONF_DIR
from knormpress.sweeps import COMPARISON, SweepRun, end_sweep, sweep_name, sweep_parent
from knormpress.tracking import Tracker, resolve_uri, tags


@pytest.fixture
def tracker(tmp_path, empty_db):
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "tests")


def sweep_config(tmp_path: Path, overrides: list[str]):
    """A multirun's config as Hydra hands it to the callback (sweep overrides set as the command line would)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in overrides if "," not in o], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.overrides.task = overrides
        cfg.hydra.sweep.dir = str(tmp_path / "sweep")
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.progress = False
    return cfg


def test_sweep_parent_is_named_from_the_sweep(tmp_path):
    assert sweep_name(sweep_config(tmp_path, ["experiment=strategies"])).startswith("strategies sweep @ ")
    assert sweep_name(sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5", "model=tiny_random"])).startswith(
        "compress.keep_ratio=0.3,0.5 @ ")
    assert sweep_name(sweep_config(tmp_path, ["experiment=keep_ratio", "eval.n_samples=1,2"])).startswith(
        "keep_ratio sweep eval.n_samples=1,2 @ ")


def test_sweep_parent_comes_with_the_first_job_and_ends_with_a_comparison(tracker, tmp_path):
    config = sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5"])
    callback = instantiate(config.hydra.callbacks.mlflow_sweep)  # as Hydra builds it: the figure named in conf/
    assert callback.figure == "knormpress.report.sweep_figure.sweep_comparison"
    callback.on_multirun_start(config)
    assert not tracker.search({}, status=None)  # no job has run yet: no parent
    parent = sweep_parent(tmp_path / "sweep", tracker)
    assert sweep_parent(tmp_path / "sweep", tracker) == parent and sweep_parent(tmp_path / "elsewhere", tracker) is None
    for role, name, ppl in (("baseline", "baseline", 20.0), ("compressed", "keep_low r=0.3", 23.0), ("compressed", "keep_low r=0.5", 22.0)):
        with tracker.run(name, tags(role=role, parent=parent, task="lm", description=f"{name}: ppl {ppl}")) as run_id:
            tracker.log(run_id, {}, {"ppl": ppl, "ppl_lo": ppl - 1, "ppl_hi": ppl + 1, "accuracy": 0.3}, {}, [])
    end_sweep("FINISHED")
    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("compress.keep_ratio=0.3,0.5 @ ")
    assert run.data.tags["knormpress.pid"] == str(os.getpid()) and "knormpress.role" not in run.data.tags
    assert run.data.tags["mlflow.note.content"].startswith("3 of 3 runs finished.") and "- keep_low r=0.5: ppl 22.0" in run.data.tags["mlflow.note.content"]
    (figure,) = tracker.client.list_artifacts(parent)
    assert figure.path == COMPARISON and tracker.download(parent, COMPARISON, tmp_path / "dl").read_bytes()[:4] == b"\x89PNG"


def test_the_figure_is_passed_in_not_imported_from_the_report(tracker, tmp_path):
    """sweeps.py names no report module: the callback's `figure` is the only way in; without one the
    parent gets its description and no figure."""
    from knormpress import sweeps

    assert "knormpress.report" not in Path(sweeps.__file__).read_text()
    SweepRun(figure=None).on_multirun_start(sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5"]))
    parent = sweep_parent(tmp_path / "sweep", tracker)
    with tracker.run("keep_low r=0.3", tags(role="compressed", parent=parent, task="lm", description="d")) as run_id:
        tracker.log(run_id, {}, {"ppl": 3.0}, {}, [])
    end_sweep("FINISHED")
    assert tracker.client.get_run(parent).data.tags["mlflow.note.content"].startswith("1 of 1 runs finished.")
    assert not tracker.client.list_artifacts(parent)


def test_a_sweep_whose_jobs_are_all_skipped_logs_no_parent(tracker, tmp_path):
    SweepRun().on_multirun_start(sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5"]))
    end_sweep("FINISHED")
    assert not tracker.search({}, status=None, everywhere=True)


def test_a_parent_whose_launcher_was_killed_is_reaped(tracker, tmp_path):
    """SIGKILL leaves the parent RUNNING; the next start on this host marks it FAILED."""
    SweepRun().on_multirun_start(sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5"]))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spec = json.loads((tmp_path / "sweep" / "mlflow_parent.json").read_text())
    spec["tags"]["knormpress.pid"] = str(dead.pid)  # as if the launching process had died
    (tmp_path / "sweep" / "mlflow_parent.json").write_text(json.dumps(spec))
    parent = sweep_parent(tmp_path / "sweep", tracker)
    assert tracker.client.get_run(parent).info.status == "RUNNING"
    Tracker(tracker.uri, "another").reap({}, everywhere=True)
    assert tracker.client.get_run(parent).info.status == "FAILED"


def test_runs_the_sweep_reused_join_its_description_and_figure(tracker, tmp_path, monkeypatch):
    """A baseline measured before and a job skipped as already done have no run under the parent;
    `note_reused` puts them in the parent's description and in the figure's rows (baseline line)."""
    from knormpress import sweeps

    drawn = {}
    monkeypatch.setattr(sweeps, "get_method", lambda name: lambda rows, title: drawn.setdefault("rows", rows) and None)
    old = {}
    for role, name, ppl in (("baseline", "baseline", 20.0), ("compressed", "keep_low r=0.3", 23.0)):
        with tracker.run(name, tags(role=role, task="lm", description=f"{name}: ppl {ppl}")) as run_id:
            tracker.log(run_id, {}, {"ppl": ppl}, {}, [])
        old[name] = run_id
    SweepRun(figure="any.figure").on_multirun_start(sweep_config(tmp_path, ["compress.keep_ratio=0.3,0.5"]))
    parent = sweep_parent(tmp_path / "sweep", tracker)
    sweeps.note_reused(tmp_path / "sweep", old["baseline"])
    sweeps.note_reused(tmp_path / "sweep", old["keep_low r=0.3"])
    sweeps.note_reused(tmp_path / "sweep", old["baseline"])  # a second job reused it too: listed once
    with tracker.run("keep_low r=0.5", tags(role="compressed", parent=parent, task="lm", description="keep_low r=0.5: ppl 22.0")) as run_id:
        tracker.log(run_id, {}, {"ppl": 22.0}, {}, [])
    end_sweep("FINISHED")
    note = tracker.client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith("3 of 3 runs finished.") and "- baseline: ppl 20.0 (reused)" in note
    assert "- keep_low r=0.3: ppl 23.0 (reused)" in note and "- keep_low r=0.5: ppl 22.0\n" in note + "\n"
    assert sorted(drawn["rows"].name) == ["baseline", "keep_low r=0.3", "keep_low r=0.5"]
    assert drawn["rows"].set_index("name").role["baseline"] == "baseline"
