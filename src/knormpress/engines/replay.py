"""The exact one-pass engine for any strategy: each layer replays its own eviction.

A layer's eviction depends only on that layer's queries, keys and values, and those depend only
on the layers below. So inside one forward pass, once the attention function is handed a layer's
exact inputs, it can replay the token-by-token rule query by query (attention only: no MLP, no
projections, no other layer) and return exactly the outputs the streaming engine computes. This
holds for any strategy that scores from the layer's own cache view (`Strategy.score(view)`); one
whose state is shared across layers or steps in call order (`random_per_step`, one generator for
all layers) is not `replayable` and runs token by token.

Layers that are not compressed (skipped, sliding-window, or shorter than the budget) attend
through `plain_attention`, a sliding layer with the window the model passes, as in the masked engine.

"Exactly" means in exact arithmetic (the float64 tests). In float32 the layer's inputs come from
one batched pass instead of one-token steps and differ in the last bits, so a near-tie in the
scores (rounded key norms, attention weights) can be decided differently than token by token, as
for the masked engine (see `knormpress.engines.masked` for its measured size on the default study;
`knormpress.engines.agreement` counts it for any strategy).

The replay keeps B + 1 slots per KV head: the token that joins takes the slot of the one evicted
at the previous step, so nothing is copied; attention does not depend on the order of keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from knormpress.compression import Compression
from knormpress.engines.attention import (PLAN, OnePassPlan, attend, cache_windows, grouped_weights, held_uncompressed, layer_window,
                                          no_mask, one_pass, plain_attention)
from knormpress.engines.masked import expiry_attention
from knormpress.eviction import evict_one, select
from knormpress.strategies import CacheView

ATTN = "knorm_replay"


@dataclass
class _Plan(OnePassPlan):
    kept: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer -> (keys, values, positions)


def replay_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of query (1, Hq, T, D) over key/value (1, Hkv, T, D) under the eviction rule, replayed."""
    plan = PLAN.get()
    if not isinstance(plan, _Plan):
        raise RuntimeError(f"the {ATTN!r} attention only runs inside knormpress.run_engine(engine='replay')")
    T, layer, c = query.shape[2], module.layer_idx, plan.compression
    per_token = key.shape[1] * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())
    window = layer_window(kwargs, layer, plan.windows, "replay")
    if c is None or window is not None or layer in c.skip_layers or T <= c.fix_kv_size + 1:
        plan.held[layer] = (held_uncompressed(T, window), per_token)
        plan.kept[layer] = (key[:, :, : T - 1], value[:, :, : T - 1], None)  # a sliding cache layer keeps its window
        return plain_attention(query, key, value, scaling, window).transpose(1, 2), None
    plan.held[layer] = (torch.arange(1, T, dtype=torch.float64).clamp(max=c.fix_kv_size), per_token)
    out, plan.kept[layer] = _replay(query, key, value, scaling, c, layer)
    return out.transpose(1, 2), None


