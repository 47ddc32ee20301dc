"""The masked engine must reproduce the streaming engine, logit for logit."""

import copy
import itertools

import pytest
import torch

from transformers import DynamicCache

from knormpress import STRATEGIES, Compression, ConfigError, evaluate, run_engine
from knormpress.compression import CacheCompressor
from knormpress.engines import masked, pick_engine, streaming
from knormpress.engines.maths import cache_windows
from knormpress.engines.masked import masked_attention
from knormpress.eviction import expiry

from conftest import seeded, state_of, tiny_model, visible

STATIC = sorted(n for n, cls in STRATEGIES.items() if cls.static)
GRID = [(s, kr, skip, sink) for s, kr, skip, sink in itertools.product(STATIC, [0.0, 0.3, 0.5, 1.0], [(), (0, 1)], [0, 4])
        if not (s == "sinks" and sink == 0)]
# the fast suite: every static strategy once at the default keep_ratio, skip layers and sinks alternating,
# plus pure selection (keep_ratio 0) with sinks; the whole grid runs as `slow`
FAST = [(s, 0.5, (0, 1) if i % 2 else (), 4 if s == "sinks" or i % 2 == 0 else 0) for i, s in enumerate(STATIC)]
FAST += [("keep_low", 0.0, (0, 1), 4)]


def logits_both(model, ids, compression):
    streamed, masked = (run_engine(model, ids, compression, engine) for engine in ("streaming", "masked"))
    assert torch.equal(streamed.kv_tokens, masked.kv_tokens) and torch.equal(streamed.kv_bytes, masked.kv_bytes)
    return streamed.logits, masked.logits


def check(model, ids, strategy, keep_ratio, skip, n_sink, fix_kv_size=64):
    c = Compression(seeded(strategy, 5), fix_kv_size, keep_ratio, list(skip), n_sink=n_sink)
    a, b = logits_both(model, ids, c)
    assert (a - b).abs().max() <= 1e-4
    target = ids[1:]
    assert torch.equal(a.argmax(-1) == target, b.argmax(-1) == target)


@pytest.mark.parametrize("strategy,keep_ratio,skip,n_sink", FAST)
def test_masked_equals_streaming(model, text_ids, strategy, keep_ratio, skip, n_sink):
    check(model, text_ids, strategy, keep_ratio, skip, n_sink)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,keep_ratio,skip,n_sink", GRID)
def test_masked_equals_streaming_whole_grid(model, text_ids, strategy, keep_ratio, skip, n_sink):
    check(model, text_ids, strategy, keep_ratio, skip, n_sink)


def test_several_query_blocks(text_ids, monkeypatch):
    """A text longer than budget + 2 blocks exercises block boundaries (blocks made small to stay fast)."""
    monkeypatch.setattr(masked, "BLOCK", 48)
    ids = torch.randint(0, 256, (32 + 2 * 48 + 37,), generator=torch.Generator().manual_seed(2))
    check(tiny_model("llama", layers=2), ids, "keep_low", 0.5, (), 0, fix_kv_size=32)


def test_auto_picks_masked_for_static_and_streaming_otherwise():
    assert pick_engine("auto", None).name == "masked"
    assert pick_engine("auto", Compression("keep_low")).name == "masked"
    assert pick_engine("auto", Compression("random_per_step")).name == "streaming"


def test_masked_refuses_a_strategy_that_rescores(model, text_ids):
    with pytest.raises(ConfigError, match="re-scores tokens at every step.*'streaming'"):
        evaluate(model, text_ids, Compression("random_per_step"), engine="masked")


def test_per_step_random_differs_from_static_random(model, text_ids):
    a = evaluate(model, text_ids[:100], Compression({"name": "random", "seed": 1}, 32, 0.25, []), engine="streaming")
    b = evaluate(model, text_ids[:100], Compression({"name": "random_per_step", "seed": 1}, 32, 0.25, []), engine="streaming")
    assert not torch.equal(a.nll, b.nll)


def test_attention_outside_evaluate_is_refused():
    with pytest.raises(RuntimeError, match="only runs inside knormpress.evaluate"):
        masked_attention(None, None, None, None, None)


def test_model_attention_is_restored(model, text_ids):
    before = model.config._attn_implementation
    evaluate(model, text_ids[:80], Compression(fix_kv_size=16), engine="masked")
    assert model.config._attn_implementation == before


