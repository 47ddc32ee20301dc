"""The prompt pass's store and batches: an uncompressed pass is computed once, stored under the
cache dir and read back memory-mapped with the same numbers (by any later job), keyed by model and
prompt; prompts decode in batches of `BATCH` with the answers and memory of one batch of all."""

import pytest
import torch

from knormpress import Compression
from knormpress.engines import prompt
from knormpress.engines.prompt import generate, prompt_cache, stored_path, uncompressed_pass

from conftest import VOCAB, tiny_model


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("KNORMPRESS_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").double()


def ids(seed: int, T: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(seed))


def test_a_pass_is_computed_once_and_read_back_from_disk_unchanged(llama, store, monkeypatch):
    prompt_ids = ids(1)
    first = uncompressed_pass(llama, prompt_ids)
    path = stored_path(llama, prompt_ids)
    assert path.is_file() and path.is_relative_to(store / prompt.STORE)
    with torch.no_grad():  # the model itself, read without the store: the last position's logits
        want = llama(input_ids=prompt_ids[None]).logits[0, -1]
    assert torch.equal(first.logits, want.float())

    def computed(*args):
        raise AssertionError("a stored pass was computed again")

    monkeypatch.setattr(prompt, "_read", computed)
    again = uncompressed_pass(llama, prompt_ids)
    assert torch.equal(again.logits, first.logits)
    for (k1, v1), (k2, v2) in zip(first.layers, again.layers, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert first.attention.keys() == again.attention.keys()
    for layer, (last, total) in first.attention.items():
        assert torch.equal(last, again.attention[layer][0]) and torch.equal(total, again.attention[layer][1])


def test_the_store_is_keyed_by_prompt_and_model(llama, store):
    assert stored_path(llama, ids(1)) != stored_path(llama, ids(2))
    other = tiny_model("llama").double()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert stored_path(other, ids(1)).parent != stored_path(llama, ids(1)).parent
    assert stored_path(llama.float(), ids(1)).parent != stored_path(tiny_model("llama").double(), ids(1)).parent


@pytest.mark.parametrize("when", ["prefill", "streaming"])
def test_prompts_decode_in_batches_as_in_one(llama, store, monkeypatch, when):
    prompts = torch.stack([ids(seed) for seed in range(5)])
    c = Compression("keep_low", 16, 0.25, [0], when=when)
    whole = generate(llama, prompts, c, 4, lambda answer: False)
    monkeypatch.setattr(prompt, "BATCH", 2)  # batches of 2, 2 and 1
    split = generate(llama, prompts, c, 4, lambda answer: False)
    assert split.tokens == whole.tokens and split.engine == whole.engine
    assert torch.equal(split.kv_tokens, whole.kv_tokens) and torch.equal(split.kv_bytes, whole.kv_bytes)
    assert (split.kv_tokens_answer, split.kv_bytes_answer) == (whole.kv_tokens_answer, whole.kv_bytes_answer)


@pytest.mark.parametrize("when", ["prefill", "streaming"])
def test_a_prompt_keeps_only_the_logits_of_its_answer(llama, store, when):
    """Not a view into every position's logits (T x vocab), which would stay alive with it."""
    _, logits, _, _ = prompt_cache(llama, ids(3), Compression("keep_low", 16, 0.25, [0], when=when))
    assert logits.shape == (VOCAB,) and logits.untyped_storage().nbytes() == VOCAB * logits.element_size()
