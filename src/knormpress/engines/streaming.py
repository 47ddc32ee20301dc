"""The reference engine: read the text token by token with a real cache, compress after every step.

It is the definition the one-pass engines are checked against, not a more exact one: in float32 its
keys carry the rounding of one-token steps (which even changes with the number of threads), the
one-pass engines' that of one batched pass, and a near-tie in the scores can be decided differently
by the two. See `knormpress.engines.masked` for what that costs on the default study.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from knormpress.compression import CacheCompressor, Compression
from knormpress.engines.attention import RECORD, attention_implementation
from knormpress.rotary import Rotary


@dataclass
class _Recording:
    """What the engine's attention needs during one model call: whether to record attention for
    attention-based strategies (per compressed layer), and under positions=rerotate the model's
    rotary and the true position of the call's first token."""

    compression: Compression
    record: bool = True
    rotary: Rotary | None = None
    start: int = 0
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        taken, self.recorded = self.recorded, {}
        return taken


@torch.no_grad()
def evaluate_streaming(
    model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
    """input_ids: (1, T). Returns (logits (T-1, vocab), held tokens (T-1,), held bytes (T-1,), the cache).

    True positions are passed to the model; under positions=rerotate the engine's attention moves
    each compressed layer's new token to the next index of its cache (`recording_attention`).

    The first min(T - 1, fix_kv_size) tokens go through in one call: nothing is evicted before the
    cache exceeds the budget, so this is the same computation, only faster. Sliding-window layers
    (Gemma 3's local layers) are left to transformers' own sliding cache, never compressed.
    """
    T = input_ids.shape[1]
    rerotate = compression is not None and compression.positions == "rerotate"
    rotary = Rotary(model) if rerotate else None
    compress = CacheCompressor(compression, rotary) if compression is not None else None
    cache = DynamicCache(config=model.config)
    logits, held = [], []
    prefill = min(T - 1, compression.fix_kv_size) if compression is not None else T - 1
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T - 1)]
    record = compression is not None and compression.strategy.needs_attention
    own = record or rerotate  # else transformers' own attention
    plan = _Recording(compression, record, rotary)
    with attention_implementation(model, RECORD, plan) if own else nullcontext() as recording:
        for start, stop in tqdm(steps, desc="tokens", unit="step", disable=not progress, leave=False):
            plan.start = start
            positions = torch.arange(start, stop, device=input_ids.device).unsqueeze(0)
            out = model(input_ids=input_ids[:, start:stop], position_ids=positions, cache=cache, use_cache=True)
            logits.append(out.logits[0].float())
            if compress is not None:
                compress(cache, recording.take() if record else None)
            held.extend(_held(cache, start, stop))
    held = torch.tensor(held, dtype=torch.float64)
    return torch.cat(logits), held[:, 0], held[:, 1], cache


def _held(cache: DynamicCache, start: int, stop: int) -> list[tuple[float, float]]:
    """(tokens per layer, bytes) the cache holds when each query after this call starts.

    Inside a prefill call nothing is evicted, so query q+1 would start with q+1 tokens in a full
    layer and at most window - 1 in a sliding one (what transformers' sliding layer keeps).
    """
    layers = cache.layers
    lengths = [l.keys.shape[-2] for l in layers]
    per_token = [(l.keys.nbytes + l.values.nbytes) // n for l, n in zip(layers, lengths)]
    caps = [l.sliding_window - 1 if l.is_sliding else None for l in layers]
    rows = []
    for q in range(start, stop - 1):
        held = [q + 1 if cap is None else min(q + 1, cap) for cap in caps]
        rows.append((sum(held) / len(layers), float(sum(h * b for h, b in zip(held, per_token)))))
    return rows + [(sum(lengths) / len(layers), float(sum(n * b for n, b in zip(lengths, per_token))))]