@pytest.mark.slow
def test_masked_equals_streaming_on_smollm2(smollm2, gutenberg_ids, monkeypatch):
    """640 real tokens (a budget of 256, so 383 steps evict): the kept sets agree exactly at every
    checked step, logits to 1e-4.

    Run in float64: in float32, one-token steps and one batched pass differ by up to ~5e-4 in
    the logits (~25) through 30 layers from rounding alone, which would hide nothing but noise.
    (RMSNorm still rounds through float32, so float64 differences are ~1e-5, not ~1e-12.)
    """
    model, ids = copy.deepcopy(smollm2.model).double(), gutenberg_ids[:640]
    c = Compression("keep_low", fix_kv_size=256, keep_ratio=0.5, skip_layers=[0, 1])
    expiries = {}

    def spy(scores, budget, interval):  # called for the compressed layers 2, 3, ... in order
        full = expiry(scores, budget, interval)
        expiries[2 + len(expiries)] = full[0]
        return full

    monkeypatch.setattr(masked, "expiry", spy)
    with torch.no_grad():
        masked_logits = run_engine(model, ids, c, "masked").logits
        cache, compress, streamed = DynamicCache(config=model.config), CacheCompressor(c), []
        for t in range(len(ids) - 1):
            out = model(input_ids=ids[None, t : t + 1], position_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
            streamed.append(out.logits[0])
            compress(cache)
            if t % 100 == 99 and t >= c.fix_kv_size:
                for layer, exp in expiries.items():
                    sees = visible(exp, torch.tensor([t + 1]))[:, 0, : t + 1]
                    held = torch.zeros_like(sees).scatter_(1, state_of(cache, layer).positions[0], True)
                    assert torch.equal(held, sees), (t, layer)
    streamed = torch.cat(streamed)
    target = ids[1:]
    assert torch.equal(streamed.argmax(-1) == target, masked_logits.argmax(-1) == target)
    assert (streamed - masked_logits).abs().max() <= 1e-4


# The equivalence standard on a tiny Gemma 3 (sliding-window layers 0, 2 with window 16, full layers 1, 3):
# float64, logits to 1e-4, identical held memory and kept sets, over static strategies x keep_ratio x skip x sinks.
GEMMA_GRID = [(s, kr, skip, sink) for s, kr, skip, sink in itertools.product(STATIC, [0.0, 0.5, 1.0], [(), (0, 1)], [0, 4])
              if not (s == "sinks" and sink == 0)]


@pytest.fixture(scope="module")
def gemma3_f64():
    return tiny_model("gemma3").double()


def check_gemma3(model, ids, strategy, keep_ratio, skip, n_sink, monkeypatch):
    """At every step the streaming cache of each compressed (full) layer holds exactly the keys the
    one-pass engine leaves visible to the next query, and each sliding layer its last window - 1 keys."""
    c = Compression(seeded(strategy, 5), 64, keep_ratio, list(skip), n_sink=n_sink)
    windows = cache_windows(model)
    compressed = [l for l, w in enumerate(windows) if w is None and l not in c.skip_layers]
    expiries, steps = [], []

    def spy(scores, budget, interval):  # called for the compressed layers, in layer order
        expiries.append(expiry(scores, budget, interval)[0])
        return expiry(scores, budget, interval)

    class Recorder(CacheCompressor):
        def __call__(self, cache, *args):
            super().__call__(cache, *args)
            states = [state_of(cache, i) for i in range(len(cache.layers))]
            steps.append([(s.length if s.positions is not None else None, s.positions, l.keys.shape[-2])
                          for s, l in zip(states, cache.layers)])
            return cache

    monkeypatch.setattr(masked, "expiry", spy)
    monkeypatch.setattr(streaming, "CacheCompressor", Recorder)
    a, b = logits_both(model, ids, c)  # also asserts identical held tokens and bytes
    assert (a - b).abs().max() <= 1e-4
    assert len(expiries) == len(compressed) and len(steps) == len(ids) - c.fix_kv_size
    for q, layers in enumerate(steps, start=c.fix_kv_size):  # the cache as query q starts
        for layer, (seen, positions, length) in enumerate(layers):
            if windows[layer] is not None:
                assert length == min(q, windows[layer] - 1)
            elif layer in compressed and seen is not None:
                assert seen == q
                sees = visible(expiries[compressed.index(layer)], torch.tensor([q]))[:, 0, :q]
                assert torch.equal(torch.zeros_like(sees).scatter_(1, positions[0], True), sees), (q, layer)
            else:
                assert length == q


@pytest.mark.parametrize("strategy,keep_ratio,skip,n_sink", GEMMA_GRID[::15])
def test_masked_equals_streaming_on_gemma3(gemma3_f64, text_ids, strategy, keep_ratio, skip, n_sink, monkeypatch):
    """A spread over every axis of the grid on 100 tokens (35 queries past the budget), to stay fast."""
    check_gemma3(gemma3_f64, text_ids[:100], strategy, keep_ratio, skip, n_sink, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,keep_ratio,skip,n_sink", GEMMA_GRID)
def test_masked_equals_streaming_on_gemma3_whole_grid(gemma3_f64, text_ids, strategy, keep_ratio, skip, n_sink, monkeypatch):
    check_gemma3(gemma3_f64, text_ids, strategy, keep_ratio, skip, n_sink, monkeypatch)


def test_a_window_the_cache_does_not_know_is_refused(text_ids):
    """Held memory is what transformers' cache holds, so the attention's window must be the cache's."""
    model = tiny_model("gemma3", layers=2)
    model.model.layers[1].self_attn.sliding_window = 8  # layer 1 is a full layer in the config and the cache
    with pytest.raises(ConfigError, match="layer 1 attends with sliding_window=8 but transformers' cache"):
        evaluate(model, text_ids[:40], engine="masked")
