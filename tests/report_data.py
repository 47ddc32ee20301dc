"""Hand-made runs for the report tests: tidy tables with known effects, and a small MLflow store
logged directly with MlflowClient as design.md says a run is logged (no runner involved)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from knormpress.report.runs import tidy

V1 = Path(__file__).parent / "data" / "results_v1"  # CSVs and summary.md written by the pre-report code
DESIGN_TAGS = {  # design.md: tag names, field -> tag
    **{f: f"knormpress.{f}" for f in ("role", "strategy", "task", "engine", "config_hash", "baseline_key", "sweep",
                                      "experiment_preset", "samples_hash", "model", "device", "pid", "host")},
    "git_commit": "git.commit", "git_dirty": "git.dirty", "parent": "mlflow.parentRunId",
}

# Four texts; the baseline's mean NLL per token and share of correct tokens on each.
N_TOKENS = np.array([100, 200, 300, 400])
BASE_NLL = np.array([3.0, 3.5, 4.0, 3.2])
BASE_ACC = np.array([0.40, 0.30, 0.25, 0.35])
BASE_PPL = math.exp((N_TOKENS * BASE_NLL).sum() / N_TOKENS.sum())
BASE_ACCURACY = (N_TOKENS * BASE_ACC).sum() / N_TOKENS.sum()


def per_text(run_id: str, ppl_factor: float | np.ndarray = 1.0, acc_factor: float | np.ndarray = 1.0) -> pd.DataFrame:
    """Per-text sums of a run whose PPL (accuracy) is `ppl_factor` (`acc_factor`) times the
    baseline's on every text: then any resample of texts gives exactly that ratio."""
    return pd.DataFrame({
        "run_id": run_id, "text_id": [f"t{i}" for i in range(len(N_TOKENS))], "title": "A Book",
        "n_tokens": N_TOKENS, "nll_sum": N_TOKENS * (BASE_NLL + np.log(ppl_factor)),
        "n_correct": N_TOKENS * BASE_ACC * acc_factor,
    })


def run(run_id: str, experiment: str, strategy: str | None, keep_ratio: float = 0.5, ppl: float = 1.0,
        acc: float = 1.0, sort_by_time: bool = True, start_time: int = 0, **metrics) -> dict:
    """A tidy row: strategy None is the baseline; ppl/acc are factors of the baseline's."""
    return {"run_id": run_id, "experiment": experiment, "role": "compressed" if strategy else "baseline",
            "strategy": strategy or "none", "keep_ratio": keep_ratio, "sort_by_time": sort_by_time,
            "ppl": ppl * BASE_PPL, "accuracy": acc * BASE_ACCURACY, "start_time": start_time,
            "model": "tiny", "dataset": "books", "n_texts": 4, "n_tokens": int(N_TOKENS.sum()), **metrics}


