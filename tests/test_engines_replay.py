"""The one-pass replay engine equals the token-by-token engine for every replayable strategy
(static and dynamic), both position policies and pruning intervals, in float64 on tiny GPT-NeoX
(partial rotary) and Llama (GQA) models: logits within 1e-4, the same held memory, and the same
compressed cache at the end (positions, keys and values, in the same order, and the attention each
kept token received); so does the masked engine for static strategies with true positions at any interval."""

import itertools

import pytest
import torch
from transformers import DynamicCache

from knormpress import STRATEGIES, Compression, ConfigError, fix_size_l2_compress, run_engine
from knormpress.engines import pick_engine
from knormpress.engines.streaming import CacheReader

from conftest import VOCAB, record_logit_diff, seeded, state_of, tiny_model

REPLAYABLE = sorted(n for n, cls in STRATEGIES.items() if cls.replayable and not cls.needs_next_query)  # the oracle: test_diagnostics_recall
VARIANTS = {"h2o[normalise=mean]": {"name": "h2o", "normalise": "mean"},  # settings off the default, by label
            "keydiff[anchor=raw]": {"name": "keydiff", "anchor": "raw"}}
GRID = [(s, kr, skip, sink) for s, kr, skip, sink in itertools.product(REPLAYABLE + list(VARIANTS), [0.0, 0.5, 1.0],
                                                                        [(), (0, 1)], [0, 4])
        if not (s == "sinks" and sink == 0)]
# the fast suite: every strategy once at the default keep_ratio, alternating model, skip layers and sinks
FAST = [(["gpt_neox", "llama"][i % 2], s, 0.5, (0, 1) if i % 3 else (), 4 if s == "sinks" or i % 2 else 0)
        for i, s in enumerate(REPLAYABLE + list(VARIANTS))]


def node(strategy: str) -> str | dict:
    """A strategy name or variant label as a config node (random strategies seeded)."""
    return VARIANTS.get(strategy) or seeded(strategy, 5)


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch).double() for arch in ("gpt_neox", "llama", "gemma3")}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(3))


def check(model, ids, strategy, keep_ratio, skip, n_sink, fix_kv_size=32, engine="replay", atol=1e-10, **settings):
    """`atol`: on the final caches (keys, values, attention received), float64 rounding unless the model's own
    attention rounds more (Gemma 2's eager softmax runs in float32)."""
    c = Compression(node(strategy), fix_kv_size, keep_ratio, list(skip), n_sink=n_sink, **settings)
    a = run_engine(model, ids, c, "streaming")
    b = run_engine(model, ids, c, engine)
    diff = (a.logits - b.logits).abs().max()
    assert diff <= 1e-4
    assert torch.equal(a.kv_tokens, b.kv_tokens) and torch.equal(a.kv_bytes, b.kv_bytes)
    for i, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers, strict=True) if b.cache is not None else ()):  # masked: no cache
        ka, kb = state_of(a.cache, i), state_of(b.cache, i)
        pa, pb = ka.positions, kb.positions
        assert (pa is None) == (pb is None) and (pa is None or torch.equal(pa, pb) and ka.length == kb.length)
        assert torch.allclose(la.keys, lb.keys, atol=atol) and torch.allclose(la.values, lb.values, atol=atol)
        sa, sb = ka.attention_sum, kb.attention_sum  # what h2o goes on scoring from
        assert (sa is None) == (sb is None) and (sa is None or torch.allclose(sa, sb, atol=atol))
    record_logit_diff(diff)
    return a, b


@pytest.mark.parametrize("arch,strategy,keep_ratio,skip,n_sink", FAST)
def test_replay_equals_streaming(models, ids, arch, strategy, keep_ratio, skip, n_sink):
    check(models[arch], ids, strategy, keep_ratio, skip, n_sink)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("strategy,keep_ratio,skip,n_sink", GRID)
def test_replay_equals_streaming_whole_grid(models, ids, arch, strategy, keep_ratio, skip, n_sink):
    check(models[arch], ids, strategy, keep_ratio, skip, n_sink)


STATIC = sorted(n for n, cls in STRATEGIES.items() if cls.static)
# positions x interval x sort_by_time for every replayable strategy; static ones with true positions also masked
# (under true positions sort_by_time only reorders the cache, which GRID covers)
POLICY_GRID = [(arch, s, pos, interval, sort, engine) for arch, s, pos, interval, sort in
               itertools.product(["gpt_neox", "llama"], REPLAYABLE + list(VARIANTS), ["true", "rerotate"], [1, 5], [True, False])
               if sort or pos == "rerotate" for engine in ["replay"] + (["masked"] if s in STATIC and pos == "true" else [])]
POLICY_FAST = [("gpt_neox", "keep_low", "rerotate", 1, False, "replay"), ("llama", "h2o", "rerotate", 5, True, "replay"),
               ("llama", "keep_low", "true", 5, True, "masked"), ("gpt_neox", "tova", "true", 5, False, "replay"),
               ("llama", "keydiff", "rerotate", 1, False, "replay"), ("gpt_neox", "sinks", "rerotate", 5, True, "replay"),
               ("gemma3", "keep_low", "rerotate", 5, False, "replay"),  # sliding layers keep true positions
               ("llama", "h2o[normalise=mean]", "true", 5, True, "replay"),
               ("llama", "keep_low", "rerotate", 1, True, "replay")]  # engines/rerotated.py: no step loop


