"""The exact one-pass engine for any strategy: each layer replays its own eviction.

A layer's eviction depends only on that layer's queries, keys and values, and those depend only
on the layers below. So inside one forward pass, once the attention function is handed a layer's
exact inputs, it can replay the token-by-token rule query by query (attention only: no MLP, no
projections, no other layer) and return exactly the outputs the streaming engine computes. This
holds for any strategy that scores from the layer's own cache view (`Strategy.score(view)`); one
whose state is shared across layers or steps in call order (`random_per_step`, one generator for
all layers) is not `replayable` and runs token by token.

Under positions=rerotate a static strategy kept in time order needs no step loop at all: its
evictions are computed once and its logits rotated per block (`knormpress.engines.rerotated`).

Layers that are not compressed (skipped, sliding-window, or shorter than the budget) attend
through `plain_attention`, a sliding layer with the window the model passes, as in the masked engine.

"Exactly" means in exact arithmetic (the float64 tests); in float32 a near-tie in the scores can
be decided differently than token by token, as for the masked engine (`diagnostics/agreement.py`).

The replay keeps B + interval slots per KV head (`_Slots`): a token that joins takes a slot freed by
the last pruning, so nothing is copied; attention does not depend on the order of keys. Under
positions=rerotate the order does matter, through the rotation: each slot remembers the index its
key is rotated at in the streaming cache, and each pruning rotates the kept keys to their new
indices, as the token-by-token engine does with its real cache.

A strategy that scores from keys and positions alone (`needs_attention` false) under true positions
needs no attention inside the loop: the slots replay the evictions on keys, each key gets the first
query that no longer sees it, and the masked engine's `expiry_attention` computes the outputs in blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from knormpress.compression import Compression, LayerState, build_cache
from knormpress.engines.base import Engine, EngineOutput, OnePassPlan, one_pass, plan_of, register_engine
from knormpress.engines.maths import (attend, bytes_per_token, cache_windows, cap, compresses, grouped_weights,
                                      held_uncompressed, layer_window, no_mask, plain_attention)
from knormpress.engines.masked import expiry_attention
from knormpress.engines.rerotated import rerotated_attention, rerotated_kept, static_scores
from knormpress.eviction import evict_one, expiry, held_counts, select
from knormpress.rotary import Rotary
from knormpress.strategies import CacheView

ATTN = "knorm_replay"


@register_engine
@dataclass
class Replay(Engine):
    """One forward pass in which each compressed layer replays its own eviction: any replayable
    strategy, either position policy, any interval; ends with the streaming engine's cache."""

    name = "replay"

    def refuses(self, compression: Compression | None, model: PreTrainedModel | None = None) -> str | None:
        if compression is not None and not compression.strategy.replayable:
            return f"strategy {compression.strategy.name!r} keeps state across layers"
        if compression is not None and compression.strategy.needs_next_query and compression.positions != "true":
            return (f"strategy {compression.strategy.name!r} ranks by the next query's attention, which under "
                    f"positions={compression.positions!r} depends on the pruning it ranks for")
        return None

    @torch.no_grad()
    def run(self, model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression | None,
            progress: bool = False) -> EngineOutput:
        """The cache it returns is the streaming engine's after token T-2: per compressed layer the
        kept keys, values, positions and attention received, in the streaming cache's order."""
        T = input_ids.shape[1]
        rotary = Rotary(model) if compression is not None and compression.positions == "rerotate" else None
        plan = _Plan(compression, cache_windows(model), rotary=rotary)
        logits, tokens, nbytes = one_pass(model, input_ids, ATTN, plan)
        return EngineOutput(logits, tokens, nbytes, self.name, build_cache(model.config, (
            (keys, values, _state(compression, T, keys, positions, received))
            for _, (keys, values, positions, received) in sorted(plan.kept.items()))))


def _state(c: Compression | None, T: int, keys: torch.Tensor, positions: torch.Tensor | None,
           received: torch.Tensor | None) -> LayerState | None:
    """A compressed layer's state as `CacheCompressor` leaves it after token T-2: the positions kept
    by the last pruning (the tokens appended since follow them), the tokens fed by then, and the
    attention each cached token received (attention-sum strategies). None for an uncompressed layer."""
    if positions is None:
        return None
    fresh = keys.shape[-2] - c.fix_kv_size
    return LayerState(positions[..., : c.fix_kv_size], T - 1 - fresh, received)


@dataclass
class _Plan(OnePassPlan):
    rotary: Rotary | None = None  # positions=rerotate: the model's rotary embedding
    kept: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # layer -> (keys, values, positions, attention sum)


