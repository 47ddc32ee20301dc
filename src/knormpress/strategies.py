"""Strategies: each one is a score per cached token, higher = more worth keeping.

A strategy only ranks the *older* tokens (outside the sink and recent window); the budget
arithmetic and the selection itself live in `knormpress.eviction`, shared by every strategy.
A strategy is a small dataclass whose fields are its own settings (built from the `strategy`
node of a `compress` config), registered once with `@register`.

Every strategy here gets the same recent window of keep_ratio x fix_kv_size newest tokens (and
n_sink first tokens when asked), which some papers have and others do not: each docstring states
the paper's formula, where this implementation differs on purpose, and which settings reproduce it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from knormpress.errors import choose
from knormpress.registry import Registry, settings

if TYPE_CHECKING:  # torch is imported where a score is computed, so configs validate without it
    import torch

REGISTRY: Registry[Strategy] = Registry("strategy")
STRATEGIES = REGISTRY.classes  # name -> class
register = REGISTRY.register
REPEATS = ("seed",)  # settings that repeat a method rather than change it: left out of `Strategy.label`


@dataclass
class CacheView:
    """What a strategy may look at for one layer, right after token t joined the cache.

    keys: (batch, kv_heads, n, head_dim) the cached keys as a set; positions: (batch, kv_heads, n)
    their absolute positions; length: the tokens processed so far, t + 1 (None where no step is
    meant: the masked engine scores every key of a static strategy at once). For strategies with
    `needs_attention` the engines also fill attention: (batch, q_heads, n) the attention of query t
    over the cache (itself included), and attention_sum: (batch, kv_heads, n) the attention each
    cached token has received from every query that saw it while it was cached, summed over the
    query heads of its KV group. A cached token was seen by every query from its own position on
    (an evicted token never comes back), so by length - position queries.
    """

    keys: torch.Tensor
    positions: torch.Tensor
    layer: int
    attention: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    key_norms: torch.Tensor | None = None  # (batch, kv_heads, n) float32 norms of `keys`, when an engine keeps them
    length: int | None = None
    next_attention: torch.Tensor | None = None  # (batch, kv_heads, n): for `needs_next_query`, see `Strategy`

    def norms(self) -> torch.Tensor:
        """(batch, kv_heads, n) float32 L2 norms of the keys: the engine's copy when it keeps one (the
        replay's keys-only loop, whose cached keys never change), else computed now."""
        import torch

        return self.key_norms if self.key_norms is not None else torch.linalg.vector_norm(self.keys.float(), dim=-1)


@dataclass
class Strategy:
    """Base class. `static` means a token's score never changes once its key exists, which is
    what lets the masked engine replace the token-by-token loop with one forward pass. A dynamic
    strategy (static False) runs token by token or in the one-pass replay; it must score from the
    view alone (this layer's keys and attention), never from another layer's state, for the replay
    to stay exact (`replayable` False otherwise). `needs_attention`: the engines compute the
    view's `attention` (the current query's weights); `needs_attention_sum` also its running sum
    (the replay skips that sum for strategies that do not read it). `needs_next_query`: the view's
    `next_attention`, the attention the query about to be read (t = length) gives each cached token,
    softmax over the cache before pruning plus its own key, summed over the query heads of each KV
    group; only the replay engine knows it (`oracle`). `deployable` False: a reference that reads what
    a real cache cannot know; the report labels its rows "(not deployable)"."""

    name: ClassVar[str]
    static: ClassVar[bool] = True
    replayable: ClassVar[bool] = True
    deployable: ClassVar[bool] = True
    needs_sinks: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False
    needs_attention_sum: ClassVar[bool] = False
    needs_next_query: ClassVar[bool] = False

    def score(self, view: CacheView) -> torch.Tensor:
        """(batch, kv_heads, n) float32 scores for the cached tokens, higher = keep."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The name with every setting that differs from its default (seeds aside), e.g.
        `h2o[normalise=mean]`: what run names and the report's tables show (`label`)."""
        return label(settings(self))

    def without_recent_window(self) -> str | None:
        """Why these settings go wrong without a recent window (keep_ratio 0), or None if they do not."""
        return None


