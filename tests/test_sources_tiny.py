import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources.tiny import TINY, VOCAB, ByteTokenizer, build_random, tiny_config


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512)
    text = "Shall I compare thee to a summer’s day? — ünïcödé"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert min(ids) >= 3 and max(ids) < 512


def test_byte_tokenizer_needs_every_byte():
    with pytest.raises(ConfigError, match=f"vocab_size >= {VOCAB}"):
        ByteTokenizer(VOCAB - 1)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_tiny_shape_builds_and_runs(arch):
    model = build_random(arch, {"num_hidden_layers": 2}, seed=0)
    assert model.config.model_type.startswith(arch.split("_")[0]) and not model.training
    assert model.config._attn_implementation == ("eager" if arch == "gemma2" else "sdpa")  # Gemma 2 has no SDPA path
    assert model.config.num_hidden_layers == 2
    ids = torch.tensor([ByteTokenizer(VOCAB).encode("tiny")])
    assert model(ids).logits.shape == (1, 4, VOCAB)


def test_gemma3_shape_mixes_sliding_and_full_layers():
    config = tiny_config("gemma3")
    assert config.sliding_window == 16 and set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_overrides_outside_the_shape_are_refused():
    with pytest.raises(ConfigError, match=r"\['rope_theta'\] do not apply to arch 'llama'; use only hidden_size"):
        tiny_config("llama", {"rope_theta": 1.0})
