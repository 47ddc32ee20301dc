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


def test_keydiff_keeps_keys_unlike_the_mean():
    # mean key (4/3, 2/3) points along (2, 1)/sqrt(5): cos = 2/sqrt(5), 1/sqrt(5), 2/sqrt(5); the score is
    # minus the cosine times |sum of keys| = |(4, 2)| = sqrt(20), a positive factor per head
    want = -torch.tensor([[[2.0, 1.0, 2.0]]]) / 5**0.5 * 20**0.5
    assert torch.allclose(get_strategy("keydiff").score(view_by_hand()), want)
