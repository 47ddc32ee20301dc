"""Pruning a transformers cache in place to a fixed size per layer and KV head."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from knormpress.errors import ConfigError
from knormpress.eviction import select
from knormpress.rotary import Rotary
from knormpress.spec import Compression
from knormpress.strategies import CacheView

__all__ = ["CacheCompressor", "Compression", "LayerState", "build_cache", "cache_state", "fix_size_l2_compress"]  # Compression lives in knormpress.spec (no torch)


@dataclass
class LayerState:
    """What the compressor remembers of one cache layer between calls: the absolute positions of the
    tokens its last pruning kept, in cache order (None: never pruned, the layer holds tokens 0..n-1),
    how many tokens the layer had been fed then, and, for strategies with `needs_attention_sum`, the
    attention each cached token has received so far. Tokens appended since the last pruning are the
    next positions, in order."""

    positions: torch.Tensor | None = None
    length: int = 0
    attention_sum: torch.Tensor | None = None

    def positions_now(self, keys: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Absolute positions of the tokens cached in `keys` (batch, heads, n, D), and how many tokens
        the layer has been fed."""
        b, h, n, _ = keys.shape
        if self.positions is None:
            return torch.arange(n, device=keys.device).expand(b, h, n), n
        new = n - self.positions.shape[-1]
        fresh = torch.arange(self.length, self.length + new, device=keys.device).expand(b, h, new)
        return torch.cat([self.positions, fresh], dim=-1), self.length + new

    @staticmethod
    def stacked(states: Sequence[LayerState]) -> LayerState:
        """One layer's states of caches of one length, as one batch (rows in the order given)."""
        def cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)

        return LayerState(cat([s.positions for s in states]), states[0].length, cat([s.attention_sum for s in states]))


# The compressor's state, beside each cache rather than on transformers' layer objects: a cache is
# pruned again after every new token (`fix_size_l2_compress` on a bare cache too), and the entry goes
# when the cache does.
_STATES: weakref.WeakKeyDictionary[DynamicCache, dict[int, LayerState]] = weakref.WeakKeyDictionary()


def cache_state(cache: DynamicCache) -> dict[int, LayerState]:
    """The compressor's state of each layer of `cache` it has compressed (layer index -> state)."""
    return _STATES.setdefault(cache, {})


def build_cache(config: Any, layers: Iterable[tuple[torch.Tensor, torch.Tensor, LayerState | None]]) -> DynamicCache:
    """A DynamicCache for a model with `config`, holding per layer (keys, values) and the compressor's
    state of that layer (None: none yet; a copy is kept, so caches never share one): how an engine
    hands over a cache it compressed itself."""
    cache = DynamicCache(config=config)
    for idx, (keys, values, state) in enumerate(layers):
        cache.update(keys, values, idx)
        if state is not None:
            cache_state(cache)[idx] = replace(state)
    return cache


