"""Strategies: each one is a score per cached token, higher = more worth keeping.

A strategy only ranks the *older* tokens (outside the sink and recent window); the budget
arithmetic and the selection itself live in `knormpress.eviction`, shared by every strategy.
A strategy is a small dataclass whose fields are its own settings (built from the `strategy`
node of a `compress` config), registered once with `@register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from knormpress.registry import Registry

REGISTRY: Registry[Strategy] = Registry("strategy")
STRATEGIES = REGISTRY.classes  # name -> class
register = REGISTRY.register


@dataclass
class CacheView:
    """What a strategy may look at for one layer, right after token t joined the cache.

    keys: (batch, kv_heads, n, head_dim) the cached keys as a set; positions: (batch, kv_heads, n)
    their absolute positions. For strategies with `needs_attention` the engines also fill
    attention: (batch, q_heads, n) the attention of query t over the cache (itself included), and
    attention_sum: (batch, kv_heads, n) the attention each cached token has received from every
    query that saw it while it was cached, summed over the query heads of its KV group.
    """

    keys: torch.Tensor
    positions: torch.Tensor
    layer: int
    attention: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    key_norms: torch.Tensor | None = None  # (batch, kv_heads, n) float32 norms of `keys`, when an engine keeps them

    def norms(self) -> torch.Tensor:
        """(batch, kv_heads, n) float32 L2 norms of the keys: the engine's copy when it keeps one (the
        replay's keys-only loop, whose cached keys never change), else computed now."""
        return self.key_norms if self.key_norms is not None else torch.linalg.vector_norm(self.keys.float(), dim=-1)


@dataclass
class Strategy:
    """Base class. `static` means a token's score never changes once its key exists, which is
    what lets the masked engine replace the token-by-token loop with one forward pass. A dynamic
    strategy (static False) runs token by token or in the one-pass replay; it must score from the
    view alone (this layer's keys and attention), never from another layer's state, for the replay
    to stay exact (`replayable` False otherwise). `needs_attention`: the engines compute the
    view's `attention` (the current query's weights); `needs_attention_sum` also its running sum
    (the replay skips that sum for strategies that do not read it)."""

    name: ClassVar[str]
    static: ClassVar[bool] = True
    replayable: ClassVar[bool] = True
    needs_sinks: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    needs_attention_sum: ClassVar[bool] = False

    def score(self, view: CacheView) -> torch.Tensor:
        """(batch, kv_heads, n) float32 scores for the cached tokens, higher = keep."""
        raise NotImplementedError


@register
@dataclass
class H2O(Strategy):
    """H2O, heavy hitters (Zhang et al. 2023): keep the tokens that have received the most
    attention, summed over every query that saw them while they were cached (per KV head: the
    sum over the query heads of its group)."""

    name = "h2o"
    static = False
    needs_attention = True
    needs_attention_sum = True

    def score(self, view):
        return view.attention_sum.float()


@register
@dataclass
class TOVA(Strategy):
    """TOVA (Oren et al. 2024, transformers are multi-state RNNs): keep the tokens the current
    query attends to most, averaged over the layer's heads, so every head keeps the same tokens."""

    name = "tova"
    static = False
    needs_attention = True

    def score(self, view):
        mean = view.attention.float().mean(dim=1, keepdim=True)  # (batch, 1, n) over all query heads
        return mean.expand(view.positions.shape)


@register
@dataclass
class KeyDiff(Strategy):
    """KeyDiff (Park et al. 2025): keep the keys least similar (cosine) to the mean of the keys in
    the cache now; distinctive keys carry what the others do not."""

    name = "keydiff"
    static = False

    def score(self, view):
        keys = view.keys.float()
        # the cosine up to a positive factor per head (1 / (n |mean|)), which leaves the ranking alone
        # and halves the cost of the replay's per-token step
        return -torch.linalg.vecdot(keys, keys.sum(dim=-2, keepdim=True)) / view.norms()


def get_strategy(spec: str | dict | Strategy) -> Strategy:
    """Build a registered strategy from a name or a `{name: ..., <setting>: ...}` node."""
    return REGISTRY.build(spec, Strategy)


NORM_BITS = 10


def key_norm(keys: torch.Tensor) -> torch.Tensor:
    """L2 norm in float32, rounded to NORM_BITS significant bits.

    Rotary embedding preserves norms, so the same token at two positions has the same key norm
    in exact arithmetic (always so at layer 0). Float rounding would then pick the survivor at
    random and differently in each engine; rounding makes such keys tie, and ties go to the
    earlier position. 10 bits (0.1%) is far finer than the spread of norms between tokens.
    """
    mantissa, exponent = torch.frexp(keys.float().norm(dim=-1))
    return torch.ldexp(torch.round(mantissa * 2**NORM_BITS) / 2**NORM_BITS, exponent)


@register
@dataclass
class KeepLow(Strategy):
    """KnormPress: keys with a low L2 norm tend to draw high attention, so keep those."""

    name = "keep_low"

    def score(self, view):
        return -key_norm(view.keys)


@register
@dataclass
class KeepHigh(Strategy):
    """The paper's negative control: keep the keys with the highest L2 norm."""

    name = "keep_high"

    def score(self, view):
        return key_norm(view.keys)


@register
@dataclass
class RecentOnly(Strategy):
    """Sliding window: newer is better, so the older slots extend the recent window
    (identical to keep_ratio = 1)."""

    name = "recent_only"

    def score(self, view):
        return view.positions.float()


@register
@dataclass
class Sinks(RecentOnly):
    """StreamingLLM: the first `n_sink` tokens plus a sliding window."""

    name = "sinks"
    needs_sinks = True


@register
@dataclass
class Random(Strategy):
    """A uniform random priority per (layer, head, position), fixed by `seed`. Because the
    priority is a pure function of the token, the kept older tokens are a uniform random
    subset of all older tokens, and the masked engine can use it."""

    name = "random"
    seed: int = 0

    def score(self, view):
        b, h, _ = view.positions.shape
        head = torch.arange(h).view(1, h, 1).expand(b, h, -1)
        return _hash_uniform(self.seed, view.layer, head, view.positions.cpu()).to(view.keys.device)


@register
@dataclass
class RandomPerStep(Strategy):
    """The naive random press: a fresh random draw at every compression step. Old tokens then
    survive with geometrically falling odds, unlike `random`. Not static, and one generator
    serves every layer in call order, so only the token-by-token engine reproduces it."""

    name = "random_per_step"
    static = False
    replayable = False
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, view):
        return torch.rand(view.positions.shape, generator=self.generator).to(view.keys.device)


_MASK64 = (1 << 64) - 1


def _hash_uniform(seed: int, layer: int, head: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Counter-based hash (splitmix64 finaliser) to float32 in [0, 1): no state to carry
    between steps, so streaming and masked engines draw the same number for a token."""
    with np.errstate(over="ignore"):
        x = positions.numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= head.numpy().astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        x ^= np.uint64((layer * 0x94D049BB133111EB + seed * 0xD6E8FEB86659FD93) & _MASK64)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24))
