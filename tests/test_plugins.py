"""The recipes README gives: a new strategy (with a setting of its own), a new task and a new dataset
are one class plus one YAML, written outside the package, and they run through run.py, the export,
the figures and the summary with no edit to any other file."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
from dataclasses import dataclass

import pandas as pd
import torch.nn.functional as F

from knormpress import Dataset, Document, Outcome, Strategy, Task, register, register_dataset, register_task, run_engine
from knormpress.strategies import key_norm


@register
@dataclass
class NearNorm(Strategy):
    """Keep the keys whose norm is closest to `target`."""

    name = "near_norm"
    target: float = 1.0

    def score(self, view):
        return -(key_norm(view.keys) - self.target).abs()


@register_task
@dataclass
class HalfNLL(Task):
    """Mean NLL of the first and the second half of each text."""

    name = "half_nll"

    def run(self, model, sample, compression, engine, progress):
        out = run_engine(model, sample.input_ids, compression, engine, progress)
        nll = F.cross_entropy(out.logits, sample.input_ids[1:], reduction="none")
        half = len(nll) // 2
        records = pd.DataFrame({"text_id": sample.id, "half": [1, 2], "n": [half, len(nll) - half],
                                "nll_sum": [nll[:half].sum().item(), nll[half:].sum().item()]})
        return Outcome(records, out.memory(), out.engine, out.wall_s)

    def metrics(self, records, baseline, n_boot, seed):
        sums = records.groupby("half")[["nll_sum", "n"]].sum()
        return {"nll_first": sums.nll_sum[1] / sums.n[1], "nll_second": sums.nll_sum[2] / sums.n[2]}


@register_dataset
@dataclass
class Phrases(Dataset):
    """`n_texts` texts, each one phrase said over and over."""

    name = "phrases"
    phrase: str = "the sky is blue"
    n_texts: int = 3

    def documents(self, cache):
        return iter(Document(f"p{i}", f"phrase {i}", f"{i}: " + " ".join([self.phrase] * 50)) for i in range(self.n_texts))

    def source(self):
        return self.name, "local", {"uri": f"phrases:{self.phrase}"}
'''


@pytest.fixture
def plugin(tmp_path, empty_db) -> dict:
    """A plugin module and its three YAML files in tmp_path, an empty MLflow store, and three texts."""
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    (tmp_path / "conf" / "compress").mkdir(parents=True)
    (tmp_path / "conf" / "task").mkdir()
    (tmp_path / "conf" / "dataset").mkdir()
    (tmp_path / "conf" / "compress" / "near_norm.yaml").write_text("strategy:\n  name: near_norm\n  target: 2.0\n")
    (tmp_path / "conf" / "task" / "half_nll.yaml").write_text("name: half_nll\n")
    (tmp_path / "conf" / "dataset" / "phrases.yaml").write_text("name: phrases\nphrase: the grass is green\nn_texts: 3\n")
    rng = random.Random(0)
    (tmp_path / "texts").mkdir()
    for i in range(3):
        words = " ".join(rng.choice(["the", "sky", "is", "blue", "grass", "green", "sun"]) for _ in range(80))
        (tmp_path / "texts" / f"t{i}.txt").write_text(words)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)  # the plugin, then the caller's
    return {"dir": tmp_path, "env": os.environ | {"CI": "1", "PYTHONPATH": path},
            "uri": f"sqlite:///{tmp_path}/mlflow.db"}


def run(plugin: dict, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *argv], cwd=plugin["dir"], env=plugin["env"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def through_the_pipeline(plugin: dict, experiment: str, *overrides: str) -> str:
    """run.py -m (two jobs), export, figures, summary; returns the summary's text."""
    tmp = plugin["dir"]
    run(plugin, str(ROOT / "run.py"), "-m", f"hydra.searchpath=[file://{tmp}/conf]", "plugins=[my_plugin]",
        "model=tiny_random", "dataset=local_text", f"dataset.path={tmp}/texts", "eval.max_tokens=100",
        "eval.n_samples=3", "compress.fix_kv_size=24", "eval.n_boot=50", f"tracking.uri={plugin['uri']}",
        f"tracking.experiment={experiment}", f"cache={tmp}/cache", f"hydra.sweep.dir={tmp}/sweep", *overrides)
    results = tmp / "results"
    run(plugin, str(ROOT / "scripts" / "export_results.py"), "--experiment", experiment, "--tracking-uri", plugin["uri"],
        "--out", str(results))
    run(plugin, str(ROOT / "scripts" / "plot_compression_results.py"), "--results", str(results))
    run(plugin, str(ROOT / "scripts" / "make_summary.py"), "--results", str(results))
    assert len(list(results.glob("*.png"))) >= 4
    return (results / "summary.md").read_text()


