"""Every config file and preset composes and validates, and mistakes fail with one clear line (no model loads)."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from knormpress.config import CONF_DIR, baseline_key, config_hash, flatten, validate
from knormpress.errors import ConfigError
from knormpress.tracking import count_jobs

GROUPS = ("model", "dataset", "compress", "eval", "tracking")
PRESETS = {"strategies": 5, "keep_ratio": 8, "ablations": 4, "paper": 25}
LOCAL = ["dataset.path=/tmp"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


def check(overrides: list[str]):
    cfg = compose("config", overrides=overrides)
    return validate(cfg)


def test_groups_have_the_documented_options():
    assert options("model") == ["pythia_70m", "smollm2_135m", "tiny_random"]
    assert options("dataset") == ["gutenberg", "local_text", "pg19"]
    assert options("compress") == ["keep_high", "keep_low", "none", "random", "recent_only", "sinks"]
    assert set(PRESETS) == set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}", *(LOCAL if option == "local_text" else [])]
    run, plain = check(overrides)
    assert plain[group] == OmegaConf.to_container(compose("config", overrides=overrides)[group])  # schema = YAML
    if group == "compress":
        assert run.compress.strategy == option
        assert (run.compress.fix_kv_size, run.compress.keep_ratio, run.compress.skip_layers) == (512, 0.5, [0, 1])
        assert run.compress.n_sink == (4 if option == "sinks" else 0)


def test_defaults():
    run, _ = check([])
    assert (run.model.source, run.dataset.source, run.compress.strategy) == ("pypi_gguf", "gutenberg", "keep_low")
    assert (run.eval.max_tokens, run.eval.n_samples, run.eval.engine, run.eval.device) == (3000, 3, "auto", "auto")
    assert run.tracking.enabled and run.tracking.uri is None and run.tracking.experiment == "knormpress"
    assert not run.force and run.progress


@pytest.mark.parametrize("preset,n_jobs", PRESETS.items())
def test_every_preset_and_every_job_of_its_grid_validates(preset, n_jobs):
    cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert cfg.tracking.experiment == preset
    assert count_jobs(cfg) == n_jobs
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    groups = [k for k in params if (CONF_DIR / k).is_dir()]  # need a compose; plain values can be set
    values = [k for k in params if k not in groups]
    jobs = 0
    for choice in itertools.product(*(params[g] for g in groups)):
        composed = compose("config", overrides=[f"experiment={preset}", *(f"{g}={c}" for g, c in zip(groups, choice))])
        for setting in itertools.product(*(params[v] for v in values)):
            for key, value in zip(values, setting):
                OmegaConf.update(composed, key, value)
            run, _ = validate(composed)
            assert run.role == "compressed"
            jobs += 1
    assert jobs == n_jobs
    if preset == "paper":
        assert (run.model.name, run.dataset.source, run.eval.n_samples) == ("EleutherAI/pythia-70m-deduped", "pg19", 10)


@pytest.mark.parametrize("launcher", ["slurm", "joblib", "submitit_local"])
def test_launchers_compose(launcher):
    cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.gpus_per_node == 1


def test_callback_and_logging_are_wired():
    cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "knormpress.tracking.SweepRun"


@pytest.mark.parametrize(
    "override,message",
    [
        ("compress.keep_ratio=1.5", "keep_ratio must lie in [0, 1], got 1.5"),
        ("compress.strategy=keep_lo", "unknown compress.strategy 'keep_lo'; choose one of none, keep_high, keep_low"),
        ("compress.fix_kv_size=0", "fix_kv_size must be an integer >= 1, got 0"),
        ("compress.keep_ratio=abc", "compress.keep_ratio: Value 'abc' of type 'str' could not be converted to Float"),
        ("eval.n_samples=0", "eval.n_samples must be >= 1, got 0"),
        ("eval.engine=fast", "unknown engine 'fast'; choose one of auto, masked, streaming"),
        ("eval.device=tpu", "unknown eval.device 'tpu'; choose one of cpu, cuda, auto"),
        ("model.source=s3", "unknown model.source 's3'; choose one of hub, pypi_gguf, random"),
        ("dataset=local_text", "dataset local_text needs dataset.path"),
        ("compress.fix_kv_size=2999", "compress.fix_kv_size=2999 is not smaller than the 2999 tokens"),
    ],
)
def test_mistakes_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as error:
        check([override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_typo_in_a_key_fails_in_composition():
    with pytest.raises(Exception, match="keep_rato"):
        compose("config", overrides=["compress.keep_rato=0.3"])


def test_schema_rejects_keys_the_yaml_gained_without_the_dataclass():
    cfg = compose("config")
    with open_dict(cfg):
        cfg.compress.budget = 3
    with pytest.raises(ConfigError, match="budget"):
        validate(cfg)


def test_config_hash_is_what_a_run_computes():
    _, base = check([])
    same = [["force=true", "progress=false", "tracking.experiment=x", "tracking.uri=sqlite:///x.db", "cache=/tmp"]]
    for overrides in same:
        assert config_hash(check(overrides)[1]) == config_hash(base)
    for overrides in (["compress.keep_ratio=0.3"], ["eval.engine=streaming"], ["eval.seed=1"], ["compress=random"]):
        assert config_hash(check(overrides)[1]) != config_hash(base)


def test_baseline_key_ignores_compression_engine_and_bootstrap():
    _, base = check([])
    for overrides in (["compress=none"], ["compress=random", "compress.keep_ratio=0.3"], ["eval.engine=streaming"], ["eval.n_boot=10"]):
        assert baseline_key(check(overrides)[1]) == baseline_key(base)
    for overrides in (["model=pythia_70m"], ["eval.max_tokens=1000"], ["dataset=pg19"], ["eval.seed=1"], ["eval.dtype=bfloat16"]):
        assert baseline_key(check(overrides)[1]) != baseline_key(base)


def test_flatten_gives_the_dotted_param_names():
    _, plain = check(["model=tiny_random"])
    flat = flatten(plain)
    for key in ("compress.strategy", "compress.keep_ratio", "compress.skip_layers", "model.name", "model.source",
                "model.random_config.arch", "dataset.source", "eval.engine", "eval.max_tokens", "eval.seed", "force"):
        assert key in flat
    assert flat["compress.skip_layers"] == [0, 1] and str(flat["compress.skip_layers"]) == "[0, 1]"
    assert check(["compress=none"])[1]["compress"]["strategy"] == "none"


def test_conf_dir_is_the_repo_conf():
    assert CONF_DIR == Path(__file__).resolve().parents[1] / "conf"
