"""results/metrics.json's rule: one schema {model: {task: {strategy: numbers}}}, each task read at its
own default setting, runs of other settings (an interval, re-rotated positions, another budget)
never standing in for the default."""

import importlib.util

import pandas as pd
import pytest

from knormpress.config import CONF_DIR
from knormpress.report.headline import headline
from knormpress.report.runs import tidy

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


def test_one_task_keeps_the_task_level():
    runs = tidy(pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1)]))
    assert list(headline(runs, {"lm": LM})["tiny"]) == ["lm"]


def test_older_exports_without_the_newer_settings_count_as_their_defaults():
    old = pd.DataFrame([row("b", None, 0), row("k", "keep_low", 1)]).drop(columns=["positions", "interval", "when", "ratio"])
    assert headline(tidy(old), {"lm": LM})["tiny"]["lm"]["keep_low"]["ppl"] == 11.0


def test_the_retrieval_presets_give_their_own_budget():
    spec = importlib.util.spec_from_file_location("make_metrics", CONF_DIR.parent / "scripts" / "make_metrics.py")
    make_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_metrics)
    lm = make_metrics.task_setting(CONF_DIR / "config.yaml", "lm")
    assert lm["fix_kv_size"] == 512 and lm["ratio"] is None and lm["when"] == "streaming"
    for task in ("passkey", "needle"):
        setting = make_metrics.task_setting(CONF_DIR / "config.yaml", task)
        assert setting["fix_kv_size"] is None and setting["ratio"] == pytest.approx(0.5) and setting["when"] == "prefill"
        assert setting["keep_ratio"] == lm["keep_ratio"]  # the rest comes from conf/config.yaml
