"""Picking an engine and running it: `run_engine` (logits, cache, memory held) and `evaluate` (the
per-token NLL and correctness a task scores from).

An engine is asked by name or as "auto", which takes the first engine of `AUTO` that does not refuse
the setting: the exact engines, fastest first (the equivalence tests hold each to the streaming
engine). A registered engine outside `AUTO` (a plug-in) runs only when named.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines import masked, replay, streaming  # noqa: F401  (the built-in engines register themselves)
from knormpress.engines.base import REGISTRY, Engine, EngineOutput
from knormpress.errors import ConfigError, choose
from knormpress.metrics import EvalResult

AUTO = ("masked", "replay", "streaming")  # what "auto" tries, in this order


def usable(compression: Compression | None, model: PreTrainedModel | None = None, cache: bool = False) -> list[str]:
    """The engines that reproduce `compression` on `model` exactly, `AUTO`'s first, then plug-ins by
    name; `cache`: only those that end with the compressed cache."""
    names = [*AUTO, *sorted(set(REGISTRY) - set(AUTO))]
    engines = [REGISTRY.build(name, Engine) for name in names]
    return [e.name for e in engines if (e.builds_cache or not cache) and e.refuses(compression, model) is None]


def pick_engine(engine: str, compression: Compression | None, model: PreTrainedModel | None = None,
                cache: bool = False) -> Engine:
    """The engine `engine` names ("auto": the first of `AUTO` that fits), refused in one line, naming
    the engines that would work, where it cannot reproduce `compression` exactly or, with `cache`,
    ends with no compressed cache to decode from."""
    choose("engine", engine, ["auto", *REGISTRY])
    fits = usable(compression, model, cache)
    if engine == "auto" and not any(name in fits for name in AUTO):
        reasons = "; ".join(f"{name}: {REGISTRY.build(name, Engine).refuses(compression, model)}" for name in AUTO)
        raise ConfigError(f"no engine reproduces this compression ({reasons})")
    if engine == "auto":
        return REGISTRY.build(next(name for name in AUTO if name in fits), Engine)
    if engine in fits:
        return REGISTRY.build(engine, Engine)
    others = ", ".join(repr(name) for name in fits) + " or 'auto'"
    chosen = REGISTRY.build(engine, Engine)
    if cache and not chosen.builds_cache:
        raise ConfigError(f"decoding after a prompt reads the compressed cache, which engine {engine!r} never builds; "
                          f"use engine={others}")
    raise ConfigError(f"{chosen.refuses(compression, model)}, so engine={engine!r} cannot reproduce it; use engine={others}")


def run_engine(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    compression: Compression | None = None,
    engine: str = "auto",
    progress: bool = False,
) -> EngineOutput:
    """Read `input_ids` (T,) or (1, T) under `compression` (None: uncompressed)."""
    chosen = pick_engine(engine, compression, model)
    ids = input_ids.view(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ConfigError(f"need at least 2 tokens to score a prediction, got {ids.shape[1]}")
    if compression is not None:
        compression = compression.resolved(ids.shape[1] - 1)  # a ratio of the tokens the cache is fed
        compression.check_layers(model.config.num_hidden_layers)
    start = time.perf_counter()
    out = chosen.run(model, ids, compression, progress)
    out.wall_s = time.perf_counter() - start
    return out


def evaluate(model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None = None,
             **options: Any) -> EvalResult:
    """Read `input_ids` (T,) or (1, T) and score each next-token prediction.

    compression=None is the uncompressed baseline. options, as for `run_engine`: engine "auto" (the
    fastest exact engine for the setting; default), "masked", "replay", "streaming" (token by token
    with a real cache, the reference) or a plug-in's name, and progress (a bar per token).
    """
    out = run_engine(model, input_ids, compression, **options)
    targets = input_ids.view(-1)[1:].to(out.logits.device)
    return EvalResult(
        nll=F.cross_entropy(out.logits, targets, reduction="none").cpu(),
        correct=(out.logits.argmax(-1) == targets).cpu(),
        engine=out.engine,
        wall_s=out.wall_s,
        **out.memory(),
    )
