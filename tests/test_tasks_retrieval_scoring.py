"""Retrieval scored end to end: `Retrieval.run` on a model that really retrieves, with controls.

The fast tests build a one-layer GPT-NeoX by hand that copies the one number token of its context:
every query attends (through a bias, in dimensions rotary leaves alone) to keys carrying a "number"
feature, and the values carry the attended token back to the output. With a word tokenizer the key
is one token, so the model's answer is the key twice (" 12345 12345") when the key line is in its
cache, and words when it is not. A trial must be marked correct iff the first number of the decoded
answer is the key: every trial with the key line, none without it, and under a sliding window only
the trials whose key is still in the window. The slow test does the same with SmolLM2 on passkey
prompts of 1024 tokens.
"""

import re
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from knormpress import Compression
from knormpress.config import EvalConfig
from knormpress.sources.tiny import build_random
from knormpress.tasks.retrieval import Passkey, Retrieval

KEYS = ("12345", "23456", "34567", "45678", "56789", "67890", "78901", "89012")
FILLER = "the grass is green . the sky is blue . the sun is yellow . here we go ."
WORDS = sorted(set(f"a find the key and remember it . what ? {FILLER}".split()))


class Words:
    """Whitespace-separated words as tokens (ids from 3, like the byte tokenizer's); a number is one token."""

    eos_token_id = None

    def __init__(self) -> None:
        self.ids = {w: i + 3 for i, w in enumerate(WORDS + list(KEYS))}
        self.words = {i: w for w, i in self.ids.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {self.words.get(i, '<unk>')}" for i in (ids.tolist() if hasattr(ids, "tolist") else ids))


@dataclass
class Probe(Retrieval):
    """A key among filler sentences; `hidden=False` leaves the key line out (the negative control)."""

    hidden: bool = True
    name = "probe"
    instruction = "find the key and remember it ."

    def needle(self, rng):
        key = rng.choice(KEYS)
        return key, f" the key is {key} ." if self.hidden else "", " what is the key ? the key is"

    def fillers(self, bundle, dataset, ev, cache, need):
        unit = bundle.tokenizer.encode(FILLER)
        return [unit * (need // len(unit) + 2)] * self.trials


@pytest.fixture(scope="module")
def copier():
    """One GPT-NeoX layer set by hand: query = a bias on the last (unrotated) dim of each head, key = the number
    feature (hidden dim 63), value = the head's slice of the normalised input, output = 10 x the attended value;
    no MLP; the output embedding is the normalised input embedding, so the attended token wins."""
    tok = Words()
    model = build_random("gpt_neox", {"num_hidden_layers": 1}, seed=3).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed = torch.randn(model.config.vocab_size, 64, generator=g, dtype=torch.float64)
        embed[:, 63] = -4.0
        embed[[tok.ids[k] for k in KEYS], 63] = 4.0
        model.gpt_neox.embed_in.weight.copy_(embed)
        layer = model.gpt_neox.layers[0]
        qkv = layer.attention.query_key_value
        qkv.weight.zero_()
        qkv.bias.zero_()
        for h in range(4):  # per head the rows [query 16 | key 16 | value 16]
            qkv.bias[48 * h + 15] = 20.0
            qkv.weight[48 * h + 31, 63] = 1.0
            qkv.weight[48 * h + 32:48 * h + 48, 16 * h:16 * h + 16] = torch.eye(16, dtype=torch.float64)
        layer.attention.dense.weight.copy_(10 * torch.eye(64, dtype=torch.float64))
        layer.attention.dense.bias.zero_()
        layer.mlp.dense_4h_to_h.weight.zero_()
        layer.mlp.dense_4h_to_h.bias.zero_()
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.gpt_neox.final_layer_norm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        out = model.get_output_embeddings().weight
        assert out.data_ptr() != model.gpt_neox.embed_in.weight.data_ptr()  # untied
        out.copy_(F.layer_norm(embed, (64,)))
    return model, tok


def run(model, tok, task, compression=None):
    bundle = SimpleNamespace(model=model, tokenizer=tok, name="copier")
    samples = task.samples(bundle, {}, EvalConfig(), None)
    records = [task.run(model, s, compression, "auto", False).records for s in samples]
    return samples, records


def first_number(answer: str) -> str | None:
    found = re.search(r"[0-9]+", answer)
    return found.group() if found else None


def test_a_trial_is_correct_iff_the_first_number_it_answers_is_the_key(copier):
    model, tok = copier
    task = Probe(lengths=[96], depths=[0.0, 0.5, 1.0], trials=2)
    samples, records = run(model, tok, task)
    for sample, rec in zip(samples, records):
        for prompt, (_, row) in zip(sample.input_ids, rec.iterrows()):
            with torch.no_grad():  # the model's own first greedy token, read without any engine
                first = model(prompt[None]).logits[0, -1].argmax().item()
            assert tok.words[first] == row.key
            assert row.answer == f" {row.key} {row.key}" and row.correct == (first_number(row.answer) == row.key)
    assert all(r.correct.all() for r in records)
    assert task.metrics(records[0], None, 100, 0)["accuracy"] == 1.0


def test_without_the_key_line_no_trial_is_correct(copier):
    model, tok = copier
    task = Probe(lengths=[96], depths=[0.0, 0.5, 1.0], trials=2, hidden=False)
    samples, [rec] = run(model, tok, task)
    assert not any(str(t) in tok.decode(samples[0].input_ids.flatten()) for t in KEYS)
    assert all(first_number(a) is None for a in rec.answer) and not rec.correct.any()
    assert task.metrics(rec, None, 100, 0)["accuracy"] == 0.0


def test_a_sliding_window_finds_only_the_keys_it_still_holds(copier):
    """recent_only holds the last 16 tokens while it reads: the key line right before the question (depth 1),
    not the first one. (Under when=prefill the first answer token comes from the uncompressed prompt pass, which
    still sees a one-token key.)"""
    model, tok = copier
    task = Probe(lengths=[96], depths=[0.0, 1.0], trials=2)
    _, [rec] = run(model, tok, task, Compression("recent_only", 16, 0.5, [], when="streaming"))
    assert rec.correct.tolist() == [d == 1.0 for d in rec.depth]
    assert all((first_number(a) == k) == c for a, k, c in zip(rec.answer, rec.key, rec.correct))


@dataclass
class HiddenlessPasskey(Passkey):
    """The passkey prompt with the key line left out (the question stays)."""

    def needle(self, rng):
        key, _, question = super().needle(rng)
        return key, "", question


@pytest.mark.slow
def test_smollm2_finds_every_passkey_and_none_without_the_key_line(smollm2):
    grid = dict(lengths=[1024], depths=[0.0, 0.4, 0.8], trials=2)
    for task, accuracy in ((Passkey(**grid), 1.0), (HiddenlessPasskey(**grid), 0.0)):
        [sample] = task.samples(smollm2, {}, EvalConfig(), None)
        rec = task.run(smollm2.model, sample, None, "auto", False).records
        assert len(rec) == 6 and rec.correct.mean() == accuracy, rec[["depth", "key", "answer"]]
        assert all((first_number(a) == k) == c for a, k, c in zip(rec.answer, rec.key, rec.correct))
