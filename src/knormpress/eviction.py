"""The eviction rule: the one definition every number in this project depends on.

After token t has been processed (the cache holds what positions 0..t left behind), each
compressed layer keeps, per KV head, at most B = `fix_kv_size` tokens:

* sinks: positions 0 .. n_sink-1, always kept;
* the recent window: the n_recent newest positions, t-n_recent+1 .. t, always kept, with
  n_recent = min(round_half_up(keep_ratio * B), B - n_sink);
* the older tokens (everything else) compete for the K = B - n_sink - n_recent remaining
  slots: the K with the highest strategy score survive, ties going to the earlier position.

Query t+1 then attends to the kept cache plus its own key. While t+1 <= B nothing is evicted.
For a static score (fixed once the key exists) an evicted token could never win again, so the
kept older tokens after step t are simply the top K among all older tokens ever seen. That
gives each key an expiry: the first query that no longer sees it. `select` answers the
streaming engine ("which indices does the cache keep now?"), `expiry` answers the masked
engine ("until which query is each key visible?"), `evict_one` the replay engine ("which token
leaves a cache of B + 1?"); tests derive each from `select`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a selection is computed, so a spec's budget is checked without it
    import torch


@dataclass(frozen=True)
class Budget:
    """Slot arithmetic for one compressed layer and head."""

    fix_kv_size: int
    keep_ratio: float
    n_sink: int = 0

    @property
    def n_recent(self) -> int:
        """Recent-window size, keep_ratio * B rounded half up, capped by what sinks leave."""
        return min(math.floor(self.keep_ratio * self.fix_kv_size + 0.5), self.fix_kv_size - self.n_sink)

    @property
    def n_scored(self) -> int:
        """Slots left for older tokens chosen by the strategy's score."""
        return self.fix_kv_size - self.n_sink - self.n_recent


def select(
    scores: torch.Tensor, positions: torch.Tensor, length: int, budget: Budget, sort_by_time: bool = True
) -> torch.Tensor:
    """Indices (along the last dim) of the cached tokens to keep, shape (..., min(n, B)).

    scores, positions: (..., n) for the tokens in the cache, in any order; `length` is the
    number of tokens processed so far (t + 1). With sort_by_time the kept tokens come back in
    time order; without it in score order (sinks and recent window first, in time order), the
    original paper's layout, kept only for the ablation.
    """
    import torch

    n = scores.shape[-1]
    if n <= budget.fix_kv_size:
        return torch.arange(n, device=scores.device).expand(scores.shape)
    forced = (positions < budget.n_sink) | (positions >= length - budget.n_recent)
    priority = scores.float().masked_fill(forced, math.inf)
    by_time = positions.argsort(dim=-1, stable=True)
    best = priority.gather(-1, by_time).argsort(dim=-1, descending=True, stable=True)
    keep = by_time.gather(-1, best[..., : budget.fix_kv_size])
    if sort_by_time:
        keep = keep.gather(-1, positions.gather(-1, keep).argsort(dim=-1))
    return keep


def evict_one(scores: torch.Tensor, positions: torch.Tensor, length: int, budget: Budget) -> torch.Tensor:
    """Index (...,) of the one token `select` drops from a cache of B + 1: the lowest-scored of the
    older tokens, the latest of them on a tie. The replay engine's step, without select's sorts;
    a test checks it against `select`."""
    import torch

    forced = positions >= length - budget.n_recent
    if budget.n_sink:
        forced |= positions < budget.n_sink
    priority = scores.float().masked_fill(forced, math.inf)
    worst = priority == priority.amin(dim=-1, keepdim=True)
    return torch.where(worst, positions, -1).argmax(dim=-1)


def expiry(scores: torch.Tensor, budget: Budget, interval: int = 1) -> torch.Tensor:
    """First query position that can no longer see each key, shape like `scores` (..., T).

    scores: static scores of the keys at positions 0..T-1. A key that is never evicted
    within T tokens gets T. Replays the eviction of older tokens with a min-heap of the K
    survivors: when older token m arrives (at step m + n_recent) and pushes out token w,
    queries from m + n_recent + 1 on no longer see w. With a pruning `interval` the cache is
    pruned only after steps B + k * interval - 1 (k >= 1, when it holds B + interval tokens);
    a static score never lets an evicted key win again, so the key leaves at the first pruning
    at or after the step that evicts it when pruning every step.
    """
    import torch

    shape, T = scores.shape, scores.shape[-1]
    first = budget.n_sink
    K, lag = budget.n_scored, budget.n_recent + 1
    out = torch.full((math.prod(shape[:-1]), T), T, dtype=torch.long)
    for row, values in enumerate(scores.reshape(-1, T).float().tolist()):
        expires = out[row].tolist()
        heap: list[tuple[float, int]] = []
        for m in range(first, T):
            item = (values[m], -m)
            if len(heap) < K:
                heapq.heappush(heap, item)
                continue
            _, neg_w = heapq.heappushpop(heap, item) if K else item
            expires[-neg_w] = min(m + lag, T)
        out[row] = torch.tensor(expires)
    if interval > 1:  # round the eviction step up to the next pruning: expiry B + k * interval
        B = budget.fix_kv_size
        late = out < T
        out[late] = (B + (out[late] - B + interval - 1) // interval * interval).clamp(max=T)
    return out.reshape(shape).to(scores.device)


def held_counts(T: int, budget: Budget, interval: int = 1) -> torch.Tensor:
    """Tokens a compressed layer holds when query q = 1..T-1 starts, (T-1,) float64: q until the
    first pruning, then B again after every pruning, growing by one per token in between."""
    import torch

    q = torch.arange(1, T, dtype=torch.float64)
    B = budget.fix_kv_size
    return torch.where(q < B + interval, q, B + (q - B) % interval)


def held_tokens(expiry_at: torch.Tensor) -> torch.Tensor:
    """Tokens held per row when query q = 1..T-1 starts: keys j < q with expiry[j] > q.

    Returns (..., T-1). This is the cache the streaming engine holds after compressing at
    step q-1, so both engines report the same memory.
    """
    import torch

    T = expiry_at.shape[-1]
    flat = expiry_at.reshape(-1, T)
    gone = torch.zeros(flat.shape[0], T + 1, dtype=torch.long, device=flat.device)
    gone.scatter_add_(1, flat.clamp(max=T), torch.ones_like(flat))
    alive = torch.arange(1, T, device=flat.device) - gone[:, : T].cumsum(1)[:, 1:T]
    return alive.reshape(*expiry_at.shape[:-1], T - 1)
