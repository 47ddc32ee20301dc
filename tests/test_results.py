"""Export and verdicts on fake runs that follow the runner's MLflow contract (no model needed)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from knormpress import results
from knormpress.errors import ConfigError
from knormpress.metrics import EvalResult, summarize

N_TEXTS, N_TOKENS = 6, 400
CONFIGS = {  # experiment -> (strategy, keep_ratio, sort_by_time, true dPPL %, true dAcc %); seed-like effects
    "strategies": [("none", 0.5, True, 0, 0), ("keep_low", 0.5, True, 4.7, -3.0), ("keep_high", 0.5, True, 18, -9),
                   ("random", 0.5, True, 10.3, -5.0), ("recent_only", 0.5, True, 12.7, -5.2),
                   ("sinks", 0.5, True, 6.0, -3.5)],
    "keep_ratio": [("none", 0.5, True, 0, 0)]
    + [("keep_low", r, True, d, -2.5) for r, d in ((0.3, 6.0), (0.4, 5.0), (0.5, 4.7), (0.6, 5.3))]
    + [("random", r, True, d, -4.5) for r, d in ((0.3, 8.0), (0.4, 9.0), (0.5, 10.3), (0.6, 10.8))],
    "ablations": [("none", 0.5, True, 0, 0), ("keep_low", 0.5, True, 4.7, -3.0), ("keep_low", 0.5, False, 4.7, -3.0),
                  ("keep_low", 0.0, True, 6.5, -4.5)],
}


@dataclass
class FakeRun:
    experiment: str
    params: dict
    tags: dict
    metrics: dict
    tokens: pd.DataFrame
    start_time: int
    status: str = "FINISHED"


def _tokens(d_ppl: float, d_acc: float, key: str) -> pd.DataFrame:
    """Per-token NLL/correct of one run; the same key gives identical numbers (like an
    ablation that changes nothing)."""
    base = np.random.default_rng(0).gamma(2.0, 1.6, (N_TEXTS, N_TOKENS))
    correct = base < 1.9
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    if d_ppl:
        shift = math.log1p(d_ppl / 100) + rng.normal(0, 0.01, (N_TEXTS, 1))
        base = base + shift + rng.normal(0, 0.3, base.shape)
        correct = correct & (rng.random(base.shape) > -d_acc / 100)
    text_id = np.repeat(np.arange(N_TEXTS), N_TOKENS)
    return pd.DataFrame({"text_id": text_id, "title": [f"Book {i}" for i in text_id],
                         "position": np.tile(np.arange(1, N_TOKENS + 1), N_TEXTS),
                         "nll": base.ravel(), "correct": correct.ravel()})


def _eval(tokens: pd.DataFrame) -> list[EvalResult]:
    return [EvalResult(torch.tensor(t.nll.to_numpy()), torch.tensor(t.correct.to_numpy()), 512, 400, 1e6, 8e5, "streaming")
            for _, t in tokens.groupby("text_id")]


def fake_runs() -> list[FakeRun]:
    runs, t = [], 1_700_000_000_000
    for experiment, configs in CONFIGS.items():
        base_tokens = _tokens(0, 0, "none")
        for strategy, ratio, ordered, d_ppl, d_acc in configs:
            tokens = _tokens(d_ppl, d_acc, f"{strategy}{ratio}{d_ppl}")
            baseline = strategy == "none"
            metrics = summarize(_eval(tokens), None if baseline else _eval(base_tokens))
            metrics |= {"kv_tokens_peak": 400 if baseline else 218, "kv_bytes_peak": 9.4e6 if baseline else 2.1e6,
                        "kv_tokens_mean": 200, "kv_bytes_mean": 1e6, "tokens_per_s": 900.0, "wall_s": 3.0,
                        "memory_saving_pct": 0.0 if baseline else 77.6}
            params = {"compress.strategy": strategy, "compress.keep_ratio": str(ratio), "compress.fix_kv_size": "512",
                      "compress.sort_by_time": str(ordered), "compress.n_sink": "4" if strategy == "sinks" else "0",
                      "compress.skip_layers": "[0, 1]", "model.name": "HuggingFaceTB/SmolLM2-135M",
                      "model.source": "hf", "dataset.source": "pg19", "eval.engine": "auto",
                      "eval.max_tokens": "3000", "eval.n_samples": str(N_TEXTS), "eval.seed": "0"}
            tags = {"knormpress.role": "baseline" if baseline else "compressed", "knormpress.strategy": strategy,
                    "knormpress.baseline_key": "base-key",
                    "knormpress.engine": "streaming", "knormpress.config_hash": f"{strategy}-{ratio}-{ordered}",
                    "knormpress.experiment_preset": experiment, "git.commit": "0123456789abcdef", "git.dirty": "false"}
            runs.append(FakeRun(experiment, params, tags, metrics, tokens, t))
            t += 60_000
    return runs


def _run_id(i: int, run: FakeRun) -> str:
    return "base" if run.tags["knormpress.role"] == "baseline" else f"run{i}"


def fake_results() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy tables an export of fake_runs() gives, built without MLflow: every experiment
    lists the one shared baseline run."""
    runs = fake_runs()
    rows = [results._row(_run_id(i, r), r.experiment, runs[0].start_time if _run_id(i, r) == "base" else r.start_time,
                         r.params, r.tags, r.metrics) for i, r in enumerate(runs)]
    texts = pd.concat([results.per_text(_run_id(i, r), r.tokens) for i, r in enumerate(runs)], ignore_index=True)
    return results._tidy(pd.DataFrame(rows)), texts.drop_duplicates(["run_id", "text_id"])


