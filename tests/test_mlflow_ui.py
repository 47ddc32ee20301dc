"""The MLflow UI server reads our sqlite store: what a person browsing `mlflow ui` sees, through its REST API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from knormpress.tracking import VIEW_TAG, Tracker, resolve_uri

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def get(url: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(query)}", timeout=10) as response:
        return json.load(response)


@contextmanager
def mlflow_ui(db: Path) -> Iterator[str]:
    """`mlflow ui` on a free loopback port over `db`; yields its base URL and always stops it."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited early"
                assert time.monotonic() < deadline, "mlflow ui did not come up within 180 s"
                time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, all started here
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.slow
def test_mlflow_ui_finds_our_runs(tmp_path):
    tracker = Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "strategies")
    for strategy, ppl in (("keep_low", 20.0), ("random", 22.0)):
        with tracker.run(f"{strategy} r=0.5", {"knormpress.role": "compressed", "knormpress.strategy": strategy}) as run_id:
            tracker.log(run_id, {"compress.strategy": strategy}, {"ppl": ppl, "delta_ppl_pct": 5.0}, {}, [])
    with mlflow_ui(tmp_path / "mlflow.db") as base:
        query = "tags.`knormpress.role` = 'compressed' and metrics.ppl < 21"
        found = post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [tracker.experiment_id], "filter": query})
        (run,) = found["runs"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "keep_low r=0.5"
        assert {"key": "compress.strategy", "value": "keep_low"} in run["data"]["params"]


@pytest.mark.slow
def test_mlflow_ui_shows_a_fresh_sweep_as_ml_runs_with_datasets_curves_and_a_comparison(tmp_path):
    """`python run.py -m compress.keep_ratio=0.3,0.5` on a tiny model, then what the UI's REST API serves."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(2):
        (texts / f"book{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 13}" for j in range(60)))
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "compress.keep_ratio=0.3,0.5", "model=tiny_random", "dataset=local_text",
           f"dataset.path={texts}", "eval.max_tokens=250", "eval.n_samples=2", "compress.fix_kv_size=32", "eval.n_boot=100",
           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=ui", f"cache={tmp_path}/cache",
           f"hydra.sweep.dir={tmp_path}/sweep"]
    done = subprocess.run(cmd, cwd=tmp_path, env=os.environ | {"CI": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    with mlflow_ui(tmp_path / "mlflow.db") as base:
        api = f"{base}/api/2.0/mlflow"
        experiment = get(f"{api}/experiments/get-by-name", experiment_name="ui")["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        found = post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
        (parent,) = [r for r, t in zip(found, tags) if "knormpress.role" not in t]
        children = [r for r, t in zip(found, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
        assert parent["info"]["run_name"].startswith("compress.keep_ratio=0.3,0.5 @ ") and len(children) == 3

        for child in children:  # the baseline and the two compressed runs
            (given,) = child["inputs"]["dataset_inputs"]
            dataset = given["dataset"]
            assert (dataset["name"], dataset["source_type"], json.loads(dataset["source"])) == ("texts", "local", {"uri": str(texts)})
            assert json.loads(dataset["profile"]) == {"texts": 2, "tokens": 500} and len(dataset["digest"]) == 16
            curve = get(f"{api}/metrics/get-history", run_id=child["info"]["run_id"], metric_key="curve/nll_by_position")["metrics"]
            assert sorted(m["step"] for m in curve) == [0, 100, 200]  # positions 1-99, 100-199, 200-249
            note = {t["key"]: t["value"] for t in child["data"]["tags"]}["mlflow.note.content"]
            label, _, result = note.partition(": ")  # the run's name is model, task, then this label
            assert child["info"]["run_name"].endswith(f" lm {label}") and result.startswith("ppl ")

        files = get(f"{api}/artifacts/list", run_id=parent["info"]["run_id"])["files"]
        assert [f["path"] for f in files] == ["comparison.png"] and int(files[0]["file_size"]) > 1000


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); Playwright drives it, downloading no browser
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # offline: no calls home at start


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: `apt-get install -y chromium` (.ci/run does)")
def test_the_experiment_opens_on_the_runs_table_with_the_headline_metrics(tmp_path):
    """What a person sees in a real browser following the link a sweep prints (`Tracker.browse_url`):
    the runs table in Model training mode, runs named by model, task and setting, metric columns."""
    from playwright.sync_api import sync_playwright

    from knormpress.runner import run_name, table_columns
    from knormpress.tasks import get_task

    tracker = Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "knormpress")
    tracker.show_columns(table_columns(get_task("lm")))
    tracker.show_columns(table_columns(get_task("passkey")))  # a second task adds its columns, keeps the first's
    names = [run_name("SmolLM2", "lm", "baseline"), run_name("SmolLM2", "lm", "keep_low kv=512 r=0.5")]
    for name, ppl in zip(names, (20.0, 22.5)):
        with tracker.run(name, {"knormpress.task": "lm"}) as run_id:
            tracker.log(run_id, {}, {"ppl": ppl, "delta_ppl_pct": ppl / 20 * 100 - 100, "memory_saving_pct": 50.0}, {}, [])
    with mlflow_ui(tmp_path / "mlflow.db") as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(tracker.browse_url(base))
            page.get_by_text(names[1]).first.wait_for(timeout=120_000)  # the runs table, not the GenAI overview
            headers = {h.strip() for h in page.locator("[role=columnheader]").all_inner_texts()}
            page.screenshot(path=str(tmp_path / "runs.png"))
        finally:
            browser.close()
    assert "/runs" in page.url and {"Run Name", "ppl", "delta_ppl_pct", "memory_saving_pct"} <= headers
    view = json.loads(tracker.client.get_experiment(tracker.experiment_id).tags[VIEW_TAG])  # what the UI did not show:
    assert view["selectedColumns"] == [f"metrics.`{m}`" for m in ("ppl", "accuracy", "delta_ppl_pct", "delta_accuracy_pct",
                                                                 "memory_saving_pct")]  # no run has delta_accuracy_pct
