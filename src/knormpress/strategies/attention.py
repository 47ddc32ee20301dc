"""Strategies that rank tokens by attention or by similarity between keys: h2o, tova, keydiff and
the oracle. Dynamic: a token's score changes as the text is read, so only the streaming and
replay engines reproduce them."""

from __future__ import annotations

from dataclasses import dataclass

from knormpress.errors import choose
from knormpress.strategies.base import Strategy, register


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
