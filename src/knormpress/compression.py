"""Pruning a transformers cache in place to a fixed size per layer and KV head."""

from __future__ import annotations

import functools
import logging
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from knormpress.errors import ConfigError, choose
from knormpress.eviction import Budget, select
from knormpress.registry import settings
from knormpress.rotary import Rotary
from knormpress.strategies import CacheView, Strategy, get_strategy

WHEN = ("prefill", "streaming")  # compress.when: prune once after the prompt, or keep within budget while reading
POSITIONS = ("true", "rerotate")  # see the README, "Positions after pruning"
log = logging.getLogger("knormpress")


@dataclass
class Compression:
    """The compression spec: the one list of settings that the library call, both engines, the
    Hydra `compress` node and the MLflow params share. Validated on creation, so mistakes
    surface before any model work. `strategy` is a name, a `{name: ..., <setting>: ...}` node or
    a `Strategy` instance; it is stored as the instance.

    The budget is given once: `fix_kv_size` (tokens per layer and KV head) or `ratio` (the share
    of a prompt's tokens to drop: 0.9 keeps 10%, resolved per prompt by `resolved`), the other
    None. `when`: "streaming" keeps the cache within the budget while the text is read;
    "prefill" reads a prompt whole, prunes once, then decodes under the budget (retrieval tasks)."""

    strategy: Strategy | str | Mapping[str, Any] = "keep_low"
    fix_kv_size: int | None = 512
    keep_ratio: float = 0.5
    skip_layers: Sequence[int] = (0, 1)
    sort_by_time: bool = True
    n_sink: int = 0
    positions: str = "true"  # POSITIONS: where kept keys sit after pruning (true positions or re-rotated to slots)
    interval: int = 1  # prune back to fix_kv_size once the cache reaches fix_kv_size + interval tokens
    when: str = "streaming"
    ratio: float | None = None

    def __post_init__(self) -> None:
        self.strategy = get_strategy(self.strategy)
        if self.positions is True:  # YAML and Hydra read `positions: true` as a boolean
            self.positions = "true"
        choose("positions", self.positions, POSITIONS)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"interval must be an integer >= 1 (1: prune after every token), got {self.interval!r}")
        if (self.fix_kv_size is None) == (self.ratio is None):
            given = f"fix_kv_size={self.fix_kv_size}, ratio={self.ratio}"
            raise ConfigError(f"give the budget once, as fix_kv_size (tokens) or ratio (share of the prompt dropped), "
                              f"the other null; got {given}")
        if self.fix_kv_size is not None and (isinstance(self.fix_kv_size, bool) or not isinstance(self.fix_kv_size, int)
                                             or self.fix_kv_size < 1):
            raise ConfigError(f"fix_kv_size must be an integer >= 1, got {self.fix_kv_size!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 < self.ratio < 1):
            raise ConfigError(f"ratio must lie in (0, 1) (0.9 drops 90% of the prompt's tokens), got {self.ratio!r}")
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not 0 <= self.keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must lie in [0, 1], got {self.keep_ratio!r}")
        limit = self.fix_kv_size or 1 << 62
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or not 0 <= self.n_sink < limit:
            raise ConfigError(f"n_sink must be an integer in [0, fix_kv_size={self.fix_kv_size}), got {self.n_sink!r}")
        choose("compress.when", self.when, WHEN)
        if self.strategy.needs_sinks and self.n_sink < 1:
            raise ConfigError(f"strategy {self.strategy.name!r} needs n_sink >= 1 (e.g. n_sink=4), got {self.n_sink}")
        if not isinstance(self.sort_by_time, bool):
            raise ConfigError(f"sort_by_time must be true or false, got {self.sort_by_time!r}")
        if isinstance(self.skip_layers, (str, bytes)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.skip_layers):
            raise ConfigError(f"skip_layers must be a list of layer indices >= 0, got {self.skip_layers!r}")
        self.skip_layers = tuple(sorted(set(self.skip_layers)))
        self.keep_ratio = float(self.keep_ratio)
        no_window = self.keep_ratio == 0 or (self.fix_kv_size is not None and self.budget.n_recent == 0)
        if no_window and (why := self.strategy.without_recent_window()):
            _advise(f"{self.strategy.label} with keep_ratio={self.keep_ratio:g} keeps no recent window: {why}")

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> Compression:
        """Build from a config node, naming the valid keys when one is unknown."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(node) - set(valid))
        if unknown:
            raise ConfigError(f"compress has no setting {unknown[0]!r}; its settings are: {', '.join(valid)}")
        return cls(**node)

    def to_dict(self) -> dict[str, Any]:
        """The config node that rebuilds this spec (strategy settings filled in): what runs log."""
        node = {f.name: getattr(self, f.name) for f in fields(self)}
        return node | {"strategy": settings(self.strategy), "skip_layers": list(self.skip_layers)}

    def resolved(self, n_tokens: int) -> Compression:
        """This spec with the budget in tokens for a text or prompt of `n_tokens` tokens: `ratio`
        becomes fix_kv_size = round_half_up((1 - ratio) * n_tokens), at least 1."""
        if self.ratio is None:
            return self
        size = max(1, math.floor((1 - self.ratio) * n_tokens + 0.5))
        if self.n_sink >= size:
            raise ConfigError(f"n_sink={self.n_sink} leaves no room in the {size} tokens ratio={self.ratio:g} keeps of "
                              f"{n_tokens}; lower n_sink or ratio")
        return replace(self, fix_kv_size=size, ratio=None)

    @property
    def budget(self) -> Budget:
        if self.fix_kv_size is None:
            raise ConfigError(f"ratio={self.ratio:g} gives no budget until a length is known; call resolved(n_tokens)")
        return Budget(self.fix_kv_size, float(self.keep_ratio), self.n_sink)

    def check_layers(self, n_layers: int) -> None:
        """Fail on skip layers the model does not have."""
        bad = [i for i in self.skip_layers if i >= n_layers]
        if bad:
            raise ConfigError(f"skip_layers {bad} do not exist; this model has layers 0..{n_layers - 1}")


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
    index (`knormpress.engines.streaming.shift_new_tokens`).
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
            scores = c.strategy.score(CacheView(layer.keys, positions, idx, last, total, length=length))
            keep = select(scores, positions, length, c.budget, c.sort_by_time)
            if total is not None:
                state.attention_sum = total.gather(-1, keep)
            layer.keys = layer.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.values.shape[-1]))
            if self.rotary is not None:  # each kept key from its old index to its new one
                layer.keys = self.rotary.shift(layer.keys, torch.arange(keep.shape[-1], device=keep.device) - keep, idx)
            state.positions, state.length = positions.gather(-1, keep), length
        return cache


@functools.cache
def _advise(line: str) -> None:
    """Log a warning once per process (a run builds its compression several times)."""
    log.warning(line)


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
