"""results/metrics.json's rule: one schema {model: {task: {strategy: numbers}}}, each task read at its
own default setting, runs of other settings (an interval, re-rotated positions, another budget)
never standing in for the default."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from knormpress.config import CONF_DIR
from knormpress.report.claims import verdict_metrics
from knormpress.report.headline import headline, task_setting
from knormpress.report.study_headline import study_headline
from knormpress.report.runs import tidy
from knormpress.settings import defaults
from knormpress.spec import Compression
from knormpress.tasks import TASKS

LM = {"fix_kv_size": 512, "ratio": None, "when": "streaming", "keep_ratio": 0.5, "skip_layers": [0, 1],
      "sort_by_time": True, "positions": True, "interval": 1}


def row(run_id: str, strategy: str | None, start: int, task: str = "lm", **setting) -> dict:
    compress = {} if strategy is None else LM | {"skip_layers": "[0, 1]", "positions": "true"} | setting
    return {"run_id": run_id, "experiment": "e", "role": "compressed" if strategy else "baseline",
            "strategy": strategy or "none", "task": task, "model": "tiny", "start_time": start,
            "ppl": 10.0 + start, "accuracy": 0.5, **compress}


def test_each_task_is_read_at_its_own_setting_and_newer_other_settings_do_not_win():
    runs = tidy(pd.DataFrame([
        row("b", None, 0), row("k", "keep_low", 1),
        row("i", "keep_low", 5, interval=64), row("r", "keep_low", 6, positions="rerotate"),
        row("s", "keep_low", 7, fix_kv_size=256), row("u", "keep_low", 8, sort_by_time=False),
        row("pb", None, 2, task="passkey"), row("p5", "tova", 3, task="passkey", fix_kv_size=None, ratio=0.5, when="prefill"),
        row("p9", "tova", 9, task="passkey", fix_kv_size=None, ratio=0.9, when="prefill"),
    ]))
    settings = {"lm": LM, "passkey": LM | {"fix_kv_size": None, "ratio": 0.5, "when": "prefill"}}
    out = headline(runs, settings)
    assert set(out) == {"tiny"} and set(out["tiny"]) == {"lm", "passkey"}
    assert out["tiny"]["lm"]["keep_low"]["ppl"] == 11.0  # run "k", though four newer keep_low runs exist
    assert out["tiny"]["lm"]["baseline"] == {"ppl": 10.0, "accuracy": 0.5}
    assert out["tiny"]["passkey"]["tova"]["ppl"] == 13.0  # ratio 0.5, not the newer 0.9


def test_the_experiment_with_the_most_strategies_at_the_setting_wins_over_a_newer_run_of_another_size():
    # "strategies": baseline, keep_low and tova on 10 short texts; "memory": a newer baseline and
    # keep_low at the same setting on one long text. The headline reads the strategies experiment only.
    runs = tidy(pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1), row("t", "tova", 2),
                              row("mb", None, 5), row("mk", "keep_low", 6)]))
    runs["experiment"] = runs.run_id.map(lambda r: "memory" if r.startswith("m") else "strategies")
    assert headline(runs, {"lm": LM})["tiny"]["lm"]["keep_low"] == {"ppl": 16.0, "accuracy": 0.5}  # newest of all
    got = study_headline(runs)["tiny"]["lm"]
    assert got == {"baseline": {"ppl": 10.0, "accuracy": 0.5}, "keep_low": {"ppl": 11.0, "accuracy": 0.5},
                   "tova": {"ppl": 12.0, "accuracy": 0.5}}


def test_one_task_keeps_the_task_level():
    runs = tidy(pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1)]))
    assert list(headline(runs, {"lm": LM})["tiny"]) == ["lm"]


def test_older_exports_without_the_newer_settings_count_as_their_defaults():
    old = pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1)]).drop(columns=["positions", "interval", "when", "ratio"])
    assert headline(tidy(old), {"lm": LM})["tiny"]["lm"]["keep_low"]["ppl"] == 11.0


def test_each_task_is_read_at_the_spec_defaults_and_its_declared_setting():
    lm = task_setting("lm")
    assert lm == defaults(Compression) and lm["fix_kv_size"] == 512 and lm["ratio"] is None and lm["when"] == "streaming"
    for task in ("passkey", "needle"):
        setting = task_setting(task)
        assert setting["fix_kv_size"] is None and setting["ratio"] == pytest.approx(0.5) and setting["when"] == "prefill"
        assert setting["keep_ratio"] == lm["keep_ratio"]  # the rest: the spec's defaults
    assert task_setting(None) == lm  # runs from before tasks existed ran lm


def test_the_retrieval_presets_run_at_their_tasks_headline_setting():
    """What the headline reads is what the presets ran: each preset of a task that declares a setting
    composes to it (its sweep grid aside)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for task in ("passkey", "needle"):
            compress = compose("config", overrides=[f"experiment={task}"]).compress
            assert {k: compress[k] for k in TASKS[task].setting} == TASKS[task].setting


def test_make_metrics_writes_the_headline_of_the_exports(tmp_path):
    runs = tidy(pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1)]))
    runs.to_csv(tmp_path / "e.csv", index=False)
    done = subprocess.run([sys.executable, str(CONF_DIR.parent / "scripts" / "make_metrics.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = headline(runs)
    want["tiny"]["claims"] = verdict_metrics(runs, pd.DataFrame(columns=["run_id", "text_id"]))["tiny"]  # no runs any claim names
    assert set(want["tiny"]["claims"].values()) == {"not measurable"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == want
