"""Retrieval tasks: prompts of exact length with the key where the depth says, the prompt pass's
compressed cache against the token-by-token one (both `compress.when`), decoding against the
streaming engine, scoring and metrics by hand, and the one-line errors."""

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import DynamicCache

from knormpress import STRATEGIES, Compression, ConfigError, fix_size_l2_compress, get_task, run_engine
from knormpress.compression import CacheCompressor
from knormpress.config import EvalConfig
from knormpress.engines.prompt import generate, prompt_cache
from knormpress.engines.streaming import CacheReader
from knormpress.sources.datasets import get_dataset
from knormpress.sources.tiny import ByteTokenizer

from conftest import VOCAB, seeded, state_of, tiny_model

# every static strategy, and the dynamic ones a prompt pass can prune once (random_per_step is
# the one strategy without an exact one-pass engine; the oracle has no token-by-token reference: its replay
# is checked by hand in test_diagnostics_recall, its prefill score in test_strategies)
STRATEGY_NAMES = sorted(n for n, cls in STRATEGIES.items() if cls.replayable and not cls.needs_next_query)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").double()


@pytest.fixture(scope="module")
def bundle():
    model = tiny_model("llama")
    return SimpleNamespace(model=model, tokenizer=ByteTokenizer(VOCAB), name="tiny")


def spec(name: str, when: str, size: int = 16) -> Compression:
    return Compression(seeded(name, 3), size, 0.25, [0], n_sink=2 if name == "sinks" else 0, when=when)


def reference_prefill(model, ids: torch.Tensor, c: Compression) -> DynamicCache:
    """The prompt read token by token into an uncompressed cache (attention received summed step by
    step where the strategy needs it), then pruned once."""
    cache, T = DynamicCache(config=model.config), ids.shape[0]
    keep_all = Compression(c.strategy, T + 1, c.keep_ratio, c.skip_layers, n_sink=c.n_sink)  # sums the attention, prunes nothing
    with CacheReader(model, keep_all, cache) as read, torch.no_grad():
        for t in range(T):
            read(ids[None, t:t + 1], t)
    if not c.strategy.needs_attention:
        return fix_size_l2_compress(cache, c)
    return CacheCompressor(c)(cache, {l: (last, torch.zeros_like(total)) for l, (last, total) in read.recorded.items()})


def assert_same_cache(a: DynamicCache, b: DynamicCache) -> None:
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert torch.allclose(la.keys, lb.keys, atol=1e-10) and torch.allclose(la.values, lb.values, atol=1e-10)
        for name in ("positions", "attention_sum"):
            xa, xb = getattr(state_of(a, i), name), getattr(state_of(b, i), name)
            assert (xa is None) == (xb is None), name
            assert xa is None or torch.allclose(xa.double(), xb.double(), atol=1e-10), name


@pytest.mark.parametrize("name", STRATEGY_NAMES)
@pytest.mark.parametrize("when", ["prefill", "streaming"])
def test_prompt_pass_cache_equals_the_token_by_token_one(llama, name, when):
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(4))
    c = spec(name, when)
    cache, logits, _, _ = prompt_cache(llama, ids, c)
    if when == "streaming":  # the reference reads one more token: its cache stops before the last one
        expected = run_engine(llama, torch.cat([ids, ids[:1]]), c, "streaming")
        assert torch.allclose(logits, expected.logits[-1], atol=1e-8)
        assert_same_cache(cache, expected.cache)
    else:
        assert_same_cache(cache, reference_prefill(llama, ids, c))
    assert all(l.keys.shape[-2] == (40 if i == 0 else 16) for i, l in enumerate(cache.layers))


@pytest.mark.parametrize("name,when", [("h2o", "prefill"), ("h2o", "streaming")])
def test_batched_decoding_equals_the_streaming_engine_reading_the_answer(llama, name, when):
    prompts = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    c = spec(name, when)
    out = generate(llama, prompts, c, 5, lambda ids: False)
    assert [len(t) for t in out.tokens] == [5, 5] and out.engine == ("prefill" if when == "prefill" else "replay")
    for row, answer in zip(prompts, out.tokens):
        single = generate(llama, row[None], c, 5, lambda ids: False).tokens[0]
        assert single == answer  # a batch decodes as each prompt alone
        if when == "streaming":  # every decoded token is read under the same policy, as the engine reads text
            read = run_engine(llama, torch.cat([row, torch.tensor(answer)]), c, "streaming")
            assert read.logits[39:].argmax(-1).tolist() == answer  # row q predicts token q + 1
    assert out.kv_tokens_answer == pytest.approx((40 + 3 * 16) / 4)  # layer 0 uncompressed, three at the budget
    assert out.kv_tokens.shape == (39 + 4,)


def test_prompts_have_the_exact_length_and_the_key_at_its_depth(bundle):
    task = get_task({"name": "passkey", "lengths": [400, 700], "depths": [0.0, 0.5, 1.0], "trials": 2})
    groups = task.samples(bundle, {}, EvalConfig(), None)
    assert [g.input_ids.shape for g in groups] == [(6, 400), (6, 700)]
    for g in groups:
        for ids, trial in zip(g.input_ids, g.trials):
            text = bundle.tokenizer.decode(ids)
            line = f"The pass key is {trial['key']}. Remember it. {trial['key']} is the pass key."
            assert re.fullmatch(r"\d{5}", trial["key"]) and text.count(line) == 1
            before, after = text.split(line)
            assert before.startswith("There is an important info hidden") and after.endswith("What is the pass key? The pass key is")
            head = len(task.instruction) + 1
            filler = len(text) - len(line) - head - len(" What is the pass key? The pass key is")
            share = (len(before) - head) / filler  # of the filler, before the key: the depth, snapped back to a sentence end
            assert trial["depth"] - 30 / filler <= share <= trial["depth"] + 1e-9
    keys = [t["key"] for g in groups for t in g.trials]
    assert len(set(keys)) == len(keys)  # every prompt its own key