def _replay(query, key, value, scaling, c: Compression, layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Queries 0..B see every earlier key; from then on each query sees the B kept keys and itself,
    and after it the strategy evicts one key per KV head (`eviction.evict_one`, i.e. `select`).
    Returns the outputs and the cache kept after token T-2 in the streaming engine's order:
    (keys, values, positions). A strategy that scores from keys and positions alone needs no
    attention inside the loop: its evictions give each key an expiry, and the masked engine's
    expiry attention computes the outputs in blocks."""
    if not c.strategy.needs_attention:
        exp, kept = _expiries(key, value, c, layer)
        return expiry_attention(query, key, value, exp, c.fix_kv_size, scaling), kept
    _, Hq, T, D = query.shape
    Hkv, head, budget, score = key.shape[1], c.fix_kv_size + 1, c.budget, c.strategy.score
    out = torch.empty_like(query)
    causal = torch.ones(head, head, dtype=torch.bool, device=key.device).tril()
    w = grouped_weights(query[:, :, :head], key[:, :, :head], scaling, causal)  # (1, Hkv, g, head, head)
    out[:, :, :head] = attend(w, value[:, :, :head])
    keys, values = (x[:, :, :head].clone(memory_format=torch.contiguous_format) for x in (key, value))  # the slots
    slots = torch.arange(head, device=key.device).expand(1, Hkv, head).clone()  # position held by each slot
    received = w.sum(dim=(2, 3)) if c.strategy.needs_attention_sum else None
    view = CacheView(keys, slots, layer, w[..., -1, :].flatten(1, 2), received)
    flat = torch.arange(Hkv, device=key.device) * head  # slot s of head h is row h * head + s
    scale = D**-0.5 if scaling is None else scaling
    grouped = (query[0] * scale).reshape(Hkv, Hq // Hkv, T, D).permute(2, 0, 1, 3).contiguous()  # (T, Hkv, g, D)
    outs = torch.empty(T - head, Hkv, Hq // Hkv, value.shape[-1], dtype=query.dtype, device=query.device)
    with _one_thread():  # a dozen tiny ops per token: threads only add overhead
        for t in range(head, T):
            free = evict_one(score(view), slots, t, budget)[0]  # after token t-1
            if t == T - 1:  # what streaming holds when it stops: token T-1 is only a target there
                kept = _in_streaming_order(c, view, values, t)
            rows = flat + free
            keys[0].view(-1, D).index_copy_(0, rows, key[0, :, t])
            values[0].view(-1, values.shape[-1]).index_copy_(0, rows, value[0, :, t])
            slots.view(-1).index_fill_(0, rows, t)
            w = torch.bmm(grouped[t], keys[0].transpose(1, 2)).softmax(dim=-1)  # (Hkv, g, head)
            torch.bmm(w, values[0], out=outs[t - head])
            view.attention = w.view(1, Hq, head)
            if received is not None:
                received.view(-1).index_fill_(0, rows, 0)
                received += w.sum(dim=1)
    out[0, :, head:] = outs.flatten(1, 2).transpose(0, 1)
    return out, kept


def _expiries(key, value, c: Compression, layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The eviction loop on keys alone: (1, Hkv, T) the first query that no longer sees each key
    (T: never evicted), and the cache kept after token T-2 as `_replay` returns it."""
    _, Hkv, T, D = key.shape
    head, budget, score = c.fix_kv_size + 1, c.budget, c.strategy.score
    keys = key[:, :, :head].clone(memory_format=torch.contiguous_format)
    slots = torch.arange(head, device=key.device).expand(1, Hkv, head).clone()
    exp = torch.full((Hkv, T), T, dtype=torch.long, device=key.device)
    view = CacheView(keys, slots, layer)
    flat = torch.arange(Hkv, device=key.device) * head
    with _one_thread():
        for t in range(head, T):
            free = evict_one(score(view), slots, t, budget)[0]  # after token t-1: query t no longer sees it
            if t == T - 1:
                values = value.gather(2, slots.unsqueeze(-1).expand(-1, -1, -1, value.shape[-1]))
                kept = _in_streaming_order(c, view, values, t)
            rows = flat + free
            exp.view(-1).index_fill_(0, slots.view(-1).index_select(0, rows) + flat // head * T, t)
            keys[0].view(-1, D).index_copy_(0, rows, key[0, :, t])
            slots.view(-1).index_fill_(0, rows, t)
    return exp.unsqueeze(0), kept


def _in_streaming_order(c: Compression, view: CacheView, values: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
    """The B slots kept after token length-1, ordered as `select` orders the streaming cache."""
    keep = select(c.strategy.score(view), view.positions, length, c.budget, c.sort_by_time)
    rows = keep.unsqueeze(-1)
    return (view.keys.gather(2, rows.expand(-1, -1, -1, view.keys.shape[-1])),
            values.gather(2, rows.expand(-1, -1, -1, values.shape[-1])), view.positions.gather(-1, keep))


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


AttentionInterface.register(ATTN, replay_attention)
AttentionMaskInterface.register(ATTN, no_mask)


@torch.no_grad()
def evaluate_replay(model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None):
    """One forward pass over (1, T); returns (logits (T, vocab), held tokens (T-1,), held bytes (T-1,),
    the compressed cache after token T-2, equal to the streaming engine's)."""
    T, plan = input_ids.shape[1], _Plan(compression, cache_windows(model))
    logits, tokens, nbytes = one_pass(model, input_ids, ATTN, plan)
    cache = DynamicCache(config=model.config)
    for layer, (keys, values, kept_positions) in sorted(plan.kept.items()):
        cache.update(keys, values, layer)
        if kept_positions is not None:
            cache.layers[layer].knorm_positions, cache.layers[layer].knorm_length = kept_positions, T - 1
    return logits, tokens, nbytes, cache