def replay_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of query (1, Hq, T, D) over key/value (1, Hkv, T, D) under the eviction rule, replayed."""
    plan = plan_of(kwargs, _Plan, ATTN)
    T, layer, c = query.shape[2], module.layer_idx, plan.compression
    per_token = bytes_per_token(key, value)
    window, softcap = layer_window(kwargs, layer, plan.windows, "replay"), kwargs.get("softcap")
    if not compresses(c, layer, T, window):
        plan.held[layer] = (held_uncompressed(T, window), per_token)
        plan.kept[layer] = (key[:, :, : T - 1], value[:, :, : T - 1], None, None)  # a sliding cache layer keeps its window
        return plain_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None
    plan.held[layer] = (held_counts(T, c.budget, c.interval), per_token)
    if plan.rotary is not None and c.strategy.static and c.sort_by_time:  # no step loop needed
        exp = expiry(static_scores(key, c.strategy, layer), c.budget, c.interval)
        plan.kept[layer] = rerotated_kept(key, value, exp, plan.rotary, layer)
        return rerotated_attention(query, key, value, exp, c.fix_kv_size, plan.rotary, layer, scaling,
                                   softcap).transpose(1, 2), None
    with _one_thread():  # a dozen tiny ops per token: threads only add overhead
        if c.strategy.needs_attention or c.strategy.needs_next_query or plan.rotary is not None:
            fixed = static_scores(key, c.strategy, layer) if plan.rotary is not None and c.strategy.static else None
            out, plan.kept[layer] = _replay(query, key, value, scaling, softcap, _Slots(key, c, layer, plan.rotary, fixed))
        else:
            exp, plan.kept[layer] = _expiries(key, value, _Slots(key, c, layer))
            out = expiry_attention(query, key, value, exp, c.fix_kv_size, scaling, softcap)
    return out.transpose(1, 2), None


class _Slots:
    """One layer's cache as the streaming engine holds it, in B + I slots per KV head (I = interval):
    the key in each slot (rotated to the slot's index in the streaming cache under rerotate), the
    position it holds, and the slots the last pruning freed. Once all are filled (the streaming cache
    holds B + I) the strategy frees I of them, the ones `select` drops (for I = 1 `evict_one`: the
    same token, without select's sorts); under rerotate the kept keys move to their indices in
    `select`'s order, and each new token takes the next index. Under rerotate with interval 1 in
    time order, the keys after the evicted one move back one index, and only those are rotated."""

    def __init__(self, key: torch.Tensor, c: Compression, layer: int, rotary: Rotary | None = None,
                 fixed: torch.Tensor | None = None) -> None:
        _, Hkv, self.T, _ = key.shape
        self.fixed = fixed  # (1, Hkv, T) static scores by position (rerotate: from the keys at their true positions)
        self.c, self.layer, self.rotary, self.key = c, layer, rotary, key
        self.B, self.n = c.fix_kv_size, c.fix_kv_size + c.interval
        self.keys = key[:, :, : self.n].clone(memory_format=torch.contiguous_format)
        self.positions = torch.arange(self.n, device=key.device).expand(1, Hkv, self.n).clone()
        self.shifting = rotary is not None and c.interval == 1 and c.sort_by_time  # the one-back shift above
        self.rotated = self.positions[0].clone() if rotary is not None and not self.shifting else None  # (Hkv, n) index each slot's key is rotated at
        self.flat = torch.arange(Hkv, device=key.device) * self.n  # slot s of head h is row h * n + s
        self.view = CacheView(self.keys, self.positions, layer)
        self.key_rows, self.position_rows = self.keys[0].view(-1, self.keys.shape[-1]), self.positions.view(-1)
        self.filled, self.order, self.rows = self.n, None, None
        self.free = None  # (Hkv, I) the slots select's last pruning freed: what hidden and kept read

    def prune(self, t: int) -> torch.Tensor | None:
        """Before query t: if the cache is full, free I slots per KV head and return their rows
        (I, Hkv) in the flattened slots, the ones the next I tokens take."""
        if self.filled < self.n:
            return None
        c = self.c
        self.view.length = t
        if self.shifting:
            self._evict_and_shift(evict_one(self._score(), self.positions, t, c.budget)[0])
        elif c.interval == 1 and self.rotary is None and t < self.T - 1:
            self.rows = (self.flat + evict_one(self._score(), self.positions, t, c.budget)[0]).unsqueeze(0)
        else:
            self.order = select(self._score(), self.positions, t, c.budget, c.sort_by_time)  # (1, Hkv, B)
            self.free = _dropped(self.order, self.n)
            if self.rotary is not None:
                self._move_to_indices()
            self.rows = (self.flat.unsqueeze(-1) + self.free).t().contiguous()
        self.filled = self.B
        return self.rows

    def _score(self) -> torch.Tensor:
        return self.c.strategy.score(self.view) if self.fixed is None else self.fixed.gather(-1, self.positions)

    def admit(self, t: int, query: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token t takes the next free slot; returns the slots' rows and its query (Hkv, g, D), which
        under rerotate moves with its key from its true position to its index."""
        rows = self.rows[self.filled - self.B]
        new_key = self.key[0, :, t]
        if self.rotary is not None:  # token t takes index `filled`, not its true position: one rotation for both
            both = new_key.unsqueeze(1) if query is None else torch.cat([query, new_key.unsqueeze(1)], dim=1)
            both = self.rotary.shift(both, self.filled - t, self.layer)
            query, new_key = both[:, :-1], both[:, -1]
            if self.rotated is not None:
                self.rotated.view(-1).index_fill_(0, rows, self.filled)
        self.key_rows.index_copy_(0, rows, new_key)
        self.position_rows.index_fill_(0, rows, t)
        self.filled += 1
        return rows, query

    def hidden(self) -> torch.Tensor | None:
        """(Hkv, k) the slots freed and not yet refilled, which no query may see (None: none)."""
        return None if self.filled == self.n else self.free[:, self.filled - self.B:]

    def kept(self, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(keys, values, positions, attention received or None) the streaming cache holds now: the
        slots the last pruning kept in `select`'s order, then the ones filled since."""
        order = torch.cat([self.order[0], self.free[:, : self.filled - self.B]], dim=-1).unsqueeze(0)  # (1, Hkv, n)
        positions = self.positions.gather(-1, order)
        keys = self.keys.gather(2, order.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1]))
        received = None if self.view.attention_sum is None else self.view.attention_sum.gather(-1, order)
        return keys, value.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, value.shape[-1])), positions, received

    def _move_to_indices(self) -> None:
        """Rotate the kept keys (slots `order`) from their current index to their index in `order`;
        a key that stays put is left alone (a rotation by 0 would return it unchanged). Whole rows
        of the flattened slots, which index_select copies fast."""
        rows = (self.flat.unsqueeze(-1) + self.order[0]).view(-1)
        index = torch.arange(self.B, device=rows.device).repeat(self.flat.shape[0])
        delta = index - self.rotated.view(-1).index_select(0, rows)
        moving = delta.nonzero().squeeze(-1)
        rows, index, delta = rows[moving], index[moving], delta[moving]
        self.key_rows.index_copy_(0, rows, self.rotary.shift(self.key_rows.index_select(0, rows), delta, self.layer))
        self.rotated.view(-1).index_copy_(0, rows, index)

    def _evict_and_shift(self, evicted: torch.Tensor) -> None:
        """Rerotate, interval 1, time order: drop slot `evicted` (Hkv,) from the cache's index order
        (the kept slots, then the slot filled since); the keys after it move back one index, as
        select's time order puts them in the streaming cache."""
        Hkv, n = self.flat.shape[0], self.n
        lineup = (torch.arange(n, device=evicted.device).expand(Hkv, n) if self.order is None
                  else torch.cat([self.order[0], self.free], dim=-1))  # (Hkv, n) slots by index
        index = torch.arange(n, device=evicted.device)
        at = (lineup == evicted.unsqueeze(-1)).int().argmax(dim=-1, keepdim=True)  # (Hkv, 1) the evicted slot's index
        rows = (self.flat.unsqueeze(-1) + lineup)[index > at]
        self.key_rows.index_copy_(0, rows, self.rotary.shift(self.key_rows.index_select(0, rows), -1, self.layer))
        self.order = lineup[index != at].view(1, Hkv, self.B)
        self.free = evicted.unsqueeze(-1)
        self.rows = (self.flat + evicted).unsqueeze(0)


