"""Tidy run tables: from hand-written rows, from an MLflow store logged as design.md says, and from
the CSVs the pre-report code exported."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from report_data import BASE_ACCURACY, BASE_PPL, DESIGN_TAGS, N_TOKENS, V1, build_store

from knormpress.errors import ConfigError
from knormpress.report import runs as report_runs
from knormpress.report.runs import HEAD, IDENTITY, export, load_all, load_runs, load_texts, read_results, tidy
from knormpress.report.timings import read_timings


def test_tidy_types_orders_and_keeps_unknown_metrics():
    rows = pd.DataFrame([  # as MLflow gives them: params and tags are strings
        {"run_id": "c", "experiment": "e", "role": "compressed", "strategy": "keep_low", "keep_ratio": "0.5",
         "sort_by_time": "False", "n_texts": "3.0", "f1": "0.25", "bleu": 7, "start_time": 3},
        {"run_id": "b", "experiment": "e", "role": "compressed", "strategy": "keep_low", "keep_ratio": "0.5",
         "sort_by_time": "True", "ppl": 40.5, "start_time": 2},
        {"run_id": "a", "experiment": "e", "role": "baseline", "strategy": "none", "keep_ratio": "0.7", "start_time": 1},
        {"run_id": "d", "experiment": "d", "role": "compressed", "strategy": "zz", "keep_ratio": "0.1", "start_time": 4},
    ])
    df = tidy(rows)
    assert df.run_id.tolist() == ["d", "a", "b", "c"]  # by experiment; baseline first; sorted before unsorted
    cols = df.columns.tolist()
    assert cols[:14] == ["run_id", "experiment", "role", "task", "strategy", "keep_ratio", "fix_kv_size",
                         "sort_by_time", "n_sink", "skip_layers", "positions", "interval", "ratio", "when"]
    assert cols[:len(HEAD)] == HEAD  # later settings follow `when`, in Compression's field order
    assert cols[len(HEAD):len(HEAD) + 3] == ["ppl", "ppl_lo", "ppl_hi"] and cols[-13] == "model" and cols[-1] == "start_time"
    assert cols[cols.index("memory_saving_last_pct") + 1:cols.index("model")] == ["bleu", "f1"]  # other metrics: sorted, after known
    c = df.set_index("run_id").loc["c"]
    assert c.keep_ratio == 0.5 and c.sort_by_time is not pd.NA and not c.sort_by_time
    assert c.n_texts == 3 and str(df.n_texts.dtype) == "Int64" and c.f1 == 0.25 and c.bleu == 7.0
    assert math.isnan(c.ppl) and pd.isna(c.task)
    # runs from before positions and interval existed computed true positions, pruning every token
    assert (c.positions, c.interval) == ("true", 1) and df.set_index("run_id").loc["a", ["positions", "interval"]].isna().all()


def test_results_v1_csvs_read_with_their_columns_and_values():
    runs, texts = read_results(V1)
    for name in ("strategies", "keep_ratio", "ablations"):
        raw = pd.read_csv(V1 / f"{name}.csv")
        assert [c for c in runs.columns if c in raw.columns] == raw.columns.tolist()  # same names, same order
        ours = runs[runs.experiment == name].set_index("run_id").loc[raw.run_id]
        for col in ("ppl", "delta_accuracy_pct_hi", "memory_saving_pct", "keep_ratio"):
            np.testing.assert_array_equal(ours[col].to_numpy(float), raw[col].to_numpy(float))
        assert ours.strategy.tolist() == raw.strategy.tolist() and ours.task.isna().all()
    assert len(runs) == 6 + 9 + 5
    assert texts.columns.tolist() == ["run_id", "text_id", "title", "n_tokens", "nll_sum", "n_correct"]
    assert len(texts) == 3 * 20 and not texts.duplicated(["run_id", "text_id"]).any()


def test_no_results_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no exported runs"):
        read_results(tmp_path)


# ---- MLflow ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build_store(tmp_path_factory.mktemp("mlflow"))


def test_tracking_tags_follow_design():
    """The runner's tag names are the ones design.md gives (and this store is logged with)."""
    from knormpress import tracking

    assert {f: tracking.TAGS[f] for f in report_runs.TAGGED} == {f: DESIGN_TAGS[f] for f in report_runs.TAGGED}


