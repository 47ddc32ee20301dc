"""Engines: run a model over one sequence under a compression and return logits and held memory.

"streaming" reads token by token with a real cache (the reference); "masked" computes the same
numbers in one forward pass by key expiry, for static strategies with true positions (any
interval); "replay" in one forward pass in which each layer replays its own eviction, for any
replayable strategy and either position policy; "auto" picks the fastest exact one. Engines know nothing of metrics: tasks turn their logits into numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines.masked import evaluate_masked
from knormpress.engines.replay import evaluate_replay
from knormpress.engines.streaming import evaluate_streaming
from knormpress.errors import ConfigError, choose

ENGINES = ("auto", "masked", "replay", "streaming")


@dataclass
class EngineOutput:
    """logits: (T-1, vocab) float32, row q predicts token q+1. kv_tokens, kv_bytes: (T-1,) the cache
    held when each query q = 1..T-1 starts (tokens per layer and KV head averaged over layers;
    bytes of keys + values over all layers). cache: the compressed cache
    after tokens 0..T-2 (the last token is only a target), from streaming and replay; the masked
    engine never builds one."""

    logits: torch.Tensor
    kv_tokens: torch.Tensor
    kv_bytes: torch.Tensor
    engine: str
    wall_s: float
    cache: DynamicCache | None = None

    def memory(self) -> dict[str, float]:
        """Peak and mean of the held cache over the sequence."""
        return {"kv_tokens_peak": self.kv_tokens.max().item(), "kv_tokens_mean": self.kv_tokens.mean().item(),
                "kv_bytes_peak": self.kv_bytes.max().item(), "kv_bytes_mean": self.kv_bytes.mean().item()}


def pick_engine(engine: str, compression: Compression | None) -> str:
    """Resolve "auto", and refuse "masked" where it would not be exact."""
    choose("engine", engine, ENGINES)
    static = compression is None or compression.strategy.static
    replayable = compression is None or compression.strategy.replayable
    name = None if compression is None else compression.strategy.name
    if engine == "masked" and not static:
        raise ConfigError(f"strategy {name!r} re-scores tokens at every step, so engine='masked' cannot reproduce it; "
                          "use engine='replay', 'streaming' or 'auto'")
    if engine == "masked" and compression is not None and compression.positions != "true":
        raise ConfigError(f"positions={compression.positions!r} moves kept keys after each pruning, so engine='masked' "
                          "cannot reproduce it; use engine='replay', 'streaming' or 'auto'")
    if engine == "replay" and not replayable:
        raise ConfigError(f"strategy {name!r} keeps state across layers, so engine='replay' cannot reproduce it; "
                          "use engine='streaming' or 'auto'")
    if engine == "auto":
        true = compression is None or compression.positions == "true"
        return "masked" if static and true else "replay" if replayable else "streaming"
    return engine


def run_engine(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    compression: Compression | None = None,
    engine: str = "auto",
    progress: bool = False,
) -> EngineOutput:
    """Read `input_ids` (T,) or (1, T) under `compression` (None: uncompressed)."""
    engine = pick_engine(engine, compression)
    ids = input_ids.view(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ConfigError(f"need at least 2 tokens to score a prediction, got {ids.shape[1]}")
    if compression is not None:
        compression = compression.resolved(ids.shape[1] - 1)  # a ratio of the tokens the cache is fed
        compression.check_layers(model.config.num_hidden_layers)
    start = time.perf_counter()
    cache = None
    if engine == "masked":
        logits, tokens, nbytes = evaluate_masked(model, ids, compression)
    elif engine == "replay":
        logits, tokens, nbytes, cache = evaluate_replay(model, ids, compression)
    else:
        logits, tokens, nbytes, cache = evaluate_streaming(model, ids, compression, progress)
    return EngineOutput(logits[: ids.shape[1] - 1].float(), tokens, nbytes, engine, time.perf_counter() - start, cache)