def _dropped(order: torch.Tensor, n_slots: int) -> torch.Tensor:
    """(Hkv, I) the slots `select` did not keep (order: (1, Hkv, B)), ascending."""
    dropped = torch.ones(order.shape[1], n_slots, dtype=torch.bool, device=order.device)
    dropped.scatter_(-1, order[0], False)
    return dropped.nonzero()[:, 1].view(order.shape[1], -1)


def _replay(query, key, value, scaling, softcap, slots: _Slots) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Queries 0..B+I-1 see every earlier key; from then on each query attends to the filled slots
    (logits capped by `softcap` where the model caps them), and the strategy reads its attention for the next pruning. Returns the outputs and the cache
    kept after token T-2 in the streaming engine's order: (keys, values, positions, attention sum)."""
    _, Hq, T, D = query.shape
    Hkv, head, g = key.shape[1], slots.n, Hq // key.shape[1]
    out = torch.empty_like(query)
    causal = torch.ones(head, head, dtype=torch.bool, device=key.device).tril()
    w = grouped_weights(query[:, :, :head], key[:, :, :head], scaling, causal, softcap)  # (1, Hkv, g, head, head)
    out[:, :, :head] = attend(w, value[:, :, :head])
    values = value[:, :, :head].clone(memory_format=torch.contiguous_format)
    value_rows = values[0].view(-1, values.shape[-1])
    received = w.sum(dim=(2, 3)) if slots.c.strategy.needs_attention_sum else None
    slots.view.attention, slots.view.attention_sum = w[..., -1, :].flatten(1, 2), received
    scale = D**-0.5 if scaling is None else scaling
    grouped = (query[0] * scale).reshape(Hkv, g, T, D).permute(2, 0, 1, 3).contiguous()  # (T, Hkv, g, D)
    outs = torch.empty(T - head, Hkv, g, value.shape[-1], dtype=query.dtype, device=query.device)
    for t in range(head, T):
        if slots.c.strategy.needs_next_query and slots.filled == slots.n:  # a pruning comes: show it query t
            slots.view.next_attention = _next_attention(grouped[t], key[0, :, t], slots.keys[0], softcap)
        slots.prune(t)
        if t == T - 1:  # what streaming holds when it stops: token T-1 is only a target there
            kept = slots.kept(value)
        rows, q = slots.admit(t, grouped[t])
        value_rows.index_copy_(0, rows, value[0, :, t])
        logits = cap(torch.bmm(q, slots.keys[0].transpose(1, 2)), softcap)  # (Hkv, g, head)
        hidden = slots.hidden()
        if hidden is not None:
            logits.scatter_(-1, hidden.unsqueeze(1).expand(-1, g, -1), float("-inf"))
        w = logits.softmax(dim=-1)
        torch.bmm(w, values[0], out=outs[t - head])
        slots.view.attention = w.view(1, Hq, head)
        if received is not None:
            received.view(-1).index_fill_(0, rows, 0)
            received += w.sum(dim=1)
    out[0, :, head:] = outs.flatten(1, 2).transpose(0, 1)
    return out, kept


