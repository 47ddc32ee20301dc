"""The engine interface: what an engine declares and returns, and how it hands its attention function
the plan of one model call.

An engine is one registered dataclass (`@register_engine`) in a module of its own, which also owns
the attention function it registers in transformers' `AttentionInterface`. It says in one place,
`refuses(compression, model)`, whether it reproduces a setting exactly (a one-line reason when it
does not), declares what it leaves behind (`builds_cache`), and its `run` returns one `EngineOutput`.
`knormpress.engines.run` picks an engine by name or "auto" and runs it.

The plan of a call (what this pass compresses, what to record) travels as a keyword argument of the
model's forward call (`PLAN`): transformers 5 hands a forward call's extra keyword arguments
(`TransformersKwargs`) down to every attention call, in every decoder family the engines are checked
on (`tests/test_engines_base.py` holds each family of `knormpress.sources.tiny` to it). So no global
slot is set, and a plan reaches exactly the calls it was given to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import DynamicCache, PreTrainedModel

from knormpress.registry import Registry

PLAN = "knorm_plan"  # the forward-call keyword that carries an engine's plan to its attention function


@dataclass
class EngineOutput:
    """logits: (T-1, vocab) float32, row q predicts token q+1. kv_tokens, kv_bytes: (T-1,) the cache
    held when each query q = 1..T-1 starts (tokens per layer and KV head averaged over layers;
    bytes of keys + values over all layers). cache: the compressed cache after tokens 0..T-2 (the
    last token is only a target), from engines that `builds_cache`. wall_s: set by `run_engine`."""

    logits: torch.Tensor
    kv_tokens: torch.Tensor
    kv_bytes: torch.Tensor
    engine: str
    cache: DynamicCache | None = None
    wall_s: float = 0.0

    def memory(self) -> dict[str, float]:
        """Peak and mean of the held cache over the sequence, and what it holds when the last query
        starts (the seed's measure: tokens held at the end of a text)."""
        return {"kv_tokens_peak": self.kv_tokens.max().item(), "kv_tokens_mean": self.kv_tokens.mean().item(),
                "kv_bytes_peak": self.kv_bytes.max().item(), "kv_bytes_mean": self.kv_bytes.mean().item(),
                "kv_tokens_last": self.kv_tokens[-1].item(), "kv_bytes_last": self.kv_bytes[-1].item()}


@dataclass
class Engine:
    """Base class: give `name`, override `run` and, where the engine is not exact for every setting,
    `refuses`."""

    name: ClassVar[str]
    builds_cache: ClassVar[bool] = True  # ends with the compressed cache, which decoding after a prompt reads

    def refuses(self, compression: Any, model: PreTrainedModel | None = None) -> str | None:
        """Why this engine cannot reproduce `compression` (None: uncompressed) on `model` exactly, as
        the start of one line ("strategy 'tova' re-scores tokens at every step"), or None when it can.
        `model` is None when the question is asked before any model loads."""
        return None

    def run(self, model: PreTrainedModel, input_ids: torch.Tensor, compression: Any, progress: bool) -> EngineOutput:
        """Read `input_ids` (1, T) under `compression` (resolved to tokens; None: uncompressed)."""
        raise NotImplementedError


REGISTRY: Registry[Engine] = Registry("engine")
register_engine = REGISTRY.register


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run the model with the attention function registered as `name`, then restore its own."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def plan_of(kwargs: dict, kind: type, attention: str) -> Any:
    """The plan an engine passed to its attention function `attention` with the model call."""
    plan = kwargs.get(PLAN)
    if not isinstance(plan, kind):
        raise RuntimeError(f"the {attention!r} attention only runs inside knormpress.evaluate or knormpress.run_engine")
    return plan


@dataclass
class OnePassPlan:
    """What a one-pass engine's attention function reads (the compression, each layer's window) and
    fills (`held`: layer -> (tokens held when each query starts, bytes per token))."""

    compression: Any
    windows: list[int | None]  # per layer: the window of a sliding layer in transformers' cache, else None
    held: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


def one_pass(model: PreTrainedModel, input_ids: torch.Tensor, attention: str, plan: OnePassPlan) -> tuple[torch.Tensor, ...]:
    """One forward pass over (1, T) with the attention function registered as `attention`, which fills
    `plan.held`. Returns the logits (T-1, vocab) float32, the tokens held per layer and KV head
    averaged over layers (T-1,), and the bytes held (T-1,)."""
    T = input_ids.shape[1]
    with attention_implementation(model, attention):
        positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False, **{PLAN: plan}).logits[0]
    tokens = torch.stack([t for t, _ in plan.held.values()])
    return logits[: T - 1].float(), tokens.mean(0), sum(t * b for t, b in plan.held.values())
