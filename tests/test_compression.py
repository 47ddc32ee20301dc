import gc
import weakref

import pytest
import torch
from transformers import DynamicCache

from knormpress import Compression, ConfigError, fix_size_l2_compress
from knormpress.compression import CacheCompressor, build_cache, cache_state
from knormpress.strategies import key_norm

from conftest import state_of


def filled_cache(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None], use_cache=True)
    return out.past_key_values


def reference_keep(keys, B, n_recent):
    """Per head: the recent window plus the lowest-norm older tokens, in time order."""
    n = keys.shape[-2]
    recent = list(range(n - n_recent, n))
    norms = key_norm(keys)
    out = []
    for h in range(keys.shape[1]):
        older = sorted(range(n - n_recent), key=lambda p: (norms[0, h, p].item(), p))[: B - n_recent]
        out.append(sorted(older + recent))
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_compression_keeps_budget_recent_window_and_lowest_norms(model, text_ids, ratio):
    cache = filled_cache(model, text_ids[:100])
    before = [(l.keys.clone(), l.values.clone()) for l in cache.layers]
    fix_size_l2_compress(cache, fix_kv_size=32, keep_ratio=ratio, skip_layers=[0, 2])
    n_recent = round(ratio * 32 + 1e-9)
    for i, (layer, (k0, v0)) in enumerate(zip(cache.layers, before)):
        if i in (0, 2):
            assert torch.equal(layer.keys, k0) and torch.equal(layer.values, v0)
            continue
        assert layer.keys.shape[-2] == 32 and layer.values.shape[-2] == 32
        want = torch.tensor(reference_keep(k0, 32, n_recent))
        kept = state_of(cache, i).positions
        assert torch.equal(kept[0], want)
        assert (kept.diff(dim=-1) > 0).all()  # time order
        assert torch.equal(layer.keys[0], k0[0].gather(1, want[..., None].expand(-1, -1, k0.shape[-1])))
        assert torch.equal(layer.values[0], v0[0].gather(1, want[..., None].expand(-1, -1, v0.shape[-1])))


def test_sinks_are_always_kept(model, text_ids):
    cache = filled_cache(model, text_ids[:100])
    fix_size_l2_compress(cache, fix_kv_size=16, keep_ratio=0.25, n_sink=4, strategy="keep_high", skip_layers=[])
    for i in range(len(cache.layers)):
        pos = state_of(cache, i).positions
        assert (pos[..., :4] == torch.arange(4)).all() and (pos[..., -4:] == torch.arange(96, 100)).all()


def test_repeated_compression_tracks_absolute_positions(model, text_ids):
    """Compress, append more tokens, compress again: the recent window follows the text."""
    cache = filled_cache(model, text_ids[:50])
    c = CacheCompressor(Compression(fix_kv_size=20, keep_ratio=0.5, skip_layers=[]))
    c(cache)
    with torch.no_grad():
        model(input_ids=text_ids[50:60][None], position_ids=torch.arange(50, 60)[None], cache=cache, use_cache=True)
    c(cache)
    for i in range(len(cache.layers)):
        assert (state_of(cache, i).positions[..., -10:] == torch.arange(50, 60)).all()
        assert state_of(cache, i).length == 60


def test_a_cache_built_from_kept_tensors_and_state_goes_on_as_the_original(model, text_ids):
    """`build_cache` (how the replay and the prompt pass hand over a cache they compressed) gives a
    cache that the compressor then treats exactly as the one it compressed itself."""
    c = CacheCompressor(Compression("h2o", fix_kv_size=20, keep_ratio=0.5, skip_layers=[]))
    heads, kv_heads = model.config.num_attention_heads, filled_cache(model, text_ids[:2]).layers[0].keys.shape[1]

    def recorded(n):  # what an engine hands the compressor: the last query's weights, the weights summed per KV head
        return {i: (torch.rand(1, heads, n), torch.rand(1, kv_heads, n)) for i in range(4)}

    original = c(filled_cache(model, text_ids[:50]), recorded(50))
    copy = build_cache(model.config, [(l.keys.clone(), l.values.clone(), cache_state(original).get(i))
                                      for i, l in enumerate(original.layers)])
    fed = recorded(23)
    for cache in (original, copy):
        with torch.no_grad():
            model(input_ids=text_ids[50:53][None], position_ids=torch.arange(50, 53)[None], cache=cache, use_cache=True)
        c(cache, fed)
    for i, (a, b) in enumerate(zip(original.layers, copy.layers)):
        assert torch.equal(a.keys, b.keys) and a.keys.shape[-2] == 20
        sa, sb = state_of(original, i), state_of(copy, i)
        assert sa.length == sb.length == 53 and sa.positions[0, 0, -1] == 52
        assert torch.equal(sa.positions, sb.positions) and torch.equal(sa.attention_sum, sb.attention_sum)