@register
@dataclass
class H2O(Strategy):
    """H2O, heavy hitters (Zhang et al. 2023). The paper scores cached token j after step t by the
    attention it has accumulated, s_j = sum_{q=j..t} A[q, j] (one score per head), and keeps the
    heaviest tokens beside a window of the most recent ones (half and half in the paper).

    Here, per KV head, A is summed over the query heads of its group (per head, as published, for
    models without grouped-query attention); the recent window is keep_ratio x fix_kv_size, so
    keep_ratio 0.5 is the paper's split. `normalise`: "sum" is the paper's score; "mean" divides it
    by the number of queries that saw the token, t + 1 - j (kvpress' observed-attention press does
    so): tokens read early (a prompt's first lines) get no head start from being summed over more
    queries, and tokens seen by few queries get noisier scores instead. keep_ratio 0 is not H2O:
    see `without_recent_window`."""

    name = "h2o"
    static = False
    needs_attention = True
    needs_attention_sum = True
    normalise: str = "sum"

    def __post_init__(self) -> None:
        choose("h2o normalise", self.normalise, ("sum", "mean"))

    def score(self, view):
        received = view.attention_sum.float()
        if self.normalise == "mean":
            return received / (view.length - view.positions).float()
        return received

    def without_recent_window(self):
        if self.normalise == "sum":
            return ("a new token's score is the one attention weight it has received, far below the sums of older tokens, "
                    "so it is evicted at once; H2O keeps recent tokens beside its heavy hitters (use keep_ratio > 0)")
        return None


@register
@dataclass
class TOVA(Strategy):
    """TOVA (Oren et al. 2024, transformers are multi-state RNNs). The paper scores cached token j
    after step t by the current query's attention averaged over the layer's heads,
    s_j = mean_h A_h[t, j], and once the cache is full drops the lowest one per step, so every head
    keeps the same tokens. The paper has no recent window: keep_ratio 0 (with interval 1)
    reproduces it; keep_ratio > 0 adds this project's shared window."""

    name = "tova"
    static = False
    needs_attention = True

    def score(self, view):
        mean = view.attention.float().mean(dim=1, keepdim=True)  # (batch, 1, n) over all query heads
        return mean.expand(view.positions.shape)


@register
@dataclass
class KeyDiff(Strategy):
    """KeyDiff (Park et al. 2025). Per layer and KV head, over the keys in the cache now:
    anchor a = mean_j k_j / |k_j|, score s_i = -cos(k_i, a) = -(k_i . a) / (|k_i| |a|); the keys
    least like the anchor are the distinctive ones, kept. kvpress' KeyDiffPress computes the same.
    The paper evicts block by block with no recent window: keep_ratio 0 reproduces it, with
    `interval` the block size (1: token by token). `anchor`: "normalised" is the paper's; "raw"
    takes the mean of the keys as they are (so high-norm keys dominate it), an earlier variant of
    this project kept to compare with."""

    name = "keydiff"
    static = False
    anchor: str = "normalised"

    def __post_init__(self) -> None:
        choose("keydiff anchor", self.anchor, ("normalised", "raw"))

    def score(self, view):
        import torch

        keys, norms = view.keys.float(), view.norms()
        if self.anchor == "raw":  # the cosine up to the positive factor 1 / |sum of keys| per head
            return -torch.linalg.vecdot(keys, keys.sum(dim=-2, keepdim=True)) / norms
        unit = keys / norms.unsqueeze(-1)
        anchor = unit.mean(dim=-2, keepdim=True)
        return -(unit * (anchor / torch.linalg.vector_norm(anchor, dim=-1, keepdim=True))).sum(dim=-1)