def _next_attention(query: torch.Tensor, own: torch.Tensor, keys: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """(1, Hkv, n) the attention query t (Hkv, g, D, scaled) gives each of the n cached keys (Hkv, n, D)
    before the pruning that precedes it: softmax over them and its own key `own` (Hkv, D), summed
    over the g query heads of each KV group (`CacheView.next_attention`, true positions only)."""
    logits = torch.cat([torch.bmm(query, keys.transpose(1, 2)), torch.bmm(query, own.unsqueeze(-1))], dim=-1)
    return cap(logits, softcap).softmax(dim=-1)[..., :-1].sum(dim=1).unsqueeze(0)


def _expiries(key, value, slots: _Slots) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The eviction loop on keys alone: (1, Hkv, T) the first query that no longer sees each key
    (T: never evicted), and the cache kept after token T-2 as `_replay` returns it. The cached keys
    never change here, so each slot also keeps its key's norm for the scores (`CacheView.norms`)."""
    _, Hkv, T, _ = key.shape
    exp = torch.full((Hkv * T,), T, dtype=torch.long, device=key.device)
    base = torch.arange(Hkv, device=key.device) * T  # row h of exp starts at h * T
    norms = torch.linalg.vector_norm(key[0].float(), dim=-1)  # (Hkv, T)
    slots.view.key_norms = norms[:, : slots.n].clone().unsqueeze(0)
    norm_rows = slots.view.key_norms.view(-1)
    for t in range(slots.n, T):
        rows = slots.prune(t)
        if rows is not None:  # query t no longer sees the keys in the freed slots
            exp.index_fill_(0, (slots.position_rows[rows] + base).view(-1), t)
        if t == T - 1:
            kept = slots.kept(value)
        rows, _ = slots.admit(t)
        norm_rows.index_copy_(0, rows, norms[:, t])
    return exp.view(1, Hkv, T), kept


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
