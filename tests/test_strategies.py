import math
import re

import pytest
import torch

from dataclasses import dataclass

from knormpress import STRATEGIES, CacheView, ConfigError, Strategy, get_strategy, register

from conftest import seeded


@pytest.fixture
def keys():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 50, 16, generator=g), torch.arange(50).expand(2, 3, 50)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_scores_each_cached_token(name, keys):
    k, pos = keys
    g = torch.Generator().manual_seed(1)
    attention, received = torch.rand(2, 6, 50, generator=g).softmax(-1), torch.rand(2, 3, 50, generator=g)
    s = get_strategy(seeded(name, 3)).score(CacheView(k, pos, 1, attention, received))
    assert s.shape == pos.shape and s.dtype == torch.float32 and torch.isfinite(s).all()


@pytest.mark.parametrize("name", [n for n, cls in STRATEGIES.items() if cls.static])
def test_static_scores_depend_only_on_the_token(name, keys):
    """What the masked engine relies on: a token's score does not change as the cache changes."""
    k, pos = keys
    strat = get_strategy(seeded(name, 3))
    full = strat.score(CacheView(k, pos, 2))
    part = strat.score(CacheView(k[:, :, 10:30], pos[:, :, 10:30], 2))
    assert torch.equal(full[:, :, 10:30], part)


def test_keep_low_and_keep_high_are_opposite_norms(keys):
    k, pos = keys
    norms = k.norm(dim=-1)
    low, high = get_strategy("keep_low").score(CacheView(k, pos, 0)), get_strategy("keep_high").score(CacheView(k, pos, 0))
    assert torch.equal(low, -high)
    assert torch.allclose(high, norms, rtol=2**-10, atol=0)


def test_norms_equal_up_to_rounding_tie():
    """Rotary embedding keeps norms, so these must tie however the float noise falls."""
    a = torch.tensor([[3.0, 4.0]])
    rotated = torch.tensor([[5.0 * 0.6 + 1e-6, 5.0 * 0.8]])
    scores = get_strategy("keep_low").score(CacheView(torch.cat([a, rotated])[None, None], torch.arange(2)[None, None], 0))
    assert scores[0, 0, 0] == scores[0, 0, 1]


def test_random_priorities_are_uniform_and_vary_by_layer_head_seed(keys):
    k, pos = keys
    big = torch.arange(20000).expand(1, 3, -1)
    r = get_strategy({"name": "random", "seed": 0}).score(CacheView(torch.zeros(1, 3, 20000, 1), big, 0))
    assert 0 <= r.min() and r.max() < 1 and abs(r.mean().item() - 0.5) < 0.01
    assert not torch.equal(r[0, 0], r[0, 1])
    a = get_strategy({"name": "random", "seed": 0}).score(CacheView(k, pos, 0))
    assert not torch.equal(a, get_strategy({"name": "random", "seed": 0}).score(CacheView(k, pos, 1)))
    assert not torch.equal(a, get_strategy({"name": "random", "seed": 1}).score(CacheView(k, pos, 0)))


def test_unknown_strategy_lists_choices():
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; choose one of h2o, keep_high, keep_low, keydiff"):
        get_strategy("nope")


def test_a_new_strategy_is_one_small_class_with_its_own_settings(keys):
    @register
    @dataclass
    class Oldest(Strategy):
        """Prefer older tokens, by `weight` per position."""

        weight: float = 1.0
        name = "test_oldest"
        score = lambda self, view: -self.weight * view.positions.float()  # noqa: E731

    try:
        k, pos = keys
        assert torch.equal(get_strategy({"name": "test_oldest", "weight": 2.0}).score(CacheView(k, pos, 0)), -2 * pos.float())
        with pytest.raises(ConfigError, match="strategy 'test_oldest' has no setting 'wieght'; its settings are: weight"):
            get_strategy({"name": "test_oldest", "wieght": 2.0})
    finally:
        del STRATEGIES["test_oldest"]


def view_by_hand():
    """One KV head of 3 cached tokens, 2 query heads in its group."""
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]]])
    attention = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]])
    return CacheView(keys, torch.arange(3).view(1, 1, 3), 0, attention, torch.tensor([[[2.0, 0.5, 1.0]]]))


def test_h2o_scores_the_attention_received_so_far():
    assert get_strategy("h2o").score(view_by_hand()).tolist() == [[[2.0, 0.5, 1.0]]]


def test_tova_scores_the_current_attention_averaged_over_heads():
    assert torch.allclose(get_strategy("tova").score(view_by_hand()), torch.tensor([[[0.3, 0.175, 0.525]]]))


def test_the_oracle_scores_the_next_querys_attention_else_the_latest_summed_per_group():
    view = view_by_hand()
    assert torch.allclose(get_strategy("oracle").score(view), torch.tensor([[[0.6, 0.35, 1.05]]]))  # prefill: one step late
    view.next_attention = torch.tensor([[[0.2, 1.5, 0.1]]])
    assert torch.equal(get_strategy("oracle").score(view), view.next_attention)
    assert not STRATEGIES["oracle"].deployable and all(c.deployable for n, c in STRATEGIES.items() if n != "oracle")


