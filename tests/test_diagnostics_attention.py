"""The norm-attention statistics against a direct computation from the model's own eager attention
weights (T x T, fine for a tiny model), and on keys built so that a low norm draws high attention."""

import pytest
import torch
from scipy.stats import spearmanr

from knormpress.diagnostics.attention import measure, received_attention, spearman
from knormpress.sources.tiny import VOCAB

from conftest import tiny_model


@torch.no_grad()
def direct(model, ids):
    """Per layer: the eager attention weights (Hq, T, T), the key projection's output norms (Hkv, T) and
    the norms of the key the attention gets (Hkv, T): k_norm's output where the model normalises keys
    (gemma3), else the projection's (llama: rotary keeps norms)."""
    projected, cached, handles = {}, {}, []
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn

        def project(_, __, out, layer=layer, d=attn.head_dim):
            projected[layer] = cached[layer] = out[0].unflatten(-1, (-1, d)).norm(dim=-1).t()

        def normalise(_, __, out, layer=layer):  # k_norm gets (1, Hkv, T, D): transformers 5's gemma3 transposes first
            cached[layer] = out[0].norm(dim=-1)
        handles.append(attn.k_proj.register_forward_hook(project))
        if getattr(attn, "k_norm", None) is not None:
            handles.append(attn.k_norm.register_forward_hook(normalise))
    model.set_attn_implementation("eager")
    try:
        attentions = model(ids.view(1, -1), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
        for h in handles:
            h.remove()
    return [a[0] for a in attentions], projected, cached


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_correlation_matches_a_direct_computation(arch):
    model = tiny_model(arch).double()
    with torch.no_grad():  # a fresh k_norm has unit weights, so every key's norm is sqrt(head_dim): give them spread
        for block in model.model.layers:
            if getattr(block.self_attn, "k_norm", None) is not None:
                block.self_attn.k_norm.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(block.self_attn.layer_idx))
    T = 90  # gemma3's tiny sliding layers (window 16) see only part of the text
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:T]  # no token twice: no tied norms at layer 0
    table, memory = measure(model, ids)
    weights, projected, cached_norms = direct(model, ids)
    assert memory["kv_tokens_peak"] > 0
    for row in table.itertuples():
        a = weights[row.layer]  # (Hq, T, T), rows are queries
        Hkv = projected[row.layer].shape[0]
        group = a.unflatten(0, (Hkv, -1))[row.head].mean(0)  # (T, T) mean over the group's query heads
        later = torch.ones(T, T, dtype=torch.bool).tril(-1)  # query q > key j
        if row.window:
            later &= ~torch.ones(T, T, dtype=torch.bool).tril(-row.window)  # q - j < window
        received = (group * later).sum(0) / later.sum(0)
        cached = cached_norms[row.layer][row.head]
        expected = spearmanr(cached[: T - 1].numpy(), received[: T - 1].numpy()).statistic
        assert row.spearman == pytest.approx(expected, abs=1e-9)
        expected_projected = spearmanr(projected[row.layer][row.head, : T - 1].numpy(), received[: T - 1].numpy()).statistic
        assert row.spearman_projected == pytest.approx(expected_projected, abs=1e-9)
        assert row.norm_q50 == pytest.approx(cached.quantile(0.5).item())


def test_keys_whose_low_norm_draws_high_attention_correlate_strongly_negatively():
    """Every query points along e1 and each key against it, -n_j e1 (plus small noise): the logit is
    -|q| n_j, so the lower a key's norm, the more attention it draws from every query."""
    g = torch.Generator().manual_seed(0)
    T, D = 300, 8
    e1 = torch.zeros(D)
    e1[0] = 1.0
    n = torch.rand(T, generator=g) * 3 + 0.5
    keys = -n.view(-1, 1) * e1 + 0.01 * torch.randn(T, D, generator=g)
    query = (2.0 * e1).expand(1, 2, T, D)  # two query heads sharing one KV head
    received = received_attention(query, keys.view(1, 1, T, D), scaling=1.0)[0]
    assert torch.isnan(received[-1])
    rho = spearman(keys.norm(dim=-1)[: T - 1], received[: T - 1])
    assert rho < -0.9
    flipped = received_attention(query, -keys.view(1, 1, T, D), scaling=1.0)[0]  # high norm, high attention
    assert spearman(keys.norm(dim=-1)[: T - 1], flipped[: T - 1]) > 0.9


def test_spearman_gives_tied_values_their_mean_rank():
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([4.0, 1.0, 3.0, 0.0])
    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic)
