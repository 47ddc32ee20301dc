"""`evaluate`: per-token NLL and accuracy of a model reading a text under a compression."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines.masked import evaluate_masked
from knormpress.engines.streaming import evaluate_streaming
from knormpress.errors import ConfigError
from knormpress.metrics import EvalResult

ENGINES = ("auto", "masked", "streaming")


def pick_engine(engine: str, compression: Compression | None) -> str:
    """Resolve "auto", and refuse "masked" where it would not be exact."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    static = compression is None or compression.scorer.static
    if engine == "masked" and not static:
        raise ConfigError(
            f"strategy {compression.strategy!r} re-scores tokens at every step, so engine='masked' cannot "
            "reproduce it; use engine='streaming' or 'auto'"
        )
    if engine == "auto":
        return "masked" if static else "streaming"
    return engine


def evaluate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    compression: Compression | None = None,
    engine: str = "auto",
    progress: bool = False,
) -> EvalResult:
    """Read `input_ids` (T,) or (1, T) and score each next-token prediction.

    compression=None is the uncompressed baseline. engine: "streaming" (token by token with a
    real cache, the reference), "masked" (one exact forward pass, static strategies only), or
    "auto" (masked when the strategy allows it).
    """
    engine = pick_engine(engine, compression)
    ids = input_ids.view(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ConfigError(f"need at least 2 tokens to score a prediction, got {ids.shape[1]}")
    if compression is not None:
        compression.check_layers(model.config.num_hidden_layers)
    start = time.perf_counter()
    if engine == "masked":
        logits, tokens, nbytes = evaluate_masked(model, ids, compression)
    else:
        logits, tokens, nbytes = evaluate_streaming(model, ids, compression, progress)
    logits, targets = logits[: ids.shape[1] - 1].float(), ids[0, 1:]
    return EvalResult(
        nll=F.cross_entropy(logits, targets, reduction="none").cpu(),
        correct=(logits.argmax(-1) == targets).cpu(),
        kv_tokens_peak=tokens.max().item(),
        kv_tokens_mean=tokens.mean().item(),
        kv_bytes_peak=nbytes.max().item(),
        kv_bytes_mean=nbytes.mean().item(),
        engine=engine,
        wall_s=time.perf_counter() - start,
    )
