"""Each refusal in the UNSUPPORTED table, triggered on a tiny model; every tiny family passes (positions=rerotate:
every one with rotary, tests/test_engines_families.py)."""

import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources.support import UNSUPPORTED, check_supported
from knormpress.sources.tiny import TINY, build_random


def llama():
    return build_random("llama", {"num_hidden_layers": 2})


def sinks(model):
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))


def no_backend(model):
    model._supports_attention_backend = False


def setter(**values):
    return lambda model: [setattr(model.config, k, v) for k, v in values.items()]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_tiny_family_passes(arch):
    """Sliding-window layers (gemma2, gemma3, mistral_sliding) and Gemma 2's logit cap are reproduced by every engine."""
    check_supported(build_random(arch, {"num_hidden_layers": 2}))


CASES = {
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
