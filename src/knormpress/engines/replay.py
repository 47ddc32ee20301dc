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

The replay keeps B + interval slots per KV head: a token that joins takes a slot freed by the
last pruning, so nothing is copied; attention does not depend on the order of keys. Under
positions=rerotate the order does matter, through the rotation: each slot remembers the index its
key is rotated at in the streaming cache, and each pruning rotates the kept keys to their new
indices, as the token-by-token engine does with its real cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from knormpress.compression import Compression
from knormpress.engines.attention import (PLAN, attend, attention_implementation, cache_windows, grouped_weights,
                                          held_uncompressed, layer_window, plain_attention)
from knormpress.eviction import evict_one, held_counts, select
from knormpress.rotary import Rotary
from knormpress.strategies import CacheView

ATTN = "knorm_replay"


@dataclass
class _Plan:
    compression: Compression | None
    windows: list[int | None]  # per layer: the window of a sliding layer in transformers' cache, else None
    rotary: Rotary | None = None  # positions=rerotate: the model's rotary embedding
    held: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # layer -> (tokens, bytes/token)
    kept: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer -> (keys, values, positions)


def replay_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of query (1, Hq, T, D) over key/value (1, Hkv, T, D) under the eviction rule, replayed."""
    plan = PLAN.get()
    if not isinstance(plan, _Plan):
        raise RuntimeError(f"the {ATTN!r} attention only runs inside knormpress.run_engine(engine='replay')")
    T, layer, c = query.shape[2], module.layer_idx, plan.compression
    per_token = key.shape[1] * (key.shape[-1] * key.element_size() + value.shape[-1] * value.element_size())
    window = layer_window(kwargs, layer, plan.windows, "replay")
    if c is None or window is not None or layer in c.skip_layers or T <= c.fix_kv_size + c.interval:
        plan.held[layer] = (held_uncompressed(T, window), per_token)
        plan.kept[layer] = (key[:, :, : T - 1], value[:, :, : T - 1], None)  # a sliding cache layer keeps its window
        return plain_attention(query, key, value, scaling, window).transpose(1, 2), None
    plan.held[layer] = (held_counts(T, c.budget, c.interval), per_token)
    out, plan.kept[layer] = _replay(query, key, value, scaling, c, layer, plan.rotary)
    return out.transpose(1, 2), None


def _replay(query, key, value, scaling, c: Compression, layer: int,
            rotary: Rotary | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Queries 0..B+I-1 (I = interval) see every earlier key; from then on the cache has B + I slots
    per KV head: each token takes a free slot and its query attends to the filled ones, and once all
    are filled (the streaming cache holds B + I) the strategy frees I of them, the ones `select`
    drops (for I = 1 `evict_one`: the same token, without select's sorts). Under rerotate each slot
    also remembers the index its key is rotated at, pruning moves the kept keys to their indices in
    `select`'s order, and the new token and its query take the next index.
    Returns the outputs and the cache kept after token T-2 in the streaming engine's order:
    (keys, values, positions)."""
    _, Hq, T, D = query.shape
    Hkv, I = key.shape[1], c.interval
    head, B = c.fix_kv_size + I, c.fix_kv_size
    out = torch.empty_like(query)
    causal = torch.ones(head, head, dtype=torch.bool, device=key.device).tril()
    w = grouped_weights(query[:, :, :head], key[:, :, :head], scaling, causal)  # (1, Hkv, g, head, head)
    out[:, :, :head] = attend(w, value[:, :, :head])
    keys, values = (x[:, :, :head].clone(memory_format=torch.contiguous_format) for x in (key, value))  # the slots
    slots = torch.arange(head, device=key.device).expand(1, Hkv, head).clone()  # position held by each slot
    rotated = slots.clone() if rotary is not None else None  # index each slot's key is rotated at
    live = torch.ones(Hkv, head, dtype=torch.bool, device=key.device)  # slots filled (all but after a pruning)
    received = w.sum(dim=(2, 3)) if c.strategy.needs_attention else None
    view = CacheView(keys, slots, layer, w[..., -1, :].flatten(1, 2), received)
    flat = torch.arange(Hkv, device=key.device) * head  # slot s of head h is row h * head + s
    scale = D**-0.5 if scaling is None else scaling
    grouped = (query[0] * scale).reshape(Hkv, Hq // Hkv, T, D).permute(2, 0, 1, 3).contiguous()  # (T, Hkv, g, D)
    outs = torch.empty(T - head, Hkv, Hq // Hkv, value.shape[-1], dtype=query.dtype, device=query.device)
    filled, order = head, None
    with _one_thread():  # a dozen tiny ops per token: threads only add overhead
        for t in range(head, T):
            if filled == head:  # the cache holds B + I after token t-1: prune
                if I == 1 and rotary is None and t < T - 1:
                    free = evict_one(c.strategy.score(view), slots, t, c.budget)[0].unsqueeze(-1)
                else:
                    order = select(c.strategy.score(view), slots, t, c.budget, c.sort_by_time)  # (1, Hkv, B)
                    free = _dropped(order, head)
                    if rotary is not None:
                        _move_to_indices(rotary, keys, rotated, order, flat, layer)
                live.view(-1).index_fill_(0, (flat.unsqueeze(-1) + free).view(-1), False)
                filled = B
            if t == T - 1:  # what streaming holds when it stops: token T-1 is only a target there
                kept = _gathered(torch.cat([order[0], free[:, : filled - B]], dim=-1), keys, values, slots)
            rows = flat + free[:, filled - B]
            new_key, q = key[0, :, t], grouped[t]
            if rotary is not None:  # token t takes index `filled`, not its true position
                new_key, q = rotary.shift(new_key, filled - t, layer), rotary.shift(q, filled - t, layer)
                rotated.view(-1).index_fill_(0, rows, filled)
            keys[0].view(-1, D).index_copy_(0, rows, new_key)
            values[0].view(-1, values.shape[-1]).index_copy_(0, rows, value[0, :, t])
            slots.view(-1).index_fill_(0, rows, t)
            live.view(-1).index_fill_(0, rows, True)
            filled += 1
            logits = torch.bmm(q, keys[0].transpose(1, 2))  # (Hkv, g, head)
            if filled < head:
                logits = logits.masked_fill(~live.unsqueeze(1), float("-inf"))
            w = logits.softmax(dim=-1)
            torch.bmm(w, values[0], out=outs[t - head])
            view.attention = w.view(1, Hq, head)
            if received is not None:
                received.view(-1).index_fill_(0, rows, 0)
                received += w.sum(dim=1)
    out[0, :, head:] = outs.flatten(1, 2).transpose(0, 1)
    return out, kept


def _dropped(order: torch.Tensor, n_slots: int) -> torch.Tensor:
    """(Hkv, I) the slots `select` did not keep (order: (1, Hkv, B)), ascending."""
    dropped = torch.ones(order.shape[1], n_slots, dtype=torch.bool, device=order.device)
    dropped.scatter_(-1, order[0], False)
    return dropped.nonzero()[:, 1].view(order.shape[1], -1)


def _move_to_indices(rotary: Rotary, keys: torch.Tensor, rotated: torch.Tensor, order: torch.Tensor, flat: torch.Tensor,
                     layer: int) -> None:
    """Rotate the kept keys (slots `order`, (1, Hkv, B)) from their current index to their index in
    `order`. Whole rows of the flattened slots (row h * n_slots + s), which index_select copies fast."""
    rows = (flat.unsqueeze(-1) + order[0]).view(-1)
    index = torch.arange(order.shape[-1], device=order.device).repeat(order.shape[1])
    table = keys[0].view(-1, keys.shape[-1])
    moved = rotary.shift(table.index_select(0, rows), index - rotated.view(-1).index_select(0, rows), layer)
    table.index_copy_(0, rows, moved)
    rotated.view(-1).index_copy_(0, rows, index)


def _gathered(order: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(keys, values, positions) of the slots `order` (Hkv, n), in that order."""
    rows = order.unsqueeze(0).unsqueeze(-1)
    return (keys.gather(2, rows.expand(-1, -1, -1, keys.shape[-1])), values.gather(2, rows.expand(-1, -1, -1, values.shape[-1])),
            slots.gather(-1, order.unsqueeze(0)))


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _no_mask(*args, **kwargs) -> None:
    """Masks are built inside `replay_attention`; skip transformers' T x T mask."""
    return None


AttentionInterface.register(ATTN, replay_attention)
AttentionMaskInterface.register(ATTN, _no_mask)


@torch.no_grad()
def evaluate_replay(model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None):
    """One forward pass over (1, T); returns (logits (T, vocab), held tokens (T-1,), held bytes (T-1,),
    the compressed cache after token T-2, equal to the streaming engine's)."""
    T = input_ids.shape[1]
    rotary = Rotary(model) if compression is not None and compression.positions == "rerotate" else None
    with attention_implementation(model, ATTN, _Plan(compression, cache_windows(model), rotary)) as plan:
        positions = torch.arange(T, device=input_ids.device).unsqueeze(0)
        logits = model(input_ids=input_ids, position_ids=positions, use_cache=False).logits[0]
    tokens = torch.stack([t for t, _ in plan.held.values()])
    nbytes = sum(t * b for t, b in plan.held.values())
    cache = DynamicCache(config=model.config)
    for layer, (keys, values, kept_positions) in sorted(plan.kept.items()):
        cache.update(keys, values, layer)
        if kept_positions is not None:  # as CacheCompressor leaves it: positions kept by the last pruning,
            fresh = keys.shape[-2] - compression.fix_kv_size  # then the tokens appended since
            cache.layers[layer].knorm_positions = kept_positions[..., : compression.fix_kv_size]
            cache.layers[layer].knorm_length = T - 1 - fresh
    return logits, tokens.mean(0), nbytes, cache