def test_needle_hides_a_seven_digit_number_in_the_dataset_text(bundle, tmp_path):
    (tmp_path / "a.txt").write_text("Once upon a time there was a tale. " * 80)
    (tmp_path / "b.txt").write_text("The river ran on and on. It did not stop! " * 80)
    task = get_task({"name": "needle", "lengths": [500], "depths": [0.5], "trials": 2})
    groups = task.samples(bundle, get_dataset({"name": "local_text", "path": str(tmp_path)}), EvalConfig(), str(tmp_path / "cache"))
    texts = [bundle.tokenizer.decode(ids) for ids in groups[0].input_ids]
    for text, trial in zip(texts, groups[0].trials):
        word = re.search(r"special magic number for (\w+)\?", text).group(1)
        assert re.fullmatch(r"\d{7}", trial["key"]) and f". The special magic number for {word} is {trial['key']}." in text
    assert ("tale" in texts[0]) != ("tale" in texts[1])  # each trial its own text


def records(correct: list[bool], lengths: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"text_id": [f"t{i}" for i in range(len(correct))], "length": lengths,
                         "depth": [0.0, 0.5] * (len(correct) // 2), "correct": correct})


def test_metrics_by_hand():
    run = records([True, True, False, True], [100, 100, 200, 200])
    base = records([True, True, True, True], [100, 100, 200, 200])
    m = get_task("passkey").metrics(run, base, n_boot=200, seed=0)
    assert m["accuracy"] == 0.75 and m["n_trials"] == 4
    assert (m["accuracy_lo"], m["accuracy_hi"]) == pytest.approx((0.3006, 0.9544), abs=1e-4)  # Wilson, 3 of 4
    assert (m["accuracy_len100"], m["accuracy_len200"]) == (1.0, 0.5)
    assert m["baseline_accuracy"] == 1.0 and m["delta_accuracy_pct"] == pytest.approx(-25.0)
    assert m["delta_accuracy_pct_lo"] <= -25.0 <= m["delta_accuracy_pct_hi"] <= 0
    curves = get_task("passkey").histories(run)
    assert curves["accuracy_len200"] == [(0, 0.0), (50, 1.0)]


def test_the_first_number_decides_and_ends_decoding(bundle):
    from knormpress.tasks.retrieval import NUMBER, _answered

    for answer, correct in ((" 12345. The", True), (" 123456", False), (" is 9 and 12345", False), (" none", False)):
        found = NUMBER.search(answer)
        assert ((found.group() if found else None) == "12345") == correct
    assert _answered(bundle.tokenizer.encode(" 12345."), bundle.tokenizer)
    assert not _answered(bundle.tokenizer.encode(" 1234"), bundle.tokenizer)


@pytest.mark.parametrize("task,compress,ev,words", [
    ({"name": "passkey", "lengths": [1024]}, dict(fix_kv_size=1024), {}, "fix_kv_size=1024 is not smaller than the shortest prompt (1024 tokens"),
    ({"name": "passkey"}, dict(fix_kv_size=None, ratio=0.5), {"engine": "masked"}, "engine 'masked' never builds"),
    ({"name": "lm"}, dict(when="prefill"), {}, "task lm compresses while it reads, so it needs compress.when=streaming"),
])
def test_mistakes_get_one_line(task, compress, ev, words):
    with pytest.raises(ConfigError) as err:
        get_task(task).check(Compression(**compress), EvalConfig(**ev))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("node,words", [
    ({"lengths": [9000]}, "a prompt of 9000 tokens plus 8 answer tokens exceeds tiny's context of 8192 tokens"),
    ({"lengths": [100]}, "task.lengths 100 is too short for the instruction, needle and question"),
    ({"depths": [1.5]}, "task.depths must be fractions of the prompt in [0, 1]"),
    ({"trials": 0}, "task.trials must be an integer >= 1"),
])
def test_bad_grids_get_one_line(bundle, node, words):
    with pytest.raises(ConfigError) as err:
        get_task({"name": "passkey", **node}).samples(bundle, {}, EvalConfig(), None)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_change_in_accuracy_has_the_paired_bootstrap_interval_written_out():
    """Trials drawn with replacement, the same draws for the run and the baseline; 2.5th and 97.5th percentiles."""
    import numpy as np

    rng = np.random.default_rng(1)
    run = records((rng.random(12) < 0.5).tolist(), [100] * 12)
    base = records((rng.random(12) < 0.9).tolist(), [100] * 12)
    m = get_task("passkey").metrics(run, base, n_boot=300, seed=5)
    draws, resample = [], np.random.default_rng(5)
    for _ in range(300):
        counts = resample.multinomial(12, [1 / 12] * 12)
        a, b = counts @ run.correct.to_numpy(float), counts @ base.correct.to_numpy(float)
        draws.append(100 * (a / b - 1))
    assert (m["delta_accuracy_pct_lo"], m["delta_accuracy_pct_hi"]) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])))
