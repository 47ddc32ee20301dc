"""Each refusal in the UNSUPPORTED table, triggered on a tiny model; plain llama, gpt_neox and gemma3 pass."""

import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources.support import UNSUPPORTED, check_supported
from knormpress.sources.tiny import build_random


def llama():
    return build_random("llama", {"num_hidden_layers": 2})


def sinks(model):
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))


def no_backend(model):
    model._supports_attention_backend = False


def setter(**values):
    return lambda model: [setattr(model.config, k, v) for k, v in values.items()]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gemma3"])
def test_plain_causal_models_pass(arch):
    """gemma3: sliding-window layers are reproduced by every engine, so they pass too."""
    check_supported(build_random(arch))


CASES = {
    "soft-capping": setter(attn_logit_softcapping=50.0),
    "attention sinks": sinks,
    "bidirectional": setter(use_bidirectional_attention=True),
    "neither full nor sliding-window attention": setter(layer_types=["full_attention", "linear_attention"]),
    "outside transformers' attention interface": no_backend,
}


def test_every_check_has_a_case():
    assert len(CASES) == len(UNSUPPORTED)


@pytest.mark.parametrize("feature", CASES)
def test_unsupported_attention_is_refused_in_one_line(feature):
    model = llama()
    CASES[feature](model)
    with pytest.raises(ConfigError, match=f"model 'my-model' .llama. uses .*{feature}.*cannot reproduce exactly yet") as error:
        check_supported(model, "my-model")
    assert "\n" not in str(error.value)
