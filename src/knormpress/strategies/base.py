"""The strategy interface: `CacheView` (what a strategy sees of one cache layer) and `Strategy`
(a score per cached token, higher = more worth keeping), with the registry every strategy joins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

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


def label(node: dict) -> str:
    """A strategy node's label (name + settings that differ from the defaults, seeds aside), from a
    built strategy's settings or from a run's logged params: the report keys strategies by it."""
    return REGISTRY.label(node, REPEATS)


def get_strategy(spec: str | dict | Strategy) -> Strategy:
    """Build a registered strategy from a name or a `{name: ..., <setting>: ...}` node."""
    return REGISTRY.build(spec, Strategy)
