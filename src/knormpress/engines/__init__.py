"""`evaluate`: per-token NLL and accuracy of a model reading a text under a compression."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines.streaming import evaluate_streaming
from knormpress.errors import ConfigError
from knormpress.metrics import EvalResult

ENGINES = ("auto", "streaming")


def evaluate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    compression: Compression | None = None,
    engine: str = "auto",
    progress: bool = False,
) -> EvalResult:
    """Read `input_ids` (T,) or (1, T) and score each next-token prediction.

    compression=None is the uncompressed baseline. engine: "streaming" (token by token, the
    reference), "masked" (one exact forward pass, static strategies only), or "auto" (masked
    when the strategy allows it).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    ids = input_ids.view(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ConfigError(f"need at least 2 tokens to score a prediction, got {ids.shape[1]}")
    if compression is not None:
        compression.check_layers(model.config.num_hidden_layers)
    start = time.perf_counter()
    result = evaluate_streaming(model, ids, compression, progress)
    result.wall_s = time.perf_counter() - start
    return result