class CacheCompressor:
    """Applies one `Compression` to a `DynamicCache` step after step.

    The absolute position of every cached token is remembered beside the cache (`cache_state`) so
    the recent window, sinks, ties and the random strategy stay right after reordering; tokens the
    model appended since the last call are new positions, in order. A layer is pruned once it holds
    fix_kv_size + interval tokens.

    With `positions="rerotate"` every key of a compressed layer is rotated at its index in the
    cache: pruning rotates each kept key from its old index to its new one with `rotary` (the
    model's own rotary embedding), and the engines' attention puts each new token at the next
    index (`knormpress.engines.streaming.shift_new_tokens`). A static strategy scores each key
    rotated back to its true position, where the model computed it: its score then never changes
    (a norm is the same at any index in exact arithmetic, but not after float rounding), which is
    what lets the replay engine compute the evictions once (`knormpress.engines.rerotated`).
    """

    def __init__(self, compression: Compression, rotary: Rotary | None = None) -> None:
        compression.budget  # noqa: B018  (a ratio must be resolved to tokens first: fails with one line)
        if compression.positions == "rerotate" and rotary is None:
            raise ConfigError("positions='rerotate' moves keys with the model's rotary embedding, which a bare cache "
                              "does not hold; run it through knormpress.evaluate or knormpress.run_engine")
        self.compression = compression
        self.rotary = rotary if compression.positions == "rerotate" else None

    def __call__(self, cache: DynamicCache, attention: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        """Prune every compressed layer of `cache` to the budget. `attention`: per layer, the last
        query's weights and the weights summed since the last call (the engine records them for
        strategies with `needs_attention`); their running sum is kept in the layer's state for
        strategies with `needs_attention_sum`."""
        layers = _dynamic_layers(cache)
        c = self.compression
        if layers:  # a fresh DynamicCache() grows its layers lazily
            c.check_layers(len(layers))
        states = cache_state(cache)
        for idx, layer in enumerate(layers):
            if idx in c.skip_layers or layer.is_sliding or not layer.is_initialized:
                continue  # a sliding-window layer already holds at most its window
            state = states.setdefault(idx, LayerState())
            last, total = (attention or {}).get(idx, (None, None))
            if not c.strategy.needs_attention_sum:
                total = None  # only a strategy that reads the running sum keeps it
            if total is not None:
                total = state.attention_sum = _accumulate(state.attention_sum, total)
            if layer.keys.shape[-2] < c.fix_kv_size + c.interval:
                continue
            if c.strategy.needs_attention and last is None:
                raise ConfigError(
                    f"strategy {c.strategy.name!r} scores tokens by the attention they receive, which a bare cache "
                    "does not hold; run it through knormpress.evaluate or knormpress.run_engine"
                )
            positions, length = state.positions_now(layer.keys)
            keys = layer.keys
            if self.rotary is not None and c.strategy.static:  # a static score is the key's at its true position
                keys = self.rotary.shift(keys, positions - torch.arange(keys.shape[-2], device=keys.device), idx)
            scores = c.strategy.score(CacheView(keys, positions, idx, last, total, length=length))
            keep = select(scores, positions, length, c.budget, c.sort_by_time)
            if total is not None:
                state.attention_sum = total.gather(-1, keep)
            layer.keys = layer.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.values.shape[-1]))
            if self.rotary is not None:  # each kept key from its old index to its new one
                layer.keys = self.rotary.shift(layer.keys, torch.arange(keep.shape[-1], device=keep.device) - keep, idx)
            state.positions, state.length = positions.gather(-1, keep), length
        return cache



def _accumulate(previous: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Attention received so far, aligned with the cache: tokens appended since the last call start at 0."""
    if previous is None:
        return new.clone()
    return new + torch.nn.functional.pad(previous, (0, new.shape[-1] - previous.shape[-1]))


def _dynamic_layers(cache: object) -> list[DynamicLayer]:
    """The layers of a DynamicCache: full layers (compressed) and sliding-window ones (left to transformers)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not all(
        type(l) in (DynamicLayer, DynamicSlidingWindowLayer) for l in layers
    ):
        raise ConfigError(
            f"cannot compress a {type(cache).__name__}; pass a transformers DynamicCache with full or "
            "sliding-window layers, e.g. the `past_key_values` of model(..., use_cache=True)"
        )
    return layers


def fix_size_l2_compress(
    past_key_values: DynamicCache, compression: Compression | None = None, **settings: Any
) -> DynamicCache:
    """Prune `past_key_values` in place to `fix_kv_size` tokens per layer and KV head.

    Pass a `Compression`, or its fields as keywords, as the seed wrote it:
    `fix_size_l2_compress(cache, fix_kv_size=512, keep_ratio=0.5, strategy="keep_low", skip_layers=[0, 1])`.
    `keep_ratio` of the budget holds the most recent tokens, the rest goes to the older tokens
    the strategy scores best (see `knormpress.eviction` for the exact rule). Layers in
    `skip_layers` stay whole, and sliding-window layers (Gemma 3's local layers) keep the window
    transformers gives them. Call it again after each new token to keep the size fixed.
    """
    if compression is None:
        compression = Compression.from_dict(settings)
    elif settings:
        raise ConfigError(f"pass either a Compression or its settings, not both (got {', '.join(sorted(settings))})")
    return CacheCompressor(compression)(past_key_values)
