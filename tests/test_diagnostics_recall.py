"""Attention recall and the oracle against a direct computation: only the last layer of a tiny model is
compressed, so its queries and keys are the uncompressed model's, captured here and replayed by hand."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from knormpress import Compression, ConfigError, evaluate
from knormpress.engines.run import pick_engine
from knormpress.sources.tiny import VOCAB
from knormpress.tasks import get_task

from conftest import tiny_model

B, T, LAST = 16, 70, 3
CAPTURED = {}


def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
    CAPTURED[module.layer_idx] = (query[0], key[0], scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register("test_capture", capture)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama").double()  # 4 query heads, 2 KV heads
    ids = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("test_capture")
    try:
        model(ids.view(1, -1))
    finally:
        model.set_attn_implementation("sdpa")
    return model, ids, CAPTURED[LAST]


def wanted(query, key, scaling, t, candidates):
    """(Hkv, len(candidates)) query t's attention over the candidates and its own key, summed per KV group."""
    Hkv = key.shape[0]
    q = query[:, t].unflatten(0, (Hkv, -1))  # (Hkv, g, D)
    k = key[:, candidates + [t]]  # (Hkv, n + 1, D)
    return (torch.einsum("hgd,hnd->hgn", q, k) * scaling).softmax(-1)[..., :-1].sum(1)


def recall_by_hand(query, key, scaling, keep_ratio, choose):
    """Per KV head, the mean over prunings (queries t = B+1..T-1) of kept mass / best-B mass; `choose(a,
    candidates, t)` -> the kept candidates' indices per head. The cache then holds the kept plus t."""
    Hkv = key.shape[0]
    caches = [list(range(B + 1)) for _ in range(Hkv)]
    sums = torch.zeros(Hkv, dtype=torch.float64)
    for t in range(B + 1, T):
        for h in range(Hkv):
            a = wanted(query, key, scaling, t, caches[h])[h]
            kept = choose(a, caches[h], t)
            sums[h] += a[kept].sum() / a.topk(B).values.sum()
            caches[h] = sorted(caches[h][i] for i in kept) + [t]
    return sums / (T - B - 1)


def run_recall(model, ids, strategy, keep_ratio):
    task = get_task("diagnose")
    c = Compression(strategy, fix_kv_size=B, keep_ratio=keep_ratio, skip_layers=[0, 1, 2])
    table = task.run(model, SimpleNamespace(id="t", input_ids=ids), c, "auto", False).records
    assert set(table.layer) == {LAST}
    return torch.tensor(table.sort_values("head").recall.to_numpy())


def test_recall_of_a_sliding_window_matches_a_direct_computation(setup):
    model, ids, (query, key, scaling) = setup
    oldest_out = lambda a, cands, t: list(range(1, B + 1))  # noqa: E731  (the B newest of B + 1 in time order)
    expected = recall_by_hand(query, key, scaling, 0.5, oldest_out)
    assert torch.allclose(run_recall(model, ids, "recent_only", 0.5), expected, atol=1e-9)


@pytest.mark.parametrize("keep_ratio", [0.0, 0.5])
def test_the_oracle_keeps_the_next_querys_top_tokens_beside_the_recent_window(setup, keep_ratio):
    model, ids, (query, key, scaling) = setup
    n_recent = int(keep_ratio * B + 0.5)

    def oracle(a, cands, t):
        forced = [i for i, p in enumerate(cands) if p >= t - n_recent]
        older = [i for i in a.argsort(descending=True).tolist() if i not in forced]
        return sorted(forced + older[: B - len(forced)])
    expected = recall_by_hand(query, key, scaling, keep_ratio, oracle)
    measured = run_recall(model, ids, "oracle", keep_ratio)
    assert torch.allclose(measured, expected, atol=1e-9)
    if keep_ratio == 0:  # nothing forced: it keeps exactly the best B
        assert torch.allclose(measured, torch.ones_like(measured))


def test_the_oracle_beats_a_deployable_strategy_on_the_tokens_it_was_built_for(setup):
    model, ids, _ = setup
    c = dict(fix_kv_size=B, keep_ratio=0.5, skip_layers=[0, 1, 2])
    assert run_recall(model, ids, "oracle", 0.5).mean() >= run_recall(model, ids, "keep_low", 0.5).mean()
    assert evaluate(model, ids, Compression("oracle", **c)).engine == "replay"


def test_engines_that_cannot_see_the_next_query_refuse_the_oracle_in_one_line():
    for engine, words in [("streaming", "ranks by the next query's attention"), ("masked", "re-scores tokens")]:
        with pytest.raises(ConfigError, match=words) as said:
            pick_engine(engine, Compression("oracle"))
        assert "\n" not in str(said.value)
    with pytest.raises(ConfigError, match="no engine reproduces this compression") as said:
        pick_engine("auto", Compression("oracle", positions="rerotate"))
    assert "replay: strategy 'oracle' ranks by the next query's attention" in str(said.value)


def test_diagnose_refuses_what_it_cannot_measure_before_loading():
    task, ev = get_task("diagnose"), SimpleNamespace(max_tokens=3000)
    for bad in [Compression("keep_low", positions="rerotate"), Compression("random_per_step"),
                Compression("keep_low", fix_kv_size=None, ratio=0.5, when="prefill")]:
        with pytest.raises(ConfigError, match="task diagnose"):
            task.check(bad, ev)
    task.check(Compression("keep_low"), ev)