def test_the_state_does_not_keep_a_cache_alive(model, text_ids):
    cache = fix_size_l2_compress(filled_cache(model, text_ids[:40]), fix_kv_size=20)
    assert state_of(cache, 2).positions is not None
    gone = weakref.ref(cache)
    del cache
    gc.collect()
    assert gone() is None


def test_random_is_reproducible_per_seed_and_differs_across_seeds(model, text_ids):
    kept = {}
    for seed in (0, 0, 1):
        cache = filled_cache(model, text_ids[:200])
        fix_size_l2_compress(cache, fix_kv_size=40, keep_ratio=0.25, strategy={"name": "random", "seed": seed}, skip_layers=[])
        kept.setdefault(seed, []).append(torch.cat([state_of(cache, i).positions for i in range(len(cache.layers))]))
    assert torch.equal(kept[0][0], kept[0][1])
    assert not torch.equal(kept[0][0], kept[1][0])


def test_score_order_layout_holds_the_same_tokens(model, text_ids):
    a, b = filled_cache(model, text_ids[:120]), filled_cache(model, text_ids[:120])
    fix_size_l2_compress(a, fix_kv_size=24, sort_by_time=True)
    fix_size_l2_compress(b, fix_kv_size=24, sort_by_time=False)
    for i in range(2, len(a.layers)):
        pa, pb = state_of(a, i).positions, state_of(b, i).positions
        assert not torch.equal(pa, pb)
        assert torch.equal(pa, pb.sort(dim=-1).values)


@pytest.mark.parametrize("kwargs,words", [
    (dict(strategy="keep_lo"), ["unknown strategy 'keep_lo'", "h2o, keep_high, keep_low, keydiff, oracle, random"]),
    (dict(keep_ratio=1.5), ["keep_ratio must lie in [0, 1]", "1.5"]),
    (dict(keep_ratio=-0.1), ["keep_ratio must lie in [0, 1]"]),
    (dict(fix_kv_size=0), ["fix_kv_size must be an integer >= 1"]),
    (dict(n_sink=600), ["n_sink must be an integer in [0, fix_kv_size=512)"]),
    (dict(strategy="sinks"), ["needs n_sink >= 1"]),
    (dict(skip_layers=[0, 9]), ["skip_layers [9] do not exist", "layers 0..3"]),
    (dict(fix_kv=64), ["compress has no setting 'fix_kv'", "strategy, fix_kv_size, keep_ratio, skip_layers, sort_by_time, n_sink, positions, interval, ratio, when"]),
    (dict(when="later"), ["unknown compress.when 'later'; choose one of prefill, streaming"]),
    (dict(ratio=0.9), ["give the budget once, as fix_kv_size (tokens) or ratio", "got fix_kv_size=512, ratio=0.9"]),
    (dict(fix_kv_size=None), ["give the budget once", "got fix_kv_size=None, ratio=None"]),
    (dict(fix_kv_size=None, ratio=1.0), ["ratio must lie in (0, 1)", "got 1.0"]),
    (dict(fix_kv_size=None, ratio=0.5), ["ratio=0.5 gives no budget until a length is known"]),
    (dict(strategy={"name": "random", "sed": 1}), ["strategy 'random' has no setting 'sed'; its settings are: seed"]),
])
def test_bad_input_gives_one_clear_error(model, text_ids, kwargs, words):
    cache = filled_cache(model, text_ids[:10])
    with pytest.raises(ConfigError) as err:
        fix_size_l2_compress(cache, **kwargs)
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cache", [((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),), "cache"])
def test_unsupported_cache_types_are_refused(cache):
    with pytest.raises(ConfigError, match="cannot compress a .*pass a transformers DynamicCache"):
        fix_size_l2_compress(cache)


def test_empty_dynamic_cache_is_a_no_op():
    assert fix_size_l2_compress(DynamicCache()).get_seq_length() == 0


def test_the_spec_round_trips_through_its_config_node():
    c = Compression({"name": "random", "seed": 7}, fix_kv_size=64, keep_ratio=0, skip_layers=[3, 1, 1], n_sink=2)
    node = c.to_dict()
    assert node == {"strategy": {"name": "random", "seed": 7}, "fix_kv_size": 64, "keep_ratio": 0.0,
                    "skip_layers": [1, 3], "sort_by_time": True, "n_sink": 2, "positions": "true",
                    "interval": 1, "when": "streaming", "ratio": None}
    assert Compression.from_dict(node) == c