def test_export_keeps_newest_finished_runs_with_their_per_text_rows(store, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    downloaded = []
    original = MlflowClient.download_artifacts
    monkeypatch.setattr(MlflowClient, "download_artifacts",
                        lambda self, run_id, path, dst=None: downloaded.append(path) or original(self, run_id, path, dst))
    paths = export("strategies", tmp_path, store)
    assert paths == [tmp_path / "strategies.csv", tmp_path / "per_text" / "strategies.csv", tmp_path / "timings" / "strategies.json"]
    runs, texts = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    assert read_timings(tmp_path)[0]["runs"] >= 1
    assert sorted(runs.strategy) == ["keep_low", "none", "random", "recent_only"]  # no stale, FAILED or parent run
    low = runs.set_index("strategy").loc["keep_low"]
    assert low.ppl == pytest.approx(1.05 * BASE_PPL) and low.ppl_hi == pytest.approx(1.155 * BASE_PPL)
    assert (low.task, low.role, low.engine, low.model, low.dataset) == ("lm", "compressed", "masked", "tiny", "books")
    assert low.keep_ratio == 0.5 and low.fix_kv_size == 512 and low.sort_by_time and low.max_tokens == 1000
    assert low.git_commit == "0123456789abcdef" and low.config_hash == "h-keep_low" and low.memory_saving_pct == 77.5
    assert set(downloaded) == {"per_text.csv"}  # never the per-item records
    assert texts.columns.tolist() == ["run_id", "text_id", "title", "n_tokens", "nll_sum", "n_correct"]
    assert set(texts.run_id) == set(runs.run_id) and len(texts) == 4 * 4
    rows = texts[texts.run_id == low.run_id].sort_values("text_id")
    np.testing.assert_allclose(rows.nll_sum, N_TOKENS * (np.array([3.0, 3.5, 4.0, 3.2]) + math.log(1.05)))


def test_export_adds_the_shared_baseline_from_another_experiment(store, tmp_path):
    export("strategies", tmp_path, store)
    export("ablations", tmp_path, store)
    runs, texts = read_results(tmp_path)
    ablations = runs[runs.experiment == "ablations"]
    assert ablations.role.tolist() == ["baseline", "compressed", "compressed", "compressed"]
    assert ablations.run_id.iloc[0] == runs[(runs.experiment == "strategies") & (runs.role == "baseline")].run_id.iloc[0]
    assert ablations.accuracy.iloc[0] == pytest.approx(BASE_ACCURACY)
    assert [(r.keep_ratio, r.sort_by_time) for r in ablations.iloc[1:].itertuples()] == [(0.0, True), (0.5, True),
                                                                                         (0.5, False)]
    assert texts.run_id.nunique() == 4 + 3


def test_any_task_metrics_become_columns(store, tmp_path):
    export("qa", tmp_path, store)
    runs, texts = read_results(tmp_path)
    assert runs.strategy.tolist() == ["none", "snapkv"] and set(runs.task) == {"qa"}
    known = [*report_runs.task_class("lm").columns, *report_runs.RUNNER_METRICS]
    extra = [c for c in runs.columns if c not in IDENTITY and c not in known]
    assert extra == ["exact_match", "exact_match_hi", "exact_match_lo", "f1"]
    assert runs.exact_match.tolist() == [0.7, 0.5] and runs.f1.tolist() == [0.35, 0.25] and runs.ppl.isna().all()
    assert texts.columns.tolist() == ["run_id", "text_id", "exact_match", "f1"] and len(texts) == 4


def test_load_all_and_load_texts(store):
    runs = load_all(store)
    assert sorted(runs.experiment.unique()) == ["ablations", "qa", "strategies"]
    assert len(runs) == (4 + 4 + 2) and runs.exact_match.notna().sum() == 2
    texts = load_texts(runs, store)
    assert texts.run_id.nunique() == 4 + 3 + 2


def test_missing_experiment_names_existing_ones(store, tmp_path):
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'.*ablations, qa, strategies"):
        export("nope", tmp_path, store)


def test_experiment_without_finished_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("broken"), tags={DESIGN_TAGS["role"]: "compressed"})
    client.set_terminated(run.info.run_id, status="FAILED")
    with pytest.raises(ConfigError, match="no finished runs in experiment 'broken'"):
        load_runs("broken", store)