@pytest.mark.slow
def test_a_new_strategy_with_its_own_setting(plugin):
    summary = through_the_pipeline(plugin, "plug", "compress=near_norm", "compress.strategy.target=1.5,3.0")
    client = MlflowClient(plugin["uri"])
    runs = client.search_runs([client.get_experiment_by_name("plug").experiment_id], "tags.`knormpress.role` = 'compressed'")
    assert sorted(r.data.params["compress.strategy.target"] for r in runs) == ["1.5", "3.0"]
    assert {r.data.tags["knormpress.strategy"] for r in runs} == {"near_norm"}
    assert "near_norm" in summary


@pytest.mark.slow
def test_a_new_task(plugin):
    summary = through_the_pipeline(plugin, "halves", "task=half_nll", "compress=keep_low,near_norm")
    client = MlflowClient(plugin["uri"])
    runs = client.search_runs([client.get_experiment_by_name("halves").experiment_id], "")
    compressed = [r for r in runs if r.data.tags.get("knormpress.role") == "compressed"]
    assert len(compressed) == 2 and all({"nll_first", "nll_second", "kv_tokens_peak"} <= set(r.data.metrics) for r in compressed)
    assert {r.data.tags["knormpress.task"] for r in compressed} == {"half_nll"}
    assert "nll_second" in summary and "near_norm" in summary


@pytest.mark.slow
def test_a_new_dataset(plugin):
    tmp = plugin["dir"]
    run(plugin, str(ROOT / "run.py"), f"hydra.searchpath=[file://{tmp}/conf]", "plugins=[my_plugin]", "model=tiny_random",
        "dataset=phrases", "dataset.n_texts=4", "eval.max_tokens=100", "eval.n_samples=2", "compress.fix_kv_size=24",
        "eval.n_boot=50", f"tracking.uri={plugin['uri']}", "tracking.experiment=words", f"cache={tmp}/cache",
        f"hydra.run.dir={tmp}/out")
    client = MlflowClient(plugin["uri"])
    runs = client.search_runs([client.get_experiment_by_name("words").experiment_id], "")
    assert len(runs) == 2  # the baseline and keep_low, both on the phrases
    for r in runs:
        assert (r.data.params["dataset.name"], r.data.params["dataset.phrase"], r.data.params["dataset.n_texts"]) == (
            "phrases", "the grass is green", "4")
        (given,) = r.inputs.dataset_inputs
        assert (given.dataset.name, json.loads(given.dataset.source)) == ("phrases", {"uri": "phrases:the grass is green"})
        assert json.loads(given.dataset.profile) == {"texts": 2, "tokens": 200}
    run(plugin, str(ROOT / "scripts" / "export_results.py"), "--experiment", "words", "--tracking-uri", plugin["uri"],
        "--out", str(tmp / "results"))
    exported = pd.read_csv(tmp / "results" / "words.csv")
    assert exported.dataset.tolist() == ["phrases", "phrases"] and set(exported.strategy) == {"none", "keep_low"}
    texts = pd.read_csv(tmp / "results" / "per_text" / "words.csv")
    assert set(texts.text_id) <= {"p0", "p1", "p2", "p3"} and texts.text_id.nunique() == 2
