"""Typed schema of a composed run config: every typo or out-of-range value fails here, before any model loads.

Everything checked before the model spec and the engine choice imports no torch, transformers or
mlflow, so a mistake is reported about a second after the command starts.

The YAML files under conf/ say what a run does; these dataclasses say what is allowed. `validate`
merges a composed config into the schema (unknown keys and wrong types fail in OmegaConf) and
builds the dataclasses (whose `__post_init__` checks ranges and choices), turning every mistake
into one `ConfigError` line.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knormpress.errors import ConfigError, choose
from knormpress.registry import settings
from knormpress.settings import defaults
from knormpress.sources.datasets import Dataset, get_dataset
from knormpress.sources.hardware import DEVICES, DTYPES
from knormpress.spec import Compression
from knormpress.tasks import Task, get_task

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
NOT_SEMANTIC = ("tracking", "force", "progress", "cache", "plugins")  # where and how a run is logged, not what it computes
NO_COMPRESSION = "none"  # the strategy name of the uncompressed baseline
COMPRESS_DEFAULTS = "compress_defaults"  # conf/config.yaml's first default: every compress setting, from the spec

# every Compression setting with its default, composed before conf/config.yaml's own `compress` node,
# so a new setting can be overridden (compress.<name>=...) without a line of YAML
ConfigStore.instance().store(name=COMPRESS_DEFAULTS, node={"compress": defaults(Compression)})


@dataclass
class EvalConfig:
    max_tokens: int = 3000
    n_samples: int = 3
    start_offset: int = 0
    engine: str = "auto"
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    n_boot: int = 2000

    def __post_init__(self) -> None:
        choose("eval.device", self.device, DEVICES)
        choose("eval.dtype", self.dtype, DTYPES)
        for key, low in (("max_tokens", 2), ("n_samples", 1), ("start_offset", 0), ("n_boot", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"eval.{key} must be >= {low}, got {getattr(self, key)}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "knormpress"

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("tracking.experiment must be a non-empty MLflow experiment name, got an empty one")


@dataclass
class RunConfig:
    """A composed run. The `model`, `dataset`, `task` and `compress` nodes are checked by what builds
    from them (`validate_model_spec`, the dataset and task registries, `Compression`), so their fields
    are listed once."""

    model: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "gutenberg"})
    task: dict[str, Any] = field(default_factory=lambda: {"name": "lm"})
    compress: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plugins: list[str] = field(default_factory=list)  # modules imported first: they register strategies, tasks, datasets
    force: bool = False
    progress: bool = True
    cache: str | None = None

    def __post_init__(self) -> None:
        _import_plugins(self.plugins)
        self.build_dataset().check()
        compression = self.build_compression()
        self.build_task().check(compression, self.eval)
        from knormpress.engines import pick_engine  # torch and transformers from here on
        from knormpress.sources.models import validate_model_spec

        validate_model_spec(self.model)
        pick_engine(self.eval.engine, compression)  # e.g. masked + random_per_step

    def build_compression(self) -> Compression | None:
        """The compression to evaluate, or None for the uncompressed baseline."""
        strategy = self.compress.get("strategy")
        if strategy == NO_COMPRESSION or (isinstance(strategy, dict) and strategy.get("name") == NO_COMPRESSION):
            Compression.from_dict({**self.compress, "strategy": "keep_low"})  # the budget is checked all the same
            return None
        return Compression.from_dict(self.compress)

    def build_task(self) -> Task:
        return get_task(self.task)

    def build_dataset(self) -> Dataset:
        return get_dataset(self.dataset)


def _import_plugins(modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConfigError(f"cannot import plugin {name!r} ({error}); put its folder on PYTHONPATH or fix `plugins`") from None


def validate(cfg: DictConfig | dict) -> tuple[RunConfig, dict[str, Any]]:
    """The typed config and its plain resolved dict (schema defaults filled in, no `hydra` node);
    the `compress`, `task` and `dataset` nodes come back normalized (every setting, defaults included)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        plain = OmegaConf.to_container(merged, resolve=True)
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = f"{error.full_key}: " if getattr(error, "full_key", None) else ""
        raise ConfigError(f"{where}{reason}") from None
    compression = run.build_compression()
    plain["compress"] = compression.to_dict() if compression else {**plain["compress"], "strategy": {"name": NO_COMPRESSION}}
    plain["task"] = settings(run.build_task())
    plain["dataset"] = settings(run.build_dataset())
    return run, plain


def as_baseline(plain: dict[str, Any]) -> dict[str, Any]:
    """The resolved config of the uncompressed run that `plain` is compared with."""
    return {**plain, "compress": {**plain["compress"], "strategy": {"name": NO_COMPRESSION}}}


def semantic(plain: dict[str, Any]) -> dict[str, Any]:
    """What a run computes: the resolved config without tracking, force, progress and cache."""
    return {k: v for k, v in plain.items() if k not in NOT_SEMANTIC}


def config_hash(plain: dict[str, Any]) -> str:
    """Identity of a job: runs with the same hash compute the same numbers."""
    return _hash(semantic(plain))


def baseline_key(plain: dict[str, Any]) -> str:
    """Identity of the baseline a job compares against: model, texts and eval settings that
    change its numbers (not engine, which is exact either way, nor n_boot)."""
    ev = {k: v for k, v in plain["eval"].items() if k not in ("engine", "n_boot")}
    return _hash({"model": plain["model"], "dataset": plain["dataset"], "task": plain["task"], "eval": ev})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys MLflow params use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
