"""Evaluation tasks as plug-ins: what a run measures, separate from how the model is run. The base
class and the registry; the built-in tasks are modules beside this one.

A task picks its samples, runs the model on each under a compression through the engines,
returns per-item records (a DataFrame whose first column is `text_id`, the sample id), and turns
records (its own and, for deltas, the baseline's) into metrics. Everything downstream (runner,
tracking, export, figures, summary) handles any task through these records and metrics.
Optional hooks, with defaults: `histories` (curves along the samples, logged as MLflow metric
histories), `dataset_info` (what the run read, logged as an MLflow dataset input), `key_metrics`
(what a sweep's comparison figure shows) and `headline` (the one-line result). What the report
needs to know of a task is declared on its class: `columns` (its metrics in table order), `sizes`
(what a run read, its sample unit first), `setting` (the compression its headline numbers are
read at) and `figures` (the functions that draw it). This package imports no torch at load, so
the report can read these declarations: a task imports the engines inside `run`.
A new task is one `@register_task` dataclass; `lm` (perplexity, next-token accuracy) is the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from knormpress.registry import Registry

REGISTRY: Registry[Task] = Registry("task")
TASKS = REGISTRY.classes  # name -> class
register_task = REGISTRY.register


@dataclass
class Outcome:
    """One sample run under one compression: its records and the memory and time it took."""

    records: pd.DataFrame
    memory: dict[str, float]
    engine: str
    wall_s: float


@dataclass(frozen=True)
class DatasetInfo:
    """What a run read, as MLflow shows it in the runs table's Dataset column (the digest, a
    fingerprint of the exact samples, comes from the runner)."""

    name: str
    source_type: str  # MLflow's kind of source: "http", "hugging_face", "local", ...
    source: dict[str, Any]  # where from, in that kind's fields: {"url": ...}, {"path": ...}, {"uri": ...}
    profile: dict[str, Any]  # sizes, e.g. {"texts": 3, "tokens": 9000}


@dataclass
class Task:
    """Base class: override `run` and `metrics`; the rest has defaults that suit text tasks."""

    name: ClassVar[str]
    key_metrics: ClassVar[tuple[str, ...]] = ()  # a sweep's comparison figure shows these (default: the first metric)
    columns: ClassVar[tuple[str, ...]] = ()  # its metrics in table order (fnmatch patterns); others follow by name
    sizes: ClassVar[dict[str, str]] = {"n_texts": "texts", "n_tokens": "predicted tokens"}  # what a run read: count
    # metric -> its words, the sample unit first (the report's "3 texts, 9,000 predicted tokens per run")
    setting: ClassVar[dict[str, Any]] = {}  # the compress settings (over the spec's defaults) of its headline numbers
    figures: ClassVar[tuple[str, ...]] = ()  # "module:function" that draw its figures, each to <function>.png
    reads: ClassVar[str | None] = None  # what its prompts are made of when not the dataset's texts (titles say it)

    def check(self, compression: Any, ev: Any) -> None:
        """Refuse a compression or eval setting this task cannot run, before any model loads."""

    def samples(self, bundle: Any, dataset: Any, ev: Any, cache: str | Path | None) -> list:
        """Default: `ev.n_samples` windows of `ev.max_tokens` tokens from the dataset's texts
        (`dataset`: the run's `knormpress.sources.datasets.Dataset`)."""
        from knormpress.sources.texts import load_samples

        return load_samples(dataset, bundle.tokenizer, bundle.name, n_samples=ev.n_samples, max_tokens=ev.max_tokens,
                            start_offset=ev.start_offset, seed=ev.seed, cache=cache)

    def run(self, model: Any, sample: Any, compression: Any, engine: str, progress: bool) -> Outcome:
        raise NotImplementedError

    def metrics(self, records: pd.DataFrame, baseline: pd.DataFrame | None, n_boot: int, seed: int) -> dict[str, float]:
        """Metrics of a run from its records; `baseline`: the uncompressed run's records (None for the baseline itself)."""
        raise NotImplementedError

    def per_sample(self, records: pd.DataFrame) -> pd.DataFrame:
        """One row per sample (per_text.csv): default, the numeric columns summed per text_id."""
        return records.groupby("text_id", sort=False).sum(numeric_only=True).reset_index()

    def headline(self, metrics: dict[str, float]) -> str:
        """The one-line result a person reads in the log and the MLflow run description."""
        return ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:4])

    def histories(self, records: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
        """Curves along the samples, name -> [(step, value)], logged as MLflow metric histories
        (the run page draws them); default none."""
        return {}

    def dataset_info(self, samples: list, dataset: Any) -> DatasetInfo | None:
        """The samples as an MLflow dataset input; default: token windows of the dataset's texts."""
        name, source_type, source = dataset.source()
        return DatasetInfo(name, source_type, source, {"texts": len(samples), "tokens": sum(len(s.input_ids) for s in samples)})


def get_task(spec: str | dict | Task) -> Task:
    """Build a registered task from a name or a `{name: ..., <setting>: ...}` node."""
    return REGISTRY.build(spec, Task)