def check_policy(models, ids, arch, strategy, positions, interval, sort_by_time, engine):
    skip, n_sink = ((0,), 4) if strategy == "sinks" or interval == 5 else ((), 0)
    check(models[arch], ids[:80], strategy, 0.5, skip, n_sink, 24, engine, positions=positions, interval=interval,
          sort_by_time=sort_by_time)


@pytest.mark.parametrize("arch,strategy,positions,interval,sort_by_time,engine", POLICY_FAST)
def test_one_pass_engines_equal_streaming_under_positions_and_interval(models, ids, arch, strategy, positions,
                                                                      interval, sort_by_time, engine):
    check_policy(models, ids, arch, strategy, positions, interval, sort_by_time, engine)


@pytest.mark.slow
@pytest.mark.parametrize("arch,strategy,positions,interval,sort_by_time,engine", POLICY_GRID)
def test_one_pass_engines_equal_streaming_under_positions_and_interval_whole_grid(models, ids, arch, strategy, positions,
                                                                                 interval, sort_by_time, engine):
    check_policy(models, ids, arch, strategy, positions, interval, sort_by_time, engine)


# Gemma 3 (sliding-window layers 0, 2 with window 16): sliding layers attend uncompressed inside their
# window in both engines and end with the same window of keys; every replayable strategy once, skip [].
@pytest.mark.parametrize("strategy", REPLAYABLE)
def test_replay_equals_streaming_on_gemma3(models, ids, strategy):
    a, b = check(models["gemma3"], ids, strategy, 0.5, (), 4 if strategy == "sinks" else 0)
    assert [layer.keys.shape[-2] for layer in b.cache.layers] == [15, 32, 15, 32]


def test_dynamic_strategies_really_differ_from_each_other(models, ids):
    """A control for the test above: equal engines would also pass if a strategy were ignored."""
    names = ["h2o", "tova", "keydiff", *VARIANTS]
    caches = [run_engine(models["llama"], ids, Compression(node(s), 32, 0.25, []), "replay").cache for s in names]
    kept = [torch.stack([state_of(c, i).positions.sort(-1).values for i in range(len(c.layers))]) for c in caches]
    for (a, ka), (b, kb) in itertools.combinations(zip(names, kept), 2):
        assert not torch.equal(ka, kb), (a, b)


def test_recorded_attention_is_the_models_own(models, ids):
    """The token-by-token engine's recorded weights against transformers' eager attention weights."""
    model = models["llama"]
    c = Compression("h2o", 32, 0.5, [0])
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(ids[None, :30], output_attentions=True).attentions  # per layer (1, Hq, 30, 30)
        model.set_attn_implementation("sdpa")
        with CacheReader(model, c, DynamicCache(config=model.config)) as rec:
            rec(ids[None, :30], 0)  # 30 tokens, under the budget: recorded, nothing pruned
    assert model.config._attn_implementation == "sdpa" and set(rec.recorded) == {1, 2, 3}
    for layer, (last, summed) in rec.recorded.items():
        want = eager[layer][0]
        assert torch.allclose(last[0], want[:, -1], atol=1e-10)
        assert torch.allclose(summed[0], want.view(2, 2, 30, 30).sum(dim=(1, 2)), atol=1e-10)


@pytest.mark.parametrize("strategy,engine", [("keep_low", "masked"), ("h2o", "replay"), ("keydiff", "replay"),
                                             ("random_per_step", "streaming")])
def test_auto_picks_the_fastest_exact_engine(strategy, engine):
    assert pick_engine("auto", Compression(strategy)).name == engine
    assert pick_engine("auto", Compression(strategy, interval=64)).name == engine
    rerotated = pick_engine("auto", Compression(strategy, positions="rerotate")).name
    assert rerotated == ("streaming" if strategy == "random_per_step" else "replay")


def test_engines_that_cannot_reproduce_a_strategy_refuse_it():
    with pytest.raises(ConfigError, match="'tova' re-scores tokens at every step, so engine='masked'"):
        pick_engine("masked", Compression("tova"))
    with pytest.raises(ConfigError, match="'random_per_step' keeps state across layers, so engine='replay'"):
        pick_engine("replay", Compression("random_per_step"))
    with pytest.raises(ConfigError, match="positions='rerotate' moves kept keys after each pruning, so engine='masked'"):
        pick_engine("masked", Compression("keep_low", positions="rerotate"))


def test_attention_strategies_on_a_bare_cache_say_how_to_run_them(models, ids):
    with torch.no_grad():
        cache = models["llama"](ids[None, :60], use_cache=True).past_key_values
    with pytest.raises(ConfigError, match="'h2o' scores tokens by the attention they receive.*knormpress.evaluate"):
        fix_size_l2_compress(cache, fix_kv_size=20, strategy="h2o")


def test_static_strategies_in_time_order_under_rerotate_run_without_the_step_loop(models, ids, monkeypatch):
    """A control for the grid: the equivalence above must come from engines/rerotated.py, not the slots loop."""
    import knormpress.engines.replay as replay

    def refuse(*args, **kwargs):
        raise AssertionError("the step loop ran")

    monkeypatch.setattr(replay, "_replay", refuse)
    check(models["llama"], ids[:80], "keep_low", 0.5, (), 0, 24, positions="rerotate", interval=1)
    with pytest.raises(AssertionError, match="the step loop ran"):  # score order still needs it
        check(models["llama"], ids[:80], "keep_low", 0.5, (), 0, 24, positions="rerotate", sort_by_time=False)
