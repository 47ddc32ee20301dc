"""Do the one-pass engine and the token-by-token engine keep the same tokens? Counting it on a real run.

In exact arithmetic the one-pass engines (masked, replay) keep, for every query, the same tokens as
the streaming engine: all apply `knormpress.eviction` to the same scores. In float32 the scores are
not quite the same: a one-pass engine computes the keys (and attention) in one batched pass, the
streaming engine in one-token steps, and the two round differently in the last bits. A near-tie
(for keep_low: a key norm within float noise of a rounding midpoint of `key_norm`) can then be
decided differently, and from that step on the engines keep different tokens and drift apart.

`compare_engines` runs both engines once on one text and counts, query by query, where the kept
sets differ. It only watches the strategy's `score` calls and changes nothing. From the one-pass
run it derives each key's expiry (the first query that no longer sees it): the masked engine
scores all keys of a compressed layer once, so that is `expiry` of those scores; the replay
scores the B + 1 slots it holds before each eviction, so a key expires one query after the last
call that still holds it. The streaming engine scores the cache it is about to prune after
token t: the tokens query t saw plus t itself, which is compared with those expiries.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from knormpress.compression import Compression
from knormpress.engines import evaluate, pick_engine
from knormpress.eviction import expiry
from knormpress.metrics import EvalResult, pooled
from knormpress.strategies import CacheView, Strategy


@dataclass
class Agreement:
    """Kept-set differences between the engines over the queries that read a pruned cache.

    A query is counted once however many compressed layers and KV heads differ for it;
    `swapped` counts (layer, KV head, token) memberships that differ, so one token kept in
    place of another counts 2.
    """

    queries: int = 0  # queries checked: fix_kv_size+1 .. T-2, the ones whose cache has been pruned
    differ: int = 0  # of those, queries whose kept set differs in at least one compressed layer and KV head
    swapped: int = 0  # differing memberships, summed over queries, layers and heads
    slots: int = 0  # kept memberships compared, summed likewise
    first: tuple[int, int] | None = None  # (query, layer) of the first difference (summed: the first text's with one)
    seconds: float = 0.0  # time spent counting inside the streaming run's wall time

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.queries + other.queries, self.differ + other.differ, self.swapped + other.swapped,
                         self.slots + other.slots, self.first or other.first, self.seconds + other.seconds)

    @property
    def swapped_frac(self) -> float:
        """Share of the kept memberships that differ."""
        return self.swapped / (2 * self.slots) if self.slots else 0.0


class Expiries:
    """Each compressed layer's key expiries (batch, kv_heads, T), recorded from a one-pass run's score calls."""

    def __init__(self, compression: Compression, T: int) -> None:
        self.budget, self.T, self.interval = compression.budget, T, compression.interval
        self.last_held: dict[int, torch.Tensor] = {}  # replay: layer -> the last query t whose call held each key
        self.scored: dict[int, torch.Tensor] = {}  # masked: layer -> scores of all T keys

    def record(self, view: CacheView, scores: torch.Tensor) -> None:
        if view.positions.shape[-1] == self.T:  # the masked engine: every key at once
            self.scored[view.layer] = scores.detach()
            return
        held = self.last_held.setdefault(view.layer, torch.zeros(*view.positions.shape[:2], self.T, dtype=torch.long,
                                                                  device=view.positions.device))
        held.scatter_(-1, view.positions, int(view.positions.max()))  # the replay mutates positions later: use them now

    def result(self) -> dict[int, torch.Tensor]:
        out = {layer: expiry(s, self.budget, self.interval) for layer, s in self.scored.items()}
        return out | {layer: held + 1 for layer, held in self.last_held.items()}


class KeptSets:
    """Compares the streaming engine's caches with the one-pass engine's expiries, step by step.

    `check(view)` takes the cache the streaming engine is about to prune after reading token
    t = positions.max(); every other position in it is what query t saw in that layer.
    """

    def __init__(self, expiry_by_layer: dict[int, torch.Tensor], fix_kv_size: int) -> None:
        self.expiry = expiry_by_layer
        self.fix_kv_size = fix_kv_size
        self.per_query: dict[int, int] = {}  # query -> differing memberships over layers and heads
        self.slots = 0
        self.first: tuple[int, int] | None = None
        self.seconds = 0.0

    def check(self, view: CacheView, scores: torch.Tensor) -> None:
        start = time.perf_counter()
        positions, t = view.positions, int(view.positions.max())
        if t > self.fix_kv_size:  # query t reads a cache pruned at least once
            # Both engines hold exactly fix_kv_size tokens besides t's own key (which both see),
            # so the sets differ by as many tokens as the one-pass engine does not see, twice.
            missing = positions.numel() - int((self.expiry[view.layer].gather(-1, positions) > t).sum())
            self.per_query[t] = self.per_query.get(t, 0) + 2 * missing
            self.slots += positions.numel() - positions.shape[0] * positions.shape[1]
            if missing and (self.first is None or t < self.first[0]):
                self.first = (t, view.layer)
        self.seconds += time.perf_counter() - start

    def result(self) -> Agreement:
        return Agreement(queries=len(self.per_query), differ=sum(1 for d in self.per_query.values() if d),
                         swapped=sum(self.per_query.values()), slots=self.slots, first=self.first,
                         seconds=self.seconds)


@dataclass
class Comparison:
    """Both engines on the same text(s), and where they part; `+` pools texts."""

    onepass: list[EvalResult]
    streaming: list[EvalResult]
    kept: list[Agreement] | None = None  # per text; None when the kept sets were not counted

    def __add__(self, other: Comparison) -> Comparison:
        kept = None if self.kept is None or other.kept is None else self.kept + other.kept
        return Comparison(self.onepass + other.onepass, self.streaming + other.streaming, kept)

    @property
    def agreement(self) -> Agreement | None:
        """Kept-set differences summed over the texts."""
        return None if self.kept is None else sum(self.kept, Agreement())

    @property
    def rel_ppl_diff(self) -> float:
        """Pooled PPL of one-pass over streaming, minus 1."""
        return pooled(self.onepass)[0] / pooled(self.streaming)[0] - 1

    @property
    def accuracy_diff(self) -> float:
        """Pooled accuracy of one-pass minus streaming (a fraction, not percentage points)."""
        return pooled(self.onepass)[1] - pooled(self.streaming)[1]

    @property
    def nll_diff(self) -> torch.Tensor:
        """|NLL one-pass - NLL streaming| of every predicted token of every text."""
        return torch.cat([(a.nll.double() - b.nll.double()).abs() for a, b in zip(self.onepass, self.streaming)])

    @property
    def correct_flips(self) -> int:
        """Predicted tokens scored correct by one engine and wrong by the other."""
        return sum(int((a.correct != b.correct).sum()) for a, b in zip(self.onepass, self.streaming))

    def summary(self) -> dict[str, object]:
        """The numbers `scripts/bench_engines.py` prints, pooled over the texts unless named per text."""
        d = self.nll_diff
        out: dict[str, object] = {
            "rel_ppl_diff": self.rel_ppl_diff,
            "rel_ppl_diff_per_text": [a.ppl / b.ppl - 1 for a, b in zip(self.onepass, self.streaming)],
            "accuracy_diff": self.accuracy_diff,
            "correct_flips": self.correct_flips,
            "max_abs_nll_diff": d.max().item(),
            "frac_tokens_nll_diff_gt_1e-3": (d > 1e-3).double().mean().item(),
            "ppl_onepass": pooled(self.onepass)[0],
            "ppl_streaming": pooled(self.streaming)[0],
        }
        if self.kept is not None:
            a = self.agreement
            out |= {"kept_set_diff_queries": a.differ, "kept_set_queries": a.queries,
                    "kept_set_swapped_frac": a.swapped_frac,
                    "first_kept_set_diff_per_text": [list(k.first) if k.first else None for k in self.kept]}
        return out


class _Watched:
    """A strategy that also hands every view it scores, with the scores, to `hook`; otherwise the strategy itself."""

    def __init__(self, inner: Strategy, hook: Callable[[CacheView, torch.Tensor], None]) -> None:
        self._inner, self._hook = inner, hook

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def score(self, view: CacheView) -> torch.Tensor:
        scores = self._inner.score(view)
        self._hook(view, scores)
        return scores


def watching(compression: Compression, hook: Callable[[CacheView, torch.Tensor], None]) -> Compression:
    """A copy of `compression` whose strategy also hands every view it scores, with the scores, to `hook`."""
    watched = copy.copy(compression)
    watched.strategy = _Watched(compression.strategy, hook)
    return watched


def compare_engines(
    model: PreTrainedModel, input_ids: torch.Tensor, compression: Compression, progress: bool = False
) -> Comparison:
    """Run the one-pass engine `auto` picks, then the streaming engine, on one text (T,), counting
    kept-set differences. Costs one run of each; `compression` is not modified."""
    onepass_engine = pick_engine("auto", compression).name
    if onepass_engine == "streaming":
        raise ValueError(f"strategy {compression.strategy.name!r} has no one-pass engine to compare")
    expiries = Expiries(compression, input_ids.numel())
    onepass = evaluate(model, input_ids, watching(compression, expiries.record), engine=onepass_engine)
    kept = KeptSets(expiries.result(), compression.fix_kv_size)
    streaming = evaluate(model, input_ids, watching(compression, kept.check), engine="streaming", progress=progress)
    return Comparison([onepass], [streaming], [kept.result()])