def test_keydiff_scores_minus_the_cosine_to_the_mean_unit_key():
    """The paper's definition, per KV head over the keys cached now, in float64 by hand."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) * torch.rand(1, 2, 9, 1, generator=g) * 10
    got = get_strategy("keydiff").score(CacheView(keys, torch.arange(9).expand(1, 2, 9), 0))
    for h in range(2):
        rows = keys[0, h].tolist()
        units = [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]
        anchor = [sum(u[d] for u in units) / len(units) for d in range(4)]
        for i, row in enumerate(rows):
            cos = sum(a * b for a, b in zip(row, anchor)) / math.sqrt(sum(v * v for v in row) * sum(v * v for v in anchor))
            assert got[0, h, i].item() == pytest.approx(-cos, abs=1e-6)


def test_keydiff_anchor_is_the_mean_direction_not_the_mean_key():
    """Unit keys (1, 0), (0, 1), (1, 0) average to the direction (2, 1): the long key (0, 3) is the distinctive
    one. The raw keys average to (2, 3)/3, which the long key dominates: under `anchor: raw` it looks typical."""
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]]]])
    view = CacheView(keys, torch.arange(3).view(1, 1, 3), 0)
    paper = get_strategy("keydiff").score(view)[0, 0]
    assert torch.allclose(paper, -torch.tensor([2.0, 1.0, 2.0]) / 5**0.5)
    assert paper.argmax() == 1
    raw = get_strategy({"name": "keydiff", "anchor": "raw"}).score(view)[0, 0]
    assert raw.argmin() == 1 and torch.allclose(raw / raw.norm(), -torch.tensor([2.0, 3.0, 2.0]) / 17**0.5)


def test_h2o_mean_divides_by_the_queries_that_saw_each_token():
    view = view_by_hand()
    view.length = 5  # tokens 0, 1, 2 seen by 5, 4, 3 queries
    got = get_strategy({"name": "h2o", "normalise": "mean"}).score(view)
    assert torch.allclose(got, torch.tensor([[[2.0 / 5, 0.5 / 4, 1.0 / 3]]]))


@pytest.mark.parametrize("node,label", [("h2o", "h2o"), ({"name": "h2o", "normalise": "mean"}, "h2o[normalise=mean]"),
                                        ({"name": "keydiff", "anchor": "raw"}, "keydiff[anchor=raw]"),
                                        ({"name": "random", "seed": 4}, "random"), ("keep_low", "keep_low")])
def test_a_label_names_every_setting_that_is_not_the_default(node, label):
    assert get_strategy(node).label == label


@pytest.mark.parametrize("node,words", [({"name": "h2o", "normalise": "max"}, "unknown h2o normalise 'max'; choose one of sum, mean"),
                                        ({"name": "keydiff", "anchor": "unit"}, "unknown keydiff anchor 'unit'; choose one of normalised, raw")])
def test_bad_strategy_settings_list_the_choices(node, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        get_strategy(node)


@pytest.mark.parametrize("scale", [1.0, 2.0**-6, 2.0**5])
def test_key_norms_are_rounded_to_ten_significant_bits(scale):
    """Norms 2^-12 apart (relative) tie, norms 2^-9 apart do not, at any magnitude. 1 + 2^-11 and its 2^-12
    neighbour share their first 10 significant bits (mantissa x 2^10 = 512.25 and 512.375: both 512) but not
    their first 12 (2049 and 2049.5+: 2050); 1 and 1 + 2^-9 differ in the 10th (512 and 513)."""
    def low(*norms):  # keep_low's scores of one-dimensional keys with these norms
        keys = torch.tensor([[n * scale] for n in norms], dtype=torch.float32)[None, None]
        assert keys.norm(dim=-1).flatten().tolist() == [n * scale for n in norms]  # the norms are exact in float32
        return get_strategy("keep_low").score(CacheView(keys, torch.arange(len(norms)).view(1, 1, -1), 0))[0, 0]

    near = 1 + 2**-11
    tied = low(near, near * (1 + 2**-12))
    assert tied[0] == tied[1] == -scale  # both round to 512 / 2^10, i.e. 1
    apart = low(1.0, 1 + 2**-9)
    assert apart[0] == -scale and apart[1] == -(1 + 2**-9) * scale


def test_a_label_and_its_node_round_trip():
    """`Strategy.label` (run names, the report's strategy column) and `Registry.node` (the bench's
    --strategy) are inverses; the label of a logged node (text, as MLflow keeps params) is the built one's."""
    from knormpress.strategies import REGISTRY, label

    for text in ("keep_low", "h2o[normalise=mean]", "keydiff[anchor=raw]"):
        assert label(REGISTRY.node(text)) == get_strategy(REGISTRY.node(text)).label == text
    assert label({"name": "random", "seed": "3"}) == "random"  # seeds repeat a method, they do not vary it
    assert label({"name": "h2o", "normalise": "sum"}) == "h2o"  # a default setting adds nothing
    with pytest.raises(ConfigError, match="write a name, or name\\[setting=value"):
        REGISTRY.node("h2o[normalise]")
