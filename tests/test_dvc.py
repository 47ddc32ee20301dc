"""The DVC side as its users run it, on a temporary git repo holding dvc.yaml, params.yaml, the plot
templates and the committed results: `dvc params diff`, `dvc metrics show/diff`, `dvc plots show`."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from knormpress.config import CONF_DIR, validate
from knormpress.report.effects import category

pytestmark = pytest.mark.slow  # a dozen dvc commands, seconds each
ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
EXPERIMENTS = ("strategies", "keep_ratio", "ablations", "interval")
PLOTS = ("keep_ratio_ppl", "keep_ratio_accuracy", "ppl_vs_memory")


def sh(repo: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shlex.join(cmd)}: {done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """dvc.yaml, params.yaml, .dvc/plots, the code the stages depend on and results/ (CSVs, PNGs,
    metrics.json rebuilt by the metrics stage's script) committed in a fresh git + DVC repo."""
    repo = tmp_path_factory.mktemp("dvc_repo")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    shutil.copy(ROOT / "run.py", repo / "run.py")
    for folder in ("conf", "scripts", "src/knormpress"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "results", repo / "results", ignore=shutil.ignore_patterns("metrics.json"))
    for name in (*EXPERIMENTS, "memory"):  # a stage added after the committed results were built: its exports, empty
        for path in (repo / "results" / f"{name}.csv", repo / "results" / "per_text" / f"{name}.csv"):
            if not path.exists():
                path.write_text("run_id\n")
    sh(repo, sys.executable, str(ROOT / "scripts" / "make_metrics.py"), "--results", "results")
    sh(repo, *git, "add", "-A")
    sh(repo, *git, "commit", "-q", "-m", "results")
    return repo


def test_the_stages_read_the_study_from_params_yaml(repo):
    from dvc.repo import Repo

    study = yaml.safe_load((repo / "params.yaml").read_text())["study"]
    assert set(study) == {"models", "dataset", "n_samples", "max_tokens"}
    assert study["n_samples"] >= 10 and len(study["models"].split(",")) >= 2  # the study carries intervals and two models
    stages = {s.name.removeprefix("experiment@"): s for s in Repo(str(repo)).index.stages}  # experiment@<name>
    for name in EXPERIMENTS:  # every experiment on every model of the study
        keys = [f"study.{k}" for k in ("models", "dataset", "n_samples", "max_tokens")]
        assert [p.def_path for p in stages[name].params] == ["params.yaml"] and stages[name].params[0].params == keys
        run = shlex.split(stages[name].cmd.split("&&")[0])
        assert run[:3] == ["python", "run.py", "-m"] and f"experiment={name}" in run
        assert f"model={study['models']}" in run and f"eval.n_samples={study['n_samples']}" in run
        # the preset's own jobs: nothing but the study's keys (and force) is overridden, and it composes
        assert {a.split("=")[0] for a in run[3:]} == {"experiment", "model", "dataset", "eval.n_samples", "eval.max_tokens", "force"}
        first = [f"model={study['models'].split(',')[0]}" if a.startswith("model=") else a for a in run[3:]]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            validate(compose("config", overrides=first))


def test_the_retrieval_stages_read_their_grid_from_params_yaml(repo):
    from dvc.repo import Repo

    params = yaml.safe_load((repo / "params.yaml").read_text())
    study, grid = params["study"], params["retrieval"]
    stages = {s.name.removeprefix("experiment@"): s for s in Repo(str(repo)).index.stages}
    for name in ("passkey", "needle"):
        keys = ["study.models", "retrieval.lengths", "retrieval.depths", "retrieval.trials"]
        assert stages[name].params[0].params == keys
        run = shlex.split(stages[name].cmd.split("&&")[0])
        assert run[:3] == ["python", "run.py", "-m"] and f"experiment={name}" in run
        assert f"model={study['models']}" in run and f"task.lengths={grid['lengths']}" in run
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            validate(compose("config", overrides=[a.split(",")[0] if a.startswith("model=") else a for a in run[3:]]))


def test_the_memory_stage_reads_one_long_text_per_model_from_params_yaml(repo):
    from dvc.repo import Repo

    params = yaml.safe_load((repo / "params.yaml").read_text())
    stage = {s.name: s for s in Repo(str(repo)).index.stages}["experiment@memory"]
    assert stage.params[0].params == ["study.models", "study.dataset", "memory.n_samples", "memory.max_tokens"]
    run = shlex.split(stage.cmd.split("&&")[0])
    assert f"model={params['study']['models']}" in run and f"eval.max_tokens={params['memory']['max_tokens']}" in run
    assert params["memory"]["max_tokens"] == 3000  # the seed's text length (3000 -> 512 tokens)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        validate(compose("config", overrides=[a.split(",")[0] if a.startswith("model=") else a for a in run[3:]]))


def test_params_diff_shows_a_change_of_the_study(repo):
    params = repo / "params.yaml"
    text = params.read_text()
    n = yaml.safe_load(text)["study"]["n_samples"]
    try:
        params.write_text(text.replace(f"n_samples: {n} ", f"n_samples: {n + 2} "))
        assert json.loads(sh(repo, DVC, "params", "diff", "--json")) == {
            "params.yaml": {"study.n_samples": {"old": n, "new": n + 2, "diff": 2}}}
        table = sh(repo, DVC, "params", "diff")
        assert "study.n_samples" in table and str(n) in table and str(n + 2) in table
    finally:
        params.write_text(text)


def test_exp_run_sets_a_study_param(repo):
    """`dvc exp run -S` edits params.yaml (no Hydra composition: see the README); --dry only prints the commands."""
    study = yaml.safe_load((repo / "params.yaml").read_text())["study"]
    # the study's stages only: the retrieval stages' results are not committed, and a dry run of the
    # plots stage needs them on disk
    out = sh(repo, DVC, "exp", "run", "--dry", "-S", "study.n_samples=5", *(f"experiment@{name}" for name in EXPERIMENTS))
    for name in EXPERIMENTS:
        model = study["models"]
        assert (f"experiment={name} model={model} dataset={study['dataset']} eval.n_samples=5 "
                f"eval.max_tokens={study['max_tokens']}") in out
    assert f"n_samples: {study['n_samples']} " in (repo / "params.yaml").read_text()


def test_metrics_show_and_diff_read_the_headline_numbers(repo):
    runs = pd.read_csv(repo / "results" / "strategies.csv")
    keep_low = runs[runs.strategy == "keep_low"].iloc[0]
    shown = json.loads(sh(repo, DVC, "metrics", "show", "--json"))
    (data,) = [v["data"]["results/metrics.json"]["data"] for v in shown.values()]
    tasks = {t for path in (repo / "results").glob("*.csv") if "task" in pd.read_csv(path, nrows=0).columns
             for t in pd.read_csv(path).task.dropna()}  # every exported stage's tasks (lm, passkey, needle, diagnose)
    assert set(data[keep_low.model]) == tasks | {"claims"} and "lm" in tasks  # one level per task, even for one task
    words = {category(v) for v in data[keep_low.model]["claims"].values()}  # the summary's verdict words
    assert words and words <= {"holds", "direction holds", "does not hold", "inconclusive", "not measurable"}
    model = data[keep_low.model]["lm"]
    own = runs[(runs.model == keep_low.model) & (runs.role == "compressed")]
    assert set(model) == {"baseline", *own.strategy} and {"keep_low", "h2o", "tova", "keydiff"} <= set(model)
    assert set(model["baseline"]) == {"ppl", "accuracy"}
    assert model["keep_low"] == pytest.approx({k: keep_low[k] for k in ("ppl", "accuracy", "delta_ppl_pct", "delta_accuracy_pct")},
                                              abs=1e-4)
    name = f"{keep_low.model}.lm.keep_low.ppl"
    assert name in sh(repo, DVC, "metrics", "show") and f"{keep_low.model}.claims.memory_saving" in sh(repo, DVC, "metrics", "show")

    metrics = repo / "results" / "metrics.json"
    text = metrics.read_text()
    try:
        changed = json.loads(text)
        changed[keep_low.model]["lm"]["keep_low"]["ppl"] += 1
        metrics.write_text(json.dumps(changed))
        diff = json.loads(sh(repo, DVC, "metrics", "diff", "--json"))["results/metrics.json"]
        assert list(diff) == [name] and diff[name]["diff"] == pytest.approx(1)
    finally:
        metrics.write_text(text)


def test_plots_show_renders_the_curves_and_the_figures(repo):
    sh(repo, DVC, "plots", "show")
    html = (repo / "dvc_plots" / "index.html").read_text()
    for name in (*PLOTS, "strategy_comparison.png", "keep_ratio_analysis.png", "ppl_accuracy_tradeoff.png",
                 "improvement_summary.png"):
        assert name in html, name
    specs = json.loads(sh(repo, DVC, "plots", "show", "--json"))["data"]
    curve = specs["keep_ratio_ppl"][0]["content"]
    rows = curve["data"]["values"]
    assert {r["strategy"] for r in rows if r["role"] == "compressed"} == {"keep_low", "random"}
    assert curve["layer"][0]["encoding"]["color"] == {"field": "strategy", "type": "nominal"}  # one line per strategy
    memory = specs["ppl_vs_memory"][0]["content"]
    assert memory["encoding"]["x"]["field"] == "kv_bytes_peak" and memory["encoding"]["y"]["field"] == "ppl"
