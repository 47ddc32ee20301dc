"""Attention recall: how much of the attention the next query wants does a strategy keep?

Measured in the strategy's own compressed run (the replay engine, true positions), so its cache is
the one its earlier evictions left. At every pruning of a compressed layer (query t > budget: the
cache holds its B + interval candidates, all tokens < t) and for each KV head:

    a_j    = sum over the query heads h of the group of softmax_h(q_t . k / sqrt(d))_j, the softmax over
             the candidates and query t's own key (`CacheView.next_attention`: the attention query t
             would give each candidate if nothing were evicted);
    recall = sum_{j kept} a_j / max_{|S| = B} sum_{j in S} a_j,

the mass on the B tokens the strategy keeps over the mass on the best B (the top B by a_j, with no
recent window or sinks forced in). Query t's own key is in neither (always kept). A layer's recall
is the mean of that ratio over its prunings (every query weighs the same, however peaked its
attention) and KV heads; a run's, the mean over compressed layers and texts. 1 means the strategy
kept what query t wanted most; the oracle, which ranks by a_j itself, stays below 1 by what the
shared recent window takes. With interval I > 1 each pruning serves I queries and only the first
is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from knormpress.eviction import Budget, select
from knormpress.strategies import CacheView, Strategy


@dataclass
class Recall(Strategy):
    """`strategy`, unchanged in what it keeps, recording the recall of each pruning it decides
    (`totals`: layer -> (sum of per-head ratios (Hkv,), prunings)). Not registered: the diagnose task
    wraps each strategy in one for its run."""

    strategy: Strategy = None
    budget: Budget = None
    totals: dict[int, list] = field(default_factory=dict)

    name = "recall"
    static = False
    needs_next_query = True

    def __post_init__(self) -> None:
        self.replayable = self.strategy.replayable
        self.needs_sinks = self.strategy.needs_sinks
        self.needs_attention = self.strategy.needs_attention
        self.needs_attention_sum = self.strategy.needs_attention_sum

    def score(self, view: CacheView) -> torch.Tensor:
        scores = self.strategy.score(view)
        keep = select(scores, view.positions, view.length, self.budget)
        wanted = view.next_attention.float()  # (1, Hkv, n)
        best = wanted.topk(self.budget.fix_kv_size, dim=-1).values.sum(-1)
        ratio = (wanted.gather(-1, keep).sum(-1) / best)[0]
        total = self.totals.setdefault(view.layer, [torch.zeros_like(ratio), 0])
        total[0] += ratio
        total[1] += 1
        return scores

    def without_recent_window(self) -> str | None:
        return self.strategy.without_recent_window()

    def by_layer(self) -> dict[int, torch.Tensor]:
        """layer -> (Hkv,) the mean recall of each KV head over the prunings."""
        return {layer: s / n for layer, (s, n) in sorted(self.totals.items())}