def test_search_reads_every_page():
    class Page(list):
        def __init__(self, items, token):
            super().__init__(items)
            self.token = token

    pages = {None: Page([1, 2], "a"), "a": Page([3], "b"), "b": Page([4, 5], None)}
    calls = []

    def search(query, page_token=None, max_results=None):
        calls.append((query, page_token, max_results))
        return pages[page_token]

    assert report_runs._paged(search, "q", max_results=2) == [1, 2, 3, 4, 5]
    assert calls == [("q", None, 2), ("q", "a", 2), ("q", "b", 2)]


def test_rows_from_new_and_old_param_names():
    from types import SimpleNamespace

    def fake_run(params: dict, tags: dict) -> SimpleNamespace:
        return SimpleNamespace(info=SimpleNamespace(run_id="r", start_time=5),
                               data=SimpleNamespace(params=params, tags=tags, metrics={"ppl": 3.0, "f1": 0.5}))

    new = report_runs._row(fake_run({"compress.strategy.name": "random", "compress.strategy.seed": "3",
                                     "model.source.kind": "pypi", "task.name": "lm"},
                                    {"knormpress.strategy": "tagged", "knormpress.role": "compressed"}), "e", DESIGN_TAGS)
    assert (new["strategy"], new["model_source"], new["task"], new["role"]) == ("random", "pypi", "lm", "compressed")
    assert (new["ppl"], new["f1"], new["experiment"], new["start_time"]) == (3.0, 0.5, "e", 5)
    old = report_runs._row(fake_run({"compress.strategy": "keep_low", "model.source": "pypi_gguf"},
                                    {"knormpress.strategy": "keep_low", "knormpress.task": "lm"}), "e", DESIGN_TAGS)
    assert (old["strategy"], old["model_source"], old["task"], old["role"]) == ("keep_low", "pypi_gguf", "lm", None)


def test_strategy_variants_keep_rows_of_their_own():
    """The strategy column is the label (`Strategy.label`, from the logged node): variants of one
    strategy never merge; seeds and default settings leave the name alone, as older exports hold it."""
    from types import SimpleNamespace

    def strategy(**node) -> str:
        params = {f"compress.strategy.{k}": str(v) for k, v in node.items()}
        run = SimpleNamespace(info=SimpleNamespace(run_id="r", start_time=1),
                              data=SimpleNamespace(params=params, tags={}, metrics={}))
        return report_runs._row(run, "e", DESIGN_TAGS)["strategy"]

    assert strategy(name="h2o", normalise="mean") == "h2o[normalise=mean]"
    assert strategy(name="h2o", normalise="sum") == strategy(name="h2o") == "h2o"
    assert strategy(name="keydiff", anchor="raw") == "keydiff[anchor=raw]" and strategy(name="random", seed=3) == "random"
    assert strategy(name="near_norm", target=2.0) == "near_norm"  # a plug-in this process never imported: its name
    assert strategy(name="oracle") == "oracle (not deployable)"  # Strategy.deployable False: the report says so
    from knormpress.report.headline import headline

    rows = [{"run_id": r, "experiment": "e", "role": "compressed", "strategy": s, "keep_ratio": 0.5, "fix_kv_size": 512,
             "skip_layers": "[0, 1]", "sort_by_time": True, "task": "lm", "model": "m", "ppl": p, "start_time": p}
            for r, s, p in (("a", "h2o", 1.0), ("b", "h2o[normalise=mean]", 2.0))]
    assert {k: v["ppl"] for k, v in headline(tidy(pd.DataFrame(rows)))["m"]["lm"].items()} == {
        "h2o": 1.0, "h2o[normalise=mean]": 2.0}
