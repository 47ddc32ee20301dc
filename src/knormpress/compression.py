"""Pruning a transformers cache in place to a fixed size per layer and KV head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from knormpress.errors import ConfigError
from knormpress.eviction import Budget, select
from knormpress.strategies import Strategy, get_strategy


@dataclass
class Compression:
    """What to compress and how; validated on creation so mistakes surface before any model work."""

    strategy: str = "keep_low"
    fix_kv_size: int = 512
    keep_ratio: float = 0.5
    skip_layers: Sequence[int] = (0, 1)
    sort_by_time: bool = True
    n_sink: int = 0
    seed: int = 0
    scorer: Strategy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer = get_strategy(self.strategy, self.seed)
        if isinstance(self.fix_kv_size, bool) or not isinstance(self.fix_kv_size, int) or self.fix_kv_size < 1:
            raise ConfigError(f"fix_kv_size must be an integer >= 1, got {self.fix_kv_size!r}")
        if not 0.0 <= float(self.keep_ratio) <= 1.0:
            raise ConfigError(f"keep_ratio must lie in [0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.n_sink, int) or not 0 <= self.n_sink < self.fix_kv_size:
            raise ConfigError(f"n_sink must be an integer in [0, fix_kv_size={self.fix_kv_size}), got {self.n_sink!r}")
        if self.scorer.needs_sinks and self.n_sink < 1:
            raise ConfigError(f"strategy {self.strategy!r} needs n_sink >= 1 (e.g. n_sink=4), got {self.n_sink}")
        self.skip_layers = tuple(sorted(set(self.skip_layers)))
        if any(not isinstance(i, int) or i < 0 for i in self.skip_layers):
            raise ConfigError(f"skip_layers must be layer indices >= 0, got {list(self.skip_layers)}")

    @property
    def budget(self) -> Budget:
        return Budget(self.fix_kv_size, float(self.keep_ratio), self.n_sink)

    def check_layers(self, n_layers: int) -> None:
        """Fail on skip layers the model does not have."""
        bad = [i for i in self.skip_layers if i >= n_layers]
        if bad:
            raise ConfigError(f"skip_layers {bad} do not exist; this model has layers 0..{n_layers - 1}")


class CacheCompressor:
    """Applies one `Compression` to a `DynamicCache` step after step.

    The absolute position of every cached token is remembered on the layer (`knorm_positions`)
    so the recent window, sinks, ties and the random strategy stay right after reordering;
    tokens the model appended since the last call are new positions, in order.
    """

    def __init__(self, compression: Compression) -> None:
        self.compression = compression

    def __call__(self, cache: DynamicCache) -> DynamicCache:
        layers = _dynamic_layers(cache)
        c = self.compression
        if layers:  # a fresh DynamicCache() grows its layers lazily
            c.check_layers(len(layers))
        for idx, layer in enumerate(layers):
            if idx in c.skip_layers or not layer.is_initialized or layer.keys.shape[-2] <= c.fix_kv_size:
                continue
            positions, length = _positions(layer)
            keep = select(c.scorer.score(layer.keys, positions, idx), positions, length, c.budget, c.sort_by_time)
            layer.keys = layer.keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, layer.values.shape[-1]))
            layer.knorm_positions = positions.gather(-1, keep)
            layer.knorm_length = length
        return cache


def _dynamic_layers(cache: object) -> list[DynamicLayer]:
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not all(
        isinstance(l, DynamicLayer) and not l.is_sliding for l in layers
    ):
        raise ConfigError(
            f"cannot compress a {type(cache).__name__}; pass a transformers DynamicCache with full "
            "(non-sliding) layers, e.g. the `past_key_values` of model(..., use_cache=True)"
        )
    return layers


def _positions(layer: DynamicLayer) -> tuple[torch.Tensor, int]:
    """Absolute positions of the cached tokens, and how many tokens the layer has seen."""
    b, h, n, _ = layer.keys.shape
    known = getattr(layer, "knorm_positions", None)
    seen = getattr(layer, "knorm_length", 0)
    if known is None:
        return torch.arange(n, device=layer.keys.device).expand(b, h, n), n
    new = n - known.shape[-1]
    fresh = torch.arange(seen, seen + new, device=known.device).expand(b, h, new)
    return torch.cat([known, fresh], dim=-1), seen + new


def fix_size_l2_compress(
    past_key_values: DynamicCache,
    fix_kv_size: int = 512,
    keep_ratio: float = 0.5,
    strategy: str = "keep_low",
    skip_layers: Sequence[int] = (0, 1),
    sort_by_time: bool = True,
    n_sink: int = 0,
    seed: int = 0,
) -> DynamicCache:
    """Prune `past_key_values` in place to `fix_kv_size` tokens per layer and KV head.

    `keep_ratio` of the budget holds the most recent tokens, the rest goes to the older tokens
    the strategy scores best (see `knormpress.eviction` for the exact rule). Layers in
    `skip_layers` stay whole. Call it again after each new token to keep the size fixed.
    """
    compression = Compression(strategy, fix_kv_size, keep_ratio, skip_layers, sort_by_time, n_sink, seed)
    return CacheCompressor(compression)(past_key_values)
