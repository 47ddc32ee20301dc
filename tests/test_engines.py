import pytest
import torch
import torch.nn.functional as F

from knormpress import Compression, ConfigError, evaluate, fix_size_l2_compress, run_engine

from conftest import state_of, tiny_model


def test_baseline_equals_one_plain_forward(model, text_ids):
    res = evaluate(model, text_ids, engine="streaming")
    with torch.no_grad():
        logits = model(text_ids[None]).logits[0, :-1].float()
    assert res.nll.shape == res.correct.shape == (299,)
    assert torch.allclose(res.nll, F.cross_entropy(logits, text_ids[1:], reduction="none"), atol=1e-4)
    assert torch.equal(res.correct, logits.argmax(-1) == text_ids[1:])
    assert res.kv_tokens_peak == 299


def test_budget_at_least_the_text_gives_baseline_nll(model, text_ids):
    base = evaluate(model, text_ids, engine="streaming")
    same = evaluate(model, text_ids, Compression(fix_kv_size=300, skip_layers=[]), engine="streaming")
    assert torch.equal(base.nll, same.nll)


def test_compression_changes_nll_and_holds_the_budget(model, text_ids):
    c = Compression(fix_kv_size=32, keep_ratio=0.5, skip_layers=[0])
    res = evaluate(model, text_ids[:120], c, engine="streaming")
    base = evaluate(model, text_ids[:120], engine="streaming")
    n_layers = model.config.num_hidden_layers
    assert not torch.allclose(res.nll, base.nll)
    assert res.kv_tokens_peak == pytest.approx((119 + 32 * (n_layers - 1)) / n_layers)
    assert res.kv_bytes_peak < base.kv_bytes_peak


def test_sort_by_time_cannot_matter_when_keys_are_cached_after_rotary(model, text_ids):
    """Attention is a weighted sum over keys that already carry their positions, so the order
    of the kept tokens in the cache changes nothing but float summation order."""
    a = evaluate(model, text_ids[:150], Compression(fix_kv_size=32, sort_by_time=True), engine="streaming")
    b = evaluate(model, text_ids[:150], Compression(fix_kv_size=32, sort_by_time=False), engine="streaming")
    assert (a.nll - b.nll).abs().max() < 1e-4


def test_sort_by_time_changes_the_logits_when_kept_keys_are_rerotated(model, text_ids):
    """Under rerotate a kept key's rotation is its slot, so the order of the kept tokens reaches attention."""
    a, b = (run_engine(model, text_ids[:80], Compression(fix_kv_size=32, sort_by_time=s, positions="rerotate"),
                       engine="streaming") for s in (True, False))
    assert (a.logits - b.logits).abs().max() > 1e-3
    assert torch.equal(*(torch.stack([state_of(o.cache, i).positions.sort(-1).values for i in (2, 3)]) for o in (a, b)))


def test_bad_engine_and_short_text(model, text_ids):
    with pytest.raises(ConfigError, match="unknown engine 'fast'; choose one of"):
        evaluate(model, text_ids, engine="fast")
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        evaluate(model, text_ids[:1])
    with pytest.raises(ConfigError, match="skip_layers \\[7\\] do not exist"):
        evaluate(model, text_ids, Compression(skip_layers=[7]))


def test_streaming_returns_the_compressed_cache_it_ends_with(model, text_ids):
    from knormpress import run_engine

    out = run_engine(model, text_ids[:100], Compression(fix_kv_size=32, skip_layers=[0]), engine="streaming")
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths == [99] + [32] * (len(lengths) - 1)  # the last token is never read: nothing predicts from it
    assert out.kv_tokens[-1].item() == sum(lengths) / len(lengths)
    assert run_engine(model, text_ids[:100], Compression(fix_kv_size=32), engine="masked").cache is None


# Gemma 3 shape: sliding-window layers (window 16) between full ones; 300 tokens put most keys outside a window.
GEMMA_ENGINES = ("masked", "replay", "streaming")


@pytest.fixture(scope="module")
def gemma3():
    return tiny_model("gemma3")


@pytest.mark.parametrize("engine", GEMMA_ENGINES)
def test_uncompressed_engines_equal_the_plain_forward_on_gemma3(gemma3, text_ids, engine):
    """Each engine reproduces transformers' own forward pass, sliding windows included."""
    from knormpress import run_engine

    with torch.no_grad():
        plain = gemma3(text_ids[None]).logits[0, :-1].float()
    out = run_engine(gemma3, text_ids, None, engine=engine)
    assert (out.logits - plain).abs().max() <= 1e-5
    window = gemma3.config.sliding_window
    held = torch.arange(1, 300, dtype=torch.float64)  # layers 0, 2 slide: they hold at most window - 1 = 15 tokens
    assert torch.equal(out.kv_tokens, (2 * held + 2 * held.clamp(max=window - 1)) / 4)


def test_the_budget_applies_to_full_layers_only(gemma3, text_ids):
    """A sliding layer already holds at most its window: never compressed, never counted against the budget."""
    from knormpress import run_engine

    c = Compression(fix_kv_size=32, keep_ratio=0.5, skip_layers=[])
    out = run_engine(gemma3, text_ids[:100], c, engine="streaming")
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == [15, 32, 15, 32]
    assert [state_of(out.cache, i).positions is not None for i in range(4)] == [False, True, False, True]
    assert out.kv_tokens[-1].item() == (15 + 32 + 15 + 32) / 4
    masked = run_engine(gemma3, text_ids[:100], c, engine="masked")
    assert torch.equal(masked.kv_tokens, out.kv_tokens) and torch.equal(masked.kv_bytes, out.kv_bytes)
    assert (masked.logits - out.logits).abs().max() <= 1e-4


def test_library_compression_leaves_sliding_layers_alone(gemma3, text_ids):
    with torch.no_grad():
        cache = gemma3(text_ids[None, :100], use_cache=True).past_key_values
    before = [layer.keys.clone() for layer in cache.layers]
    fix_size_l2_compress(cache, fix_kv_size=32, skip_layers=[])
    assert [layer.keys.shape[-2] for layer in cache.layers] == [15, 32, 15, 32]
    assert torch.equal(cache.layers[0].keys, before[0]) and torch.equal(cache.layers[2].keys, before[2])


@pytest.mark.slow
def test_uncompressed_engines_equal_the_plain_forward_on_gemma3_270m(gemma3_270m, gemma3_ids):
    """1000 real tokens, window 512: the 15 local layers drop keys from query 512 on. In float32 the
    engines differ from the forward pass by rounding only (measured 3.4e-5 on logits up to 41)."""
    from knormpress import run_engine

    model = gemma3_270m.model
    with torch.no_grad():
        plain = model(gemma3_ids[None]).logits[0, :-1].float()
    layers = model.config.layer_types
    for engine in GEMMA_ENGINES:
        out = run_engine(model, gemma3_ids, None, engine=engine)
        assert (out.logits - plain).abs().max() <= 1e-3, engine
        assert out.kv_tokens[-1].item() == sum(511 if t == "sliding_attention" else 999 for t in layers) / len(layers)
        del out
