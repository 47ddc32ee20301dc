"""Counting where the one-pass and the streaming engine's kept sets differ: checked against a slow
count on known scores, and on tiny models for both one-pass engines (masked and replay)."""

import pytest
import torch

from knormpress import Compression, evaluate
from knormpress.diagnostics.agreement import Expiries, KeptSets, compare_engines, watching
from knormpress.eviction import Budget, expiry, select
from knormpress.strategies import CacheView

from conftest import VOCAB, tiny_model


def stream(scores, budget, watch):
    """The streaming engine at index level: append token t, hand the cache to `watch`, prune."""
    cache = torch.empty(1, 1, 0, dtype=torch.long)
    kept = []
    for t in range(scores.shape[-1]):
        cache = torch.cat([cache, torch.tensor([[[t]]])], -1)
        if cache.shape[-1] > budget.fix_kv_size:
            watch(CacheView(None, cache, 0), None)
            cache = cache.gather(-1, select(scores[..., cache[0, 0]], cache, t + 1, budget))
        kept.append(set(cache.flatten().tolist()))
    return kept


@pytest.mark.parametrize("B,ratio,sink", [(8, 0.5, 0), (8, 0.0, 0), (6, 0.3, 2)])
def test_kept_set_differences_match_a_slow_count(B, ratio, sink):
    budget = Budget(B, ratio, sink)
    onepass = torch.randn(1, 1, 80, generator=torch.Generator().manual_seed(3)).round(decimals=1)  # ties too
    streamed = onepass.clone()
    streamed[..., 30:50] *= -1  # the other engine ranks some tokens differently
    exp = expiry(onepass, budget)

    same = KeptSets({0: exp}, B)
    stream(onepass, budget, same.check)
    assert same.result().differ == 0 and same.result().queries == 80 - 1 - B

    counted = KeptSets({0: exp}, B)
    kept = stream(streamed, budget, counted.check)
    diffs = {}
    for q in range(B + 1, 80):  # query q reads what was kept after step q-1
        sees = {j for j in range(q) if exp[0, 0, j] > q}
        diffs[q] = len(sees ^ kept[q - 1])
    result = counted.result()
    assert result.differ == sum(1 for d in diffs.values() if d) > 0
    assert result.swapped == sum(diffs.values())
    assert result.first == (min(q for q, d in diffs.items() if d), 0)


@pytest.fixture(scope="module")
def llama64():
    return tiny_model("llama").double()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(4))


def test_replay_expiries_equal_the_masked_ones(llama64, ids):
    """A static strategy run through both one-pass engines: the expiries the replay's score calls
    give must be those of the masked engine's single call, for every key a checked query can see."""
    c = Compression("keep_low", 32, 0.5, [0])
    got = {}
    for engine in ("masked", "replay"):
        rec = Expiries(c, len(ids))
        evaluate(llama64, ids, watching(c, rec.record), engine=engine)
        got[engine] = {layer: e[..., : len(ids) - 1].clamp(max=len(ids) - 1) for layer, e in rec.result().items()}
    assert sorted(got["masked"]) == [1, 2, 3]
    for layer, e in got["masked"].items():
        assert (e < len(ids) - 1).any()  # some keys are evicted, so the comparison says something
        assert torch.equal(e, got["replay"][layer])


@pytest.mark.parametrize("strategy", ["keep_low", "h2o"])
def test_engines_agree_on_a_tiny_model(llama64, ids, strategy):
    c = Compression(strategy, 32, 0.5, [0])
    r = compare_engines(llama64, ids, c)
    assert r.onepass[0].engine == ("masked" if strategy == "keep_low" else "replay")
    assert r.agreement.queries == len(ids) - 2 - 32 and r.agreement.slots == 3 * 2 * 32 * r.agreement.queries
    assert r.agreement.differ == 0 and r.agreement.first is None
    assert abs(r.rel_ppl_diff) < 1e-9 and r.accuracy_diff == 0 and r.correct_flips == 0
    assert r.nll_diff.max() < 1e-6
    assert type(c.strategy).__name__ != "_Watched"  # the caller's compression is left alone
