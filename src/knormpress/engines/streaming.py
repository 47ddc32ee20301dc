"""The reference engine: read the text token by token with a real cache, compress after every step.

It is the definition the one-pass engines are checked against, not a more exact one: in float32 its
keys carry the rounding of one-token steps (which even changes with the number of threads), the
one-pass engines' that of one batched pass, and a near-tie in the scores can be decided differently
by the two. See `knormpress.engines.masked` for what that costs on the default study.

`CacheReader` is its step, public: decoding after a prompt (`knormpress.engines.prompt`) feeds each
answer token through the same reader.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from knormpress.compression import CacheCompressor, Compression
from knormpress.engines.base import PLAN, Engine, EngineOutput, attention_implementation, plan_of, register_engine
from knormpress.engines.maths import cache_attention, grouped_weights, held_during_call, refuse_unsupported
from knormpress.rotary import Rotary

ATTN = "knorm_streaming"


@register_engine
@dataclass
class Streaming(Engine):
    """Token by token with a real cache: every strategy, every setting; the reference."""

    name = "streaming"

    def refuses(self, compression: Compression | None, model: PreTrainedModel | None = None) -> str | None:
        if compression is not None and compression.strategy.needs_next_query:
            return (f"strategy {compression.strategy.name!r} ranks by the next query's attention, which a token-by-token "
                    "cache is pruned before it computes")
        return None

    @torch.no_grad()
    def run(self, model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None,
            progress: bool = False) -> EngineOutput:
        """True positions are passed to the model; under positions=rerotate the engine's attention moves
        each compressed layer's new token to the next index of its cache (`streaming_attention`).

        The first min(T - 1, fix_kv_size) tokens go through in one call: nothing is evicted before the
        cache exceeds the budget, so this is the same computation, only faster. Sliding-window layers
        (Gemma 3's local layers) are left to transformers' own sliding cache, never compressed."""
        T = input_ids.shape[1]
        rotary = Rotary(model) if compression is not None and compression.positions == "rerotate" else None
        prefill = min(T - 1, compression.fix_kv_size) if compression is not None else T - 1
        steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T - 1)]
        logits, held = [], []
        with CacheReader(model, compression, DynamicCache(config=model.config), rotary) as read:
            for start, stop in tqdm(steps, desc="tokens", unit="step", disable=not progress, leave=False):
                logits.append(read(input_ids[:, start:stop], start)[0].float())
                held.extend(held_during_call(read.cache, start, stop))
        held = torch.tensor(held, dtype=torch.float64)
        return EngineOutput(torch.cat(logits), held[:, 0], held[:, 1], self.name, read.cache)


@dataclass
class StepPlan:
    """What the streaming attention needs during one model call: the compression, whether to record
    attention for attention-based strategies (per compressed layer), and under positions=rerotate the
    model's rotary and the true position of the call's first token."""

    compression: Compression
    record: bool = True
    rotary: Rotary | None = None
    start: int = 0
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """What the last call recorded, per layer: the last query's weights (B, Hq, n) and the weights
        summed over the call's queries and each KV group (B, Hkv, n)."""
        taken, self.recorded = self.recorded, {}
        return taken


class CacheReader:
    """Feeds tokens into `cache` one model call at a time and compresses it after each call (None:
    uncompressed). Where the compression needs it (attention-based strategies record their weights,
    positions=rerotate puts each new token at its slot), the model runs with `streaming_attention`
    while the reader is open; otherwise with its own attention. `recorded`: what the last call
    recorded (the compressor has used it)."""

    def __init__(self, model: PreTrainedModel, compression: Compression | None, cache: DynamicCache,
                 rotary: Rotary | None = None) -> None:
        self.model, self.cache = model, cache
        self.compress = None if compression is None else CacheCompressor(compression, rotary)
        record = compression is not None and compression.strategy.needs_attention
        self.plan = StepPlan(compression, record, rotary) if record or rotary is not None else None
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._open = ExitStack()

    def __enter__(self) -> CacheReader:
        if self.plan is not None:
            self._open.enter_context(attention_implementation(self.model, ATTN))
        return self

    def __exit__(self, *exc) -> None:
        self._open.close()

    def __call__(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed `input_ids` (n, q), the tokens at positions start..start+q-1 of each of n rows, and
        compress; returns the call's logits (n, q, vocab)."""
        n, q = input_ids.shape
        positions = torch.arange(start, start + q, device=input_ids.device).expand(n, q)
        extra = {} if self.plan is None else {PLAN: self.plan}
        if self.plan is not None:
            self.plan.start = start
        out = self.model(input_ids=input_ids, position_ids=positions, cache=self.cache, use_cache=True, **extra)
        if self.plan is not None and self.plan.record:
            self.recorded = self.plan.take()
        if self.compress is not None:
            self.compress(self.cache, self.recorded)
        return out.logits


def shift_new_tokens(rotary: Rotary, query: torch.Tensor, key: torch.Tensor, start: int, layer: int) -> torch.Tensor:
    """positions=rerotate, token by token: the call's q tokens arrive rotated at their true positions
    start.., but the layer's cache holds n - q earlier keys at indices 0..n-q-1, so they belong at
    n-q..n-1. Rotates the new keys in place (`key` is the cache layer's own tensor) and returns the
    query, both moved by n - q - start."""
    q, n = query.shape[2], key.shape[2]
    delta = n - q - start
    if delta == 0:
        return query
    key[:, :, n - q:] = rotary.shift(key[:, :, n - q:], delta, layer)
    return rotary.shift(query, delta, layer)


def streaming_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Exact attention for the token-by-token engine that puts new tokens at their slots under
    positions=rerotate and records, per compressed layer, what attention-based strategies score
    from: the last query's weights (B, Hq, n) and the weights summed over the call's queries and
    each KV group (B, Hkv, n). The cache holds n - q earlier tokens, then this call's q tokens in
    order, so query i sees keys 0 .. n - q + i. Every layer's output is the model's own attention
    (transformers' SDPA path, or `cache_attention` where the layer caps its logits, which SDPA
    cannot), so token by token the logits are those of the uncompressed model's code on the kept
    cache; the recorded weights are computed beside it."""
    plan = plan_of(kwargs, StepPlan, ATTN)
    layer, window, softcap = module.layer_idx, kwargs.get("sliding_window"), kwargs.get("softcap")
    refuse_unsupported(kwargs, "streaming")
    compressed = layer not in plan.compression.skip_layers and window is None
    if compressed and plan.rotary is not None:
        query = shift_new_tokens(plan.rotary, query, key, plan.start, layer)
    if softcap is None:
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:
        out = cache_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None
    if compressed and plan.record:  # the weights are recorded beside the model's own output, not used for it
        q, n = query.shape[2], key.shape[2]
        visible = torch.arange(n, device=key.device) <= (n - q) + torch.arange(q, device=key.device).view(-1, 1)
        w = grouped_weights(query, key, scaling, visible, softcap)
        plan.recorded[layer] = (w[..., -1, :].flatten(1, 2), w.sum(dim=(2, 3)))
    return out


AttentionInterface.register(ATTN, streaming_attention)
AttentionMaskInterface.register(ATTN, sdpa_mask)  # the layers handed to SDPA get exactly its mask