def tables(specs: list[tuple]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs and per-text tables from (run_id, experiment, strategy, keep_ratio, ppl factor,
    accuracy factor[, extra run fields]) tuples; per-text rows follow the factors exactly."""
    rows, texts = [], []
    for run_id, experiment, strategy, ratio, f_ppl, f_acc, *extra in specs:
        rows.append(run(run_id, experiment, strategy, ratio, f_ppl, f_acc, **(extra[0] if extra else {})))
        texts.append(per_text(run_id, f_ppl, f_acc))
    return tidy(pd.DataFrame(rows)), pd.concat(texts, ignore_index=True)


def seed_like() -> list[tuple]:
    """Runs for every claim in claims.yaml, with effects chosen so the verdicts are known by hand."""
    mem = {"memory_saving_pct": 83.4}
    return [
        ("s-base", "strategies", None, 0.5, 1.0, 1.0),
        ("s-low", "strategies", "keep_low", 0.5, 1.05, 0.97, mem),
        ("s-rand", "strategies", "random", 0.5, 1.10, 0.95, mem),
        ("s-recent", "strategies", "recent_only", 0.5, 1.13, 0.948, mem),
        ("k-base", "keep_ratio", None, 0.5, 1.0, 1.0),
        *[(f"k-low{r}", "keep_ratio", "keep_low", r, f, 0.97) for r, f in ((0.3, 1.06), (0.4, 1.05), (0.5, 1.04),
                                                                          (0.6, 1.07))],
        *[(f"k-rand{r}", "keep_ratio", "random", r, f, 0.95) for r, f in ((0.3, 1.08), (0.4, 1.09), (0.5, 1.10),
                                                                         (0.6, 1.11))],
        ("a-base", "ablations", None, 0.5, 1.0, 1.0),
        ("a-sorted", "ablations", "keep_low", 0.5, 1.04, 0.98),
        ("a-unsorted", "ablations", "keep_low", 0.5, 1.04, 0.98, {"sort_by_time": False}),
        ("a-pure", "ablations", "keep_low", 0.0, 1.08, 0.965),
        ("m-base", "memory", None, 0.5, 1.0, 1.0, {"max_tokens": 3000}),  # the seed's memory measure
        ("m-all", "memory", "keep_low", 0.5, 1.01, 1.0, {"max_tokens": 3000, "skip_layers": "[]",
                                                         "memory_saving_last_pct": 82.9}),
        ("m-skip", "memory", "keep_low", 0.5, 1.0, 1.0, {"max_tokens": 3000, "skip_layers": "[0, 1]",
                                                         "memory_saving_last_pct": 77.4}),
    ]


def rerotated_ablations() -> list[tuple]:
    """The ablation runs under positions=rerotate, where time order helps: sorted 1.04 vs unsorted
    1.08 (PPL -3.70%), accuracy 0.98 vs 0.975 (+0.51%)."""
    rerotate = {"positions": "rerotate"}
    return [
        ("r-sorted", "ablations", "keep_low", 0.5, 1.04, 0.98, rerotate),
        ("r-unsorted", "ablations", "keep_low", 0.5, 1.08, 0.975, rerotate | {"sort_by_time": False}),
        ("r-pure", "ablations", "keep_low", 0.0, 1.05, 0.98, rerotate),
    ]


def interval_sweep() -> list[tuple]:
    """keep_low pruned every 1, 16 and 64 tokens: PPL falls a little as the cache holds more."""
    return [("i-base", "interval", None, 0.5, 1.0, 1.0)] + [
        (f"i-{n}", "interval", "keep_low", 0.5, f, 0.98, {"interval": n, "kv_tokens_peak": 512.0 + n - 1,
                                                          "kv_tokens_mean": 500.0 + n / 2, "kv_bytes_peak": 1000.0 * n})
        for n, f in ((1, 1.05), (16, 1.04), (64, 1.02))]


SMOL, GEMMA = "SmolLM2-135M-Instruct", "Gemma-3-270M"  # Gemma sorts first by name, but ran fewer experiments


def two_models() -> list[tuple]:
    """seed_like() as SmolLM2's runs, plus Gemma's `strategies` runs: other numbers (baseline 0.8 x
    the PPL, 1.1 x the accuracy of SmolLM2's), the same strategies and text ids, logged later, so
    a run picked across models would be Gemma's. The strategies runs carry their deltas (%)."""
    deltas = {"s-low": (5.0, -3.0), "s-rand": (10.0, -5.0), "s-recent": (13.0, -5.2)}
    smol = [(*spec[:6], (spec[6] if len(spec) > 6 else {}) | {"model": SMOL} | (
        {"delta_ppl_pct": deltas[spec[0]][0], "delta_accuracy_pct": deltas[spec[0]][1]} if spec[0] in deltas else {}))
        for spec in seed_like()]
    gemma = {"model": GEMMA, "start_time": 5, "memory_saving_pct": 70.0}

    def delta(ppl: float, acc: float) -> dict:
        return gemma | {"delta_ppl_pct": ppl, "delta_accuracy_pct": acc}

    return smol + [  # factors of the shared BASE_*: keep_low 1.20 / 0.90 x Gemma's baseline, random 1.08 / 0.96,
        # recent_only 1.10 / 0.95
        ("g-base", "strategies", None, 0.5, 0.8, 1.1, gemma),
        ("g-low", "strategies", "keep_low", 0.5, 0.96, 0.99, delta(20.0, -10.0)),
        ("g-rand", "strategies", "random", 0.5, 0.864, 1.056, delta(8.0, -4.0)),
        ("g-recent", "strategies", "recent_only", 0.5, 0.88, 1.045, delta(10.0, -5.0)),
        ("g-mem-base", "memory", None, 0.5, 0.8, 1.1, gemma | {"max_tokens": 3000}),  # sliding layers hold 512 anyway
        ("g-mem-all", "memory", "keep_low", 0.5, 0.8, 1.1, gemma | {"max_tokens": 3000, "skip_layers": "[]",
                                                                    "memory_saving_last_pct": 44.7}),
        ("g-mem-skip", "memory", "keep_low", 0.5, 0.8, 1.1, gemma | {"max_tokens": 3000, "skip_layers": "[0, 1]",
                                                                     "memory_saving_last_pct": 40.0}),
    ]


# ---- an MLflow store ------------------------------------------------------------------------------

def _log(client, experiment_id: str, root: Path, *, params: dict, tags: dict, metrics: dict, start_time: int,
         texts: pd.DataFrame | None = None, status: str = "FINISHED") -> str:
    from mlflow.entities import Metric, Param, RunTag

    run_id = client.create_run(experiment_id, start_time=start_time).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if texts is not None:
        folder = root / run_id
        folder.mkdir()
        texts.to_csv(folder / "per_text.csv", index=False)
        (folder / "records.parquet").write_bytes(b"not a parquet file: the export must not read records")
        for name in ("per_text.csv", "records.parquet"):
            client.log_artifact(run_id, str(folder / name))
    client.set_terminated(run_id, status=status)
    return run_id


def lm_params(strategy: str, keep_ratio: float, sort_by_time: bool = True) -> dict:
    return {"task.name": "lm", "compress.strategy.name": strategy, "compress.keep_ratio": keep_ratio,
            "compress.fix_kv_size": 512, "compress.sort_by_time": sort_by_time, "compress.n_sink": 0,
            "compress.skip_layers": "[0, 1]", "model.name": "tiny", "dataset.source": "books",
            "eval.max_tokens": 1000, "eval.n_samples": 4, "eval.seed": 0, "eval.engine": "auto"}


def lm_tags(role: str, strategy: str, config_hash: str, baseline_key: str = "bk") -> dict:
    t = DESIGN_TAGS
    return {t["role"]: role, t["strategy"]: strategy, t["task"]: "lm", t["engine"]: "masked",
            t["config_hash"]: config_hash, t["baseline_key"]: baseline_key, t["git_commit"]: "0123456789abcdef",
            t["git_dirty"]: "false"}


def lm_metrics(f_ppl: float, f_acc: float, baseline: bool = False) -> dict:
    out = {"ppl": f_ppl * BASE_PPL, "ppl_lo": 0.9 * f_ppl * BASE_PPL, "ppl_hi": 1.1 * f_ppl * BASE_PPL,
           "accuracy": f_acc * BASE_ACCURACY, "n_texts": 4, "n_tokens": int(N_TOKENS.sum()),
           "kv_bytes_peak": 1e6, "memory_saving_pct": 0.0 if baseline else 77.5, "wall_s": 2.0}
    if not baseline:
        out |= {"delta_ppl_pct": 100 * (f_ppl - 1), "delta_accuracy_pct": 100 * (f_acc - 1)}
    return out


def build_store(root: Path) -> str:
    """A sqlite store: `strategies` (the one shared lm baseline, three strategies, plus a stale
    duplicate, a FAILED run and a sweep parent an export must skip), `ablations` (no baseline of
    its own), and `qa`: another task (metrics exact_match(_lo/_hi), f1) with an unknown strategy."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    files = root / "files"
    files.mkdir()
    ids = {name: client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
           for name in ("strategies", "ablations", "qa")}
    t = 1_700_000_000_000
    log = dict(client=client, root=files)
    _log(**log, experiment_id=ids["strategies"], params=lm_params("keep_low", 0.5), metrics=lm_metrics(9.0, 0.1),
         tags=lm_tags("compressed", "keep_low", "h-keep_low"), start_time=t - 10, texts=per_text("stale", 9.0, 0.1))
    _log(**log, experiment_id=ids["strategies"], params=lm_params("keep_low", 0.5), metrics=lm_metrics(8.0, 0.2),
         tags=lm_tags("compressed", "keep_low", "h-other"), start_time=t + 99, status="FAILED")
    _log(**log, experiment_id=ids["strategies"], params={}, metrics={}, start_time=t - 20,
         tags={DESIGN_TAGS["sweep"]: "sweep-1", DESIGN_TAGS["experiment_preset"]: "strategies"})
    for i, (strategy, f_ppl, f_acc) in enumerate((("none", 1.0, 1.0), ("keep_low", 1.05, 0.97), ("random", 1.10, 0.95),
                                                  ("recent_only", 1.13, 0.948))):
        role = "baseline" if strategy == "none" else "compressed"
        _log(**log, experiment_id=ids["strategies"], params=lm_params(strategy, 0.5),
             metrics=lm_metrics(f_ppl, f_acc, role == "baseline"), tags=lm_tags(role, strategy, f"h-{strategy}"),
             start_time=t + i, texts=per_text("", f_ppl, f_acc).drop(columns="run_id"))
    for i, (ratio, ordered, f_ppl, f_acc) in enumerate(((0.5, True, 1.04, 0.98), (0.5, False, 1.04, 0.98),
                                                        (0.0, True, 1.08, 0.965))):
        _log(**log, experiment_id=ids["ablations"], params=lm_params("keep_low", ratio, ordered),
             metrics=lm_metrics(f_ppl, f_acc), tags=lm_tags("compressed", "keep_low", f"a-{ratio}-{ordered}"),
             start_time=t + 10 + i, texts=per_text("", f_ppl, f_acc).drop(columns="run_id"))
    qa_texts = pd.DataFrame({"text_id": ["q1", "q2"], "exact_match": [1.0, 0.0], "f1": [1.0, 0.5]})
    for i, (strategy, em) in enumerate((("none", 0.7), ("snapkv", 0.5))):
        role = "baseline" if strategy == "none" else "compressed"
        params = {"task.name": "qa", "compress.strategy.name": strategy, "compress.keep_ratio": 0.5,
                  "model.name": "tiny", "dataset.source": "quiz"}
        tags = lm_tags(role, strategy, f"q-{strategy}", "bk-qa") | {DESIGN_TAGS["task"]: "qa"}
        metrics = {"exact_match": em, "exact_match_lo": em - 0.1, "exact_match_hi": em + 0.1, "f1": em / 2,
                   "kv_bytes_peak": 1e6, "wall_s": 1.0}
        _log(**log, experiment_id=ids["qa"], params=params, tags=tags, metrics=metrics, start_time=t + 20 + i,
             texts=qa_texts)
    return uri


# ---- exported results with an experiment of another task and an unknown strategy ---------------------

QA_RUNS = pd.DataFrame([  # as an export of the `qa` task would write them (only the columns it has)
    {"run_id": "q-base", "experiment": "qa_exp", "role": "baseline", "task": "qa", "strategy": "none",
     "keep_ratio": 0.5, "exact_match": 0.7, "exact_match_lo": 0.6, "exact_match_hi": 0.8, "f1": 0.35},
    {"run_id": "q-snap5", "experiment": "qa_exp", "role": "compressed", "task": "qa", "strategy": "snapkv",
     "keep_ratio": 0.5, "exact_match": 0.5, "exact_match_lo": 0.4, "exact_match_hi": 0.6, "f1": 0.25},
    {"run_id": "q-snap3", "experiment": "qa_exp", "role": "compressed", "task": "qa", "strategy": "snapkv",
     "keep_ratio": 0.3, "exact_match": 0.45, "f1": 0.2},
]).assign(model="tiny", dataset="quiz", start_time=1)
SNAPKV_RUN = pd.DataFrame([  # an unknown strategy in the strategies experiment
    {"run_id": "s-snap", "experiment": "strategies", "role": "compressed", "task": "lm", "strategy": "snapkv",
     "keep_ratio": 0.5, "ppl": 50.0, "accuracy": 0.3, "delta_ppl_pct": 29.2, "delta_accuracy_pct": -16.6,
     "model": "SmolLM2-135M-Instruct", "dataset": "gutenberg", "start_time": 1}])


def results_dir(root: Path, v1: bool = True) -> Path:
    """A results folder: the v1 export (optional), plus qa_exp and one snapkv run in strategies."""
    out = root / "results"
    (out / "per_text").mkdir(parents=True)
    if v1:
        for f in V1.rglob("*.csv"):
            (out / f.relative_to(V1)).write_bytes(f.read_bytes())
    QA_RUNS.to_csv(out / "qa_exp.csv", index=False)
    pd.DataFrame({"run_id": ["q-base", "q-snap5"], "text_id": ["q1", "q1"], "exact_match": [1.0, 0.0]}).to_csv(
        out / "per_text" / "qa_exp.csv", index=False)
    if v1:
        SNAPKV_RUN.to_csv(out / "strategies_snapkv.csv", index=False)
    return out