@register
@dataclass
class Oracle(Strategy):
    """The upper bound of any scorer at a budget: keep the older tokens the next query will attend to
    most, s_j = sum_{h in KV group} A_h[t, j], with t the query read right after this pruning and A
    its attention over the cache before pruning plus its own key (`CacheView.next_attention`). Not
    deployable: a real cache prunes before that query exists. Only the replay engine computes it
    exactly (the streaming and masked engines refuse it, the replay under positions=true only). It
    shares the eviction rule (recent window, sinks, interval) with every strategy, so it bounds their
    choice of the older tokens.

    Greedy, not optimal: each pruning keeps what query t wants, but an evicted token never returns
    and a later query may have wanted it (with interval > 1 the queries t+1..t+I-1 also live with the
    pruning chosen for t), so its perplexity can lose to a strategy that keeps tokens for later.
    Where no next query is known (a prompt pruned once after reading it, `compress.when=prefill`, and
    decoding after it) it ranks by the latest query's attention instead (`view.attention` summed per
    KV group: one step late, TOVA's signal per head group), and is then no bound."""

    name = "oracle"
    static = False
    deployable = False
    needs_attention = True
    needs_next_query = True

    def score(self, view):
        if view.next_attention is not None:
            return view.next_attention.float()
        b, h, n = view.positions.shape
        return view.attention.float().view(b, h, -1, n).sum(dim=2)


def label(node: dict) -> str:
    """A strategy node's label (name + settings that differ from the defaults, seeds aside), from a
    built strategy's settings or from a run's logged params: the report keys strategies by it."""
    return REGISTRY.label(node, REPEATS)


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
    import torch

    mantissa, exponent = torch.frexp(keys.float().norm(dim=-1))
    return torch.ldexp(torch.round(mantissa * 2**NORM_BITS) / 2**NORM_BITS, exponent)


@register
@dataclass
class KeepLow(Strategy):
    """KnormPress (Devoto et al. 2024): keys with a low L2 norm tend to draw high attention, so the
    score is s_j = -|k_j| and the lowest-norm keys are kept. The paper (and kvpress' KnormPress)
    keeps no recent window: keep_ratio 0 reproduces it; the default 0.5 is the seed's mixed
    retention. Difference: |k_j| is rounded to NORM_BITS significant bits (`key_norm`), so keys whose
    norms differ only by float noise tie, and ties go to the earlier position."""

    name = "keep_low"

    def score(self, view):
        return -key_norm(view.keys)


@register
@dataclass
class KeepHigh(Strategy):
    """The KnormPress paper's negative control: s_j = +|k_j| (rounded as for keep_low), keep the
    highest-norm keys."""

    name = "keep_high"

    def score(self, view):
        return key_norm(view.keys)


@register
@dataclass
class RecentOnly(Strategy):
    """Sliding window: s_j = j, newer is better, so the older slots extend the recent window
    (identical to keep_ratio = 1, whatever keep_ratio is set)."""

    name = "recent_only"

    def score(self, view):
        return view.positions.float()


@register
@dataclass
class Sinks(RecentOnly):
    """StreamingLLM (Xiao et al. 2024): the first `n_sink` tokens (attention sinks, 4 in the paper)
    plus a sliding window. The paper places the cached keys at their slots in the cache, not their
    positions in the text: positions=rerotate reproduces that; positions=true keeps text positions."""

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
        import torch

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
        import torch

        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, view):
        import torch

        return torch.rand(view.positions.shape, generator=self.generator).to(view.keys.device)


_MASK64 = (1 << 64) - 1


def _hash_uniform(seed: int, layer: int, head: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Counter-based hash (splitmix64 finaliser) to float32 in [0, 1): no state to carry
    between steps, so streaming and masked engines draw the same number for a token."""
    import torch

    with np.errstate(over="ignore"):
        x = positions.numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= head.numpy().astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        x ^= np.uint64((layer * 0x94D049BB133111EB + seed * 0xD6E8FEB86659FD93) & _MASK64)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24))
