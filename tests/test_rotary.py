"""Shifting cached keys by whole positions equals computing them at the shifted position, with the
model's own rotary embedding: partial rotary (GPT-NeoX), GQA Llama, Llama 3 rope scaling, Gemma 3's
per-layer-type rotary, Qwen2's layer_types with one rotary for all; rotaries the shift cannot
reproduce or cannot be checked against are refused (more families: tests/test_engines_families.py)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from knormpress import ConfigError
from knormpress.rotary import Rotary

from conftest import tiny_model


def llama(rope: dict | None):
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=300, max_position_embeddings=8192, rope_parameters=rope)
    return LlamaForCausalLM(config).double().eval()


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("build", [lambda: tiny_model("gpt_neox").double(), lambda: tiny_model("llama").double(),
                                   lambda: llama(LLAMA3), lambda: tiny_model("gemma3").double(),
                                   lambda: tiny_model("qwen2").double()],
                         ids=["gpt_neox", "llama", "llama3_scaling", "gemma3", "qwen2_layer_types_one_rotary"])
def test_a_shift_moves_a_key_to_the_shifted_position(build):
    model = build()
    rotary = Rotary(model)
    layer = model.config.num_hidden_layers - 1
    kind = {} if rotary.layer_types is None else {"layer_type": rotary.layer_types[layer]}
    x = torch.randn(1, 2, 6, model.config.hidden_size // model.config.num_attention_heads, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    at = torch.tensor([[0, 3, 50, 200, 700, 1000]])
    moved = torch.tensor([[5, -3, 10, 700, 0, -999]])  # slots minus positions: ahead, back, to slot 1
    cos, sin = rotary.module(x, at, **kind)
    cos2, sin2 = rotary.module(x, at + moved, **kind)
    rot = cos.shape[-1]  # GPT-NeoX rotates the first quarter only
    assert rot < x.shape[-1] or "gpt_neox" not in type(model).__name__.lower()
    cached = torch.cat([apply_rotary_pos_emb(x[..., :rot], x[..., :rot], cos, sin)[0], x[..., rot:]], dim=-1)
    want = torch.cat([apply_rotary_pos_emb(x[..., :rot], x[..., :rot], cos2, sin2)[0], x[..., rot:]], dim=-1)
    got = rotary.shift(cached, moved[0], layer)
    assert (got - want).abs().max() < 1e-4  # cos/sin are float32: angles up to 1000 rad carry ~1e-5 error
    assert (cached - want).abs().max() > 0.1  # a control: the shift is not the identity


def test_rope_types_whose_angles_do_not_add_up_are_refused():
    with pytest.raises(ConfigError, match="cannot shift keys under rope type 'dynamic'; it supports default, linear, llama3"):
        Rotary(llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))


def test_a_rotary_the_shift_cannot_be_checked_against_is_refused():
    """StableLM rotates a slice of each head outside its apply_rotary_pos_emb, so that function cannot
    take whole heads; the shift is not trusted without the check."""
    from transformers import StableLmConfig, StableLmForCausalLM

    model = StableLmForCausalLM(StableLmConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                               vocab_size=300, pad_token_id=0))
    with pytest.raises(ConfigError, match="cannot be checked on StableLmForCausalLM .*use positions=true") as said:
        Rotary(model)
    assert "\n" not in str(said.value)



def test_shifts_compose_to_float64_rounding():
    """Many one-position steps (the token-by-token engine) equal one shift by their sum (the one-pass
    engines): the shift's cos/sin are computed in float64, not in the rotary module's float32."""
    model = tiny_model("llama").double()
    rotary = Rotary(model)
    x = torch.randn(2, 5, model.config.hidden_size // model.config.num_attention_heads, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    stepped = x
    for _ in range(300):
        stepped = rotary.shift(stepped, -1, 0)
    assert (stepped - rotary.shift(x, -300, 0)).abs().max() < 1e-12
    assert (rotary.shift(x, -300, 0) - x).abs().max() > 0.1  # a control: the shift moved them
    float32 = x.float()
    for _ in range(300):
        float32 = rotary.shift(float32, 1, 0)
    assert ((float32.double().norm(dim=-1) / x.norm(dim=-1)) - 1).abs().max() < 1e-6  # no drift in the norm
