"""The engine interface: a plan passed as a keyword of the model's forward call reaches every
attention call of every decoder family the engines are checked on (what lets engines do without a
global slot), and an engine's attention function refuses to run without its plan."""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from knormpress.engines.base import PLAN, OnePassPlan, attention_implementation, plan_of
from knormpress.engines.maths import cache_attention, plain_attention
from knormpress.sources.tiny import TINY, VOCAB

from conftest import tiny_model

PROBE = "knorm_test_probe"
SEEN: list[tuple[int, object]] = []  # (layer, the plan its attention call received)


def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Notes the plan, then the layer's own causal attention over the cache (window and cap included)."""
    SEEN.append((module.layer_idx, kwargs.get(PLAN)))
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if query.shape[2] == key.shape[2]:
        return plain_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None
    return cache_attention(query, key, value, scaling, window, softcap).transpose(1, 2), None


AttentionInterface.register(PROBE, probe)
AttentionMaskInterface.register(PROBE, sdpa_mask)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_a_forward_keyword_reaches_every_attention_call(arch):
    """One pass without a cache, then a prompt and a one-token step with one: every layer's attention
    gets the very object passed, in each call."""
    model = tiny_model(arch)
    plan, ids = object(), torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    SEEN.clear()
    with torch.no_grad(), attention_implementation(model, PROBE):
        model(input_ids=ids, use_cache=False, **{PLAN: plan})
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :8], position_ids=torch.arange(8)[None], cache=cache, use_cache=True, **{PLAN: plan})
        model(input_ids=ids[:, 8:9], position_ids=torch.tensor([[8]]), cache=cache, use_cache=True, **{PLAN: plan})
    layers = model.config.num_hidden_layers
    assert sorted(layer for layer, _ in SEEN) == sorted(list(range(layers)) * 3)
    assert all(seen is plan for _, seen in SEEN)
    assert model.config._attn_implementation != PROBE  # restored


def test_an_attention_function_without_its_plan_says_where_it_runs():
    assert isinstance(plan_of({PLAN: OnePassPlan(None, [])}, OnePassPlan, "x"), OnePassPlan)
    for kwargs in ({}, {PLAN: {}}):
        with pytest.raises(RuntimeError, match="'x' attention only runs inside knormpress.evaluate or knormpress.run_engine"):
            plan_of(kwargs, OnePassPlan, "x")
