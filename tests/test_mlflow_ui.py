"""The MLflow UI server reads our sqlite store: runs are found through its REST search API."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from knormpress.tracking import Tracker, resolve_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.mark.slow
def test_mlflow_ui_finds_our_runs(tmp_path):
    tracker = Tracker(resolve_uri(f"sqlite:///{tmp_path}/mlflow.db", tmp_path), "strategies")
    for strategy, ppl in (("keep_low", 20.0), ("random", 22.0)):
        with tracker.run(f"{strategy} r=0.5", {"knormpress.role": "compressed", "knormpress.strategy": strategy}) as run_id:
            tracker.log(run_id, {"compress.strategy": strategy}, {"ppl": ppl, "delta_ppl_pct": 5.0}, {}, [])
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
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
        query = "tags.`knormpress.role` = 'compressed' and metrics.ppl < 21"
        found = post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [tracker.experiment_id], "filter": query})
        (run,) = found["runs"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "keep_low r=0.5"
        assert {"key": "compress.strategy", "value": "keep_low"} in run["data"]["params"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers, all started here
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