@pytest.mark.parametrize("ratio,n_tokens,size", [(0.9, 1024, 102), (0.5, 1001, 501), (0.7, 1000, 300), (0.99, 20, 1)])
def test_a_ratio_resolves_to_the_share_of_the_prompt_it_keeps(ratio, n_tokens, size):
    c = Compression(fix_kv_size=None, ratio=ratio, n_sink=0).resolved(n_tokens)
    assert (c.fix_kv_size, c.ratio) == (size, None)
    assert Compression(fix_kv_size=64).resolved(n_tokens).fix_kv_size == 64
    with pytest.raises(ConfigError, match="n_sink=4 leaves no room in the 1 tokens"):
        Compression("sinks", fix_kv_size=None, ratio=0.99, n_sink=4).resolved(20)


def test_a_spec_and_keywords_together_are_refused(model, text_ids):
    with pytest.raises(ConfigError, match="either a Compression or its settings"):
        fix_size_l2_compress(filled_cache(model, text_ids[:10]), Compression(), fix_kv_size=8)


def test_a_layer_is_pruned_once_it_holds_budget_plus_interval(model, text_ids):
    c = Compression(fix_kv_size=20, keep_ratio=0.5, skip_layers=[], interval=8)
    waiting, due = filled_cache(model, text_ids[:27]), filled_cache(model, text_ids[:28])
    fix_size_l2_compress(waiting, c)
    fix_size_l2_compress(due, c)
    assert {l.keys.shape[-2] for l in waiting.layers} == {27} and {l.keys.shape[-2] for l in due.layers} == {20}


@pytest.mark.parametrize("settings,message", [
    ({"positions": "bogus"}, "unknown positions 'bogus'; choose one of true, rerotate"),
    ({"positions": False}, "unknown positions False; choose one of true, rerotate"),
    ({"interval": 0}, "interval must be an integer >= 1"),
    ({"interval": 2.5}, "interval must be an integer >= 1"),
])
def test_bad_positions_and_interval_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Compression(**settings)


def test_positions_read_as_a_yaml_boolean_mean_true():
    assert Compression(positions=True).positions == "true"


def test_rerotate_on_a_bare_cache_says_how_to_run_it(model, text_ids):
    with pytest.raises(ConfigError, match="positions='rerotate' moves keys with the model's rotary embedding"):
        fix_size_l2_compress(filled_cache(model, text_ids[:40]), fix_kv_size=20, positions="rerotate")


@pytest.mark.parametrize("settings,warns", [
    (dict(strategy="h2o", keep_ratio=0), True),
    (dict(strategy="h2o", keep_ratio=0.01, fix_kv_size=32), True),  # 0.32 slots round to no window
    (dict(strategy="h2o", keep_ratio=0.5), False),
    (dict(strategy={"name": "h2o", "normalise": "mean"}, keep_ratio=0), False),  # a new token's mean is not one weight
    (dict(strategy="tova", keep_ratio=0), False),
])
def test_h2o_without_a_recent_window_warns_in_one_line(settings, warns, caplog):
    from knormpress.spec import _advise

    _advise.cache_clear()
    with caplog.at_level("WARNING", logger="knormpress"):
        Compression(**settings)
        Compression(**settings)  # a run builds its compression several times: still one line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == warns
    if warns:
        assert "h2o with keep_ratio=" in lines[0] and "keeps no recent window" in lines[0] and "evicted at once" in lines[0]
        assert "\n" not in lines[0]


def test_keydiff_keeps_the_tokens_of_the_papers_definition_on_a_bare_cache(model, text_ids):
    """KeyDiff on a bare cache, keep_ratio 0: per layer and KV head the B keys with the lowest cosine to the
    mean unit key of the cache, computed here in float64 from the definition; ties to the earlier position."""
    cache = filled_cache(model, text_ids[:60])
    before = [l.keys.double().clone() for l in cache.layers]
    fix_size_l2_compress(cache, fix_kv_size=20, keep_ratio=0.0, strategy="keydiff", skip_layers=[])
    for i, keys in enumerate(before):
        for h in range(keys.shape[1]):
            k = keys[0, h]
            unit = k / k.norm(dim=-1, keepdim=True)
            anchor = unit.mean(dim=0)
            cos = (k @ anchor) / (k.norm(dim=-1) * anchor.norm())
            want = sorted(sorted(range(60), key=lambda j: (cos[j].item(), j))[:20])
            assert state_of(cache, i).positions[0, h].tolist() == want
