import itertools

import pytest
import torch

from knormpress.eviction import Budget, expiry, held_tokens, select

from conftest import visible


@pytest.mark.parametrize("B,ratio,sink,want", [(512, 0.5, 0, 256), (10, 0.25, 0, 3), (10, 0.35, 0, 4),
                                                (10, 1.0, 2, 8), (10, 0.0, 3, 0), (7, 0.5, 0, 4)])
def test_recent_window_rounds_half_up_and_leaves_room_for_sinks(B, ratio, sink, want):
    b = Budget(B, ratio, sink)
    assert b.n_recent == want
    assert b.n_sink + b.n_recent + b.n_scored == B


def brute_force_keep(scores, length, budget):
    """Older tokens ranked over the whole history: the definition, written the slow way."""
    forced = {p for p in range(length) if p < budget.n_sink or p >= length - budget.n_recent}
    older = sorted(set(range(length)) - forced, key=lambda p: (-scores[p], p))
    return sorted(forced | set(older[: budget.n_scored])) if length > budget.fix_kv_size else list(range(length))


def stream(scores, budget, sort_by_time=True):
    """Replay the streaming engine at index level: append a token, select, repeat."""
    cache = torch.empty(0, dtype=torch.long)
    kept = []
    for t in range(len(scores)):
        cache = torch.cat([cache, torch.tensor([t])])
        keep = select(scores[cache], cache, t + 1, budget, sort_by_time)
        cache = cache[keep]
        kept.append(cache.clone())
    return kept


@pytest.mark.parametrize("B,ratio,sink", [(8, 0.5, 0), (8, 0.0, 0), (8, 1.0, 0), (8, 0.3, 2), (5, 0.5, 4), (1, 0.0, 0)])
def test_streaming_select_equals_top_k_over_history(B, ratio, sink):
    budget = Budget(B, ratio, sink)
    scores = torch.randn(40, generator=torch.Generator().manual_seed(B + sink))
    scores[10:14] = scores[3]  # ties go to the earlier position
    for t, cache in enumerate(stream(scores, budget)):
        assert cache.tolist() == brute_force_keep(scores.tolist(), t + 1, budget)


CASES = [c for c in itertools.product([1, 6, 16], [0.0, 0.3, 0.5, 1.0], [0, 4]) if c[2] < c[0]]


@pytest.mark.parametrize("B,ratio,sink", CASES)
def test_expiry_is_derived_from_streaming_select(B, ratio, sink):
    budget = Budget(B, ratio, sink)
    scores = torch.randn(3, 60, generator=torch.Generator().manual_seed(7)).round(decimals=1)  # many ties
    exp = expiry(scores, budget)
    for row in range(3):
        kept = stream(scores[row], budget)
        mask = visible(exp[row], torch.arange(60))
        for q in range(1, 60):
            sees = set(kept[q - 1].tolist()) | {q}
            assert set(mask[q].nonzero().flatten().tolist()) == sees, (row, q)
        held = held_tokens(exp[row])
        assert held.tolist() == [len(k) for k in kept[:-1]]


def test_score_order_layout_keeps_the_same_set():
    budget = Budget(8, 0.25, 1)
    scores = torch.randn(50, generator=torch.Generator().manual_seed(3))
    for a, b in zip(stream(scores, budget, True), stream(scores, budget, False)):
        assert sorted(b.tolist()) == a.tolist()
    last = stream(scores, budget, False)[-1]
    older = last[1 + budget.n_recent:]
    assert (scores[older].diff() <= 0).all() and last[0] == 0


@pytest.mark.parametrize("B,ratio,sink", [(8, 0.5, 0), (8, 0.0, 2), (8, 1.0, 0), (6, 0.25, 1)])
def test_evict_one_drops_what_select_does_not_keep(B, ratio, sink):
    """The replay engine's shortcut against the rule itself, on scores with many exact ties."""
    from knormpress.eviction import evict_one

    g = torch.Generator().manual_seed(B)
    budget = Budget(B, ratio, sink)
    for trial in range(200):
        length = int(torch.randint(B + 1, 40, (1,), generator=g))
        positions = torch.cat([torch.arange(sink), torch.randperm(length - sink, generator=g)[: B + 1 - sink] + sink])
        positions = positions[torch.randperm(B + 1, generator=g)].view(1, 1, -1)
        positions[..., positions.argmax()] = length - 1  # the newest token is always in the cache
        scores = torch.randint(0, 3, (1, 1, B + 1), generator=g).float()
        kept = set(select(scores, positions, length, budget).flatten().tolist())
        dropped = set(range(B + 1)) - kept
        assert {evict_one(scores, positions, length, budget).item()} == dropped


def stream_at_interval(scores, budget, interval):
    """The streaming engine at index level with a pruning interval: prune once the cache holds B + interval."""
    cache, kept = torch.empty(0, dtype=torch.long), []
    for t in range(len(scores)):
        cache = torch.cat([cache, torch.tensor([t])])
        if len(cache) >= budget.fix_kv_size + interval:
            cache = cache[select(scores[cache], cache, t + 1, budget)]
        kept.append(cache.clone())
    return kept


@pytest.mark.parametrize("B,ratio,sink,interval", [(6, 0.5, 0, 3), (6, 0.0, 2, 4), (16, 0.3, 4, 7), (1, 0.0, 0, 5)])
def test_expiry_at_an_interval_is_derived_from_streaming_select(B, ratio, sink, interval):
    from knormpress.eviction import held_counts

    budget = Budget(B, ratio, sink)
    scores = torch.randn(2, 70, generator=torch.Generator().manual_seed(B + interval)).round(decimals=1)
    exp = expiry(scores, budget, interval)
    for row in range(2):
        kept = stream_at_interval(scores[row], budget, interval)
        mask = visible(exp[row], torch.arange(70))
        for q in range(1, 70):
            assert set(mask[q].nonzero().flatten().tolist()) == set(kept[q - 1].tolist()) | {q}, (row, q)
        lengths = [len(k) for k in kept[:-1]]
        assert held_tokens(exp[row]).tolist() == lengths
        assert held_counts(70, budget, interval).tolist() == lengths