def build_store(root: Path) -> str:
    """A sqlite MLflow store holding fake_runs() as the runner logs them (the shared baseline
    only once, in the first experiment), plus runs an export must ignore: a sweep parent, a
    FAILED run and an older duplicate of keep_low 0.5 (same config_hash)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = fake_runs()
    keep_low = next(r for r in runs if r.experiment == "strategies" and r.params["compress.strategy"] == "keep_low")
    stale = FakeRun("strategies", keep_low.params, keep_low.tags, keep_low.metrics | {"ppl": 999.0}, keep_low.tokens, 1)
    failed = FakeRun("strategies", keep_low.params, keep_low.tags | {"knormpress.config_hash": "other"},
                     keep_low.metrics | {"ppl": 555.0}, keep_low.tokens, 2, status="FAILED")
    parent = FakeRun("strategies", {}, {"knormpress.sweep": "s1"}, {"ppl": 1.0}, keep_low.tokens, 3)
    experiments, logged_baseline = {}, False
    for run in [stale, failed, parent, *runs]:
        if run.tags.get("knormpress.role") == "baseline":
            if logged_baseline:
                continue
            logged_baseline = True
        if run.experiment not in experiments:
            experiments[run.experiment] = client.create_experiment(
                run.experiment, artifact_location=(root / "artifacts" / run.experiment).as_uri())
        created = client.create_run(experiments[run.experiment], start_time=run.start_time)
        run_id = created.info.run_id
        client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in run.metrics.items()],
                         params=[Param(k, v) for k, v in run.params.items()],
                         tags=[RunTag(k, v) for k, v in run.tags.items()])
        if "knormpress.role" in run.tags:
            path = root / "per_token.parquet"
            run.tokens.to_parquet(path)
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id, status=run.status)
    return uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("mlflow"))


def test_export_keeps_newest_finished_child_runs(store, tmp_path):
    paths = results.export("strategies", tmp_path, store)
    runs, texts = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    assert len(runs) == 6 and runs.role.tolist().count("baseline") == 1
    assert sorted(runs.strategy) == sorted(c[0] for c in CONFIGS["strategies"])
    keep_low = runs[runs.strategy == "keep_low"].iloc[0]
    assert keep_low.ppl < 100  # the newer run, not the stale duplicate (999) or the FAILED one (555)
    assert keep_low.fix_kv_size == 512 and keep_low.keep_ratio == 0.5 and bool(keep_low.sort_by_time)
    assert keep_low.model == "HuggingFaceTB/SmolLM2-135M" and keep_low.git_commit == "0123456789abcdef"
    assert keep_low.engine == "streaming"  # the engine that ran (tag), not the "auto" param
    assert set(texts.run_id) == set(runs.run_id) and len(texts) == 6 * N_TEXTS
    assert (texts.n_tokens == N_TOKENS).all()


def test_export_matches_fake_tables(store, tmp_path):
    for name in CONFIGS:
        results.export(name, tmp_path, store)
    runs, texts = results.read_results(tmp_path)
    want, _ = fake_results()
    cols = ["experiment", "role", "strategy", "keep_ratio", "sort_by_time", "ppl", "delta_accuracy_pct_hi"]
    pd.testing.assert_frame_equal(runs[cols], want[cols])
    baselines = runs[runs.role == "baseline"]  # logged once, in strategies; exported with every experiment
    assert sorted(baselines.experiment) == sorted(CONFIGS) and baselines.run_id.nunique() == 1
    assert results.claims(runs, texts).verdict.tolist() == results.claims(*fake_results()).verdict.tolist()


def test_missing_experiment_names_existing_ones(store, tmp_path):
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'.*ablations, keep_ratio, strategies"):
        results.export("nope", tmp_path, store)


def test_experiment_without_finished_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("broken"), tags={"knormpress.role": "compressed"})
    client.set_terminated(run.info.run_id, status="FAILED")
    with pytest.raises(ConfigError, match="no finished runs in experiment 'broken'"):
        results.load_runs("broken", store)


def _verdicts(runs: pd.DataFrame, texts: pd.DataFrame) -> dict[str, str]:
    table = results.claims(runs, texts)
    return dict(zip(table.claim, table.verdict))


def test_verdicts_on_seed_like_data():
    v = _verdicts(*fake_results())
    assert v["keep_low has lower PPL than random and recent_only at keep_ratio 0.5"] == results.HOLDS
    assert v["keep_low has lower PPL than random at every keep_ratio"] == results.HOLDS
    assert v["temporal order lowers PPL by 2-5%"] == results.FAILS  # identical runs
    assert v["mixed retention lowers PPL by 3-5%"] == results.FAILS  # true effect -1.7 %: CI short of -3 %
    assert v["memory saving 83% (3000 -> 512 tokens)"] == results.FAILS  # 77.6 % measured


def _swap(runs: pd.DataFrame, texts: pd.DataFrame, a: pd.Series, b: pd.Series):
    """Exchange the numbers of two runs (run-level metrics and per-text sums)."""
    runs, texts = runs.copy(), texts.copy()
    ia, ib = runs.index[runs.run_id == a.run_id][0], runs.index[runs.run_id == b.run_id][0]
    cols = results.METRICS
    runs.loc[[ia, ib], cols] = runs.loc[[ib, ia], cols].to_numpy()
    texts["run_id"] = texts.run_id.replace({a.run_id: b.run_id, b.run_id: a.run_id})
    return runs, texts


def test_flipping_keep_low_and_random_flips_the_verdict():
    runs, texts = fake_results()
    strategies = runs[runs.experiment == "strategies"]
    claim = "keep_low has lower PPL than random and recent_only at keep_ratio 0.5"
    assert _verdicts(runs, texts)[claim] == results.HOLDS
    flipped = _swap(runs, texts, results.pick(strategies, "keep_low", 0.5), results.pick(strategies, "random", 0.5))
    assert _verdicts(*flipped)[claim] == results.FAILS


def test_temporal_order_verdict_follows_the_data():
    runs, texts = fake_results()
    claim = "temporal order lowers PPL by 2-5%"
    effect = results.improvement(runs, texts, "temporal order", "ppl")
    assert effect.identical and effect.est == 0 and _verdicts(runs, texts)[claim] == results.FAILS
    # make the unsorted run 4 % worse on every text: sorting now lowers PPL by ~4 % -> holds
    ablations = runs[runs.experiment == "ablations"]
    unsorted = results.pick(ablations, "keep_low", 0.5, sort_by_time=False).run_id
    mask = texts.run_id == unsorted
    texts.loc[mask, "nll_sum"] += math.log(1.04) * texts.loc[mask, "n_tokens"]
    runs.loc[runs.run_id == unsorted, "ppl"] *= 1.04
    assert _verdicts(runs, texts)[claim] == results.HOLDS


@pytest.mark.parametrize(("lo", "hi", "claimed", "want"), [
    (-4.0, -1.0, (-5.0, -2.0), results.HOLDS),
    (-9.0, -7.0, (-5.0, -2.0), results.HOLDS),  # larger than claimed still holds
    (-1.5, -0.5, (-5.0, -2.0), results.FAILS),  # clearly smaller than claimed
    (-3.0, 1.0, (-5.0, -2.0), results.INCONCLUSIVE),
    (0.5, 2.0, results.LOWER, results.FAILS),
    (0.0, 0.0, results.HIGHER, results.FAILS),  # e.g. the same accuracy on every resample
    (-0.5, 2.0, results.HIGHER, results.INCONCLUSIVE),
    (1.2, 3.0, (1.0, 2.0), results.HOLDS),
])
def test_verdict_rules(lo, hi, claimed, want):
    assert results.verdict(results.Effect((lo + hi) / 2, lo, hi), claimed) == want


def test_verdict_without_runs_or_intervals():
    assert results.verdict(None, results.LOWER) == results.UNMEASURABLE
    assert results.verdict(results.Effect(-3.0), results.LOWER) == results.INCONCLUSIVE
    runs, texts = fake_results()
    v = _verdicts(runs[runs.experiment != "ablations"], texts.iloc[:0])
    assert v["temporal order lowers PPL by 2-5%"] == results.UNMEASURABLE
    assert v["keep_low has lower PPL than random at every keep_ratio"] == results.INCONCLUSIVE


def test_summary_states_setup_rules_and_seed_numbers():
    text = results.summary_markdown(*fake_results())
    assert "HuggingFaceTB/SmolLM2-135M on pg19, 6 texts, 2,400 predicted tokens per run" in text
    assert "**does not hold**" in text and "| keep_low | " in text and "| 49.24 |" in text
    for verdict in ("holds", "does not hold", "inconclusive"):
        assert f"| {verdict} |" in text


def test_dvc_pipeline_wires_exports_into_plots():
    dvc = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    run_outs = set()
    for name in CONFIGS:
        assert f"experiment={name}" in dvc[name]["cmd"] and f"--experiment {name}" in dvc[name]["cmd"]
        run_outs |= {next(iter(o)) if isinstance(o, dict) else o for o in dvc[name]["outs"]}
    assert run_outs <= set(dvc["plots"]["deps"])
    outs = {next(iter(o)) for o in dvc["plots"]["outs"]}
    assert {f"results/{f}.png" for f in ("strategy_comparison", "keep_ratio_analysis", "ppl_accuracy_tradeoff",
                                          "improvement_summary")} | {"results/summary.md"} == outs
