"""Strategies that rank tokens by key norm (keep_low, KnormPress; keep_high, its control), by
position (recent_only, sinks) or at random (random, random_per_step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from knormpress.strategies.base import Strategy, register

if TYPE_CHECKING:
    import torch


NORM_BITS = 10


def key_norm(keys: torch.Tensor) -> torch.Tensor:
    """L2 norm in float32, rounded to NORM_BITS significant bits.

    Rotary embedding preserves norms, so the same token at two positions has the same key norm
    in exact arithmetic (always so at layer 0). Float rounding would then pick the survivor at
    random and differently in each engine; rounding makes such keys tie, and ties go to the
    earlier position. 10 bits (0.1%) is far finer than the spread of norms between tokens.
    """
    import torch

    mantissa, exponent = torch.frexp(keys.float().norm(dim=-1))
    return torch.ldexp(torch.round(mantissa * 2**NORM_BITS) / 2**NORM_BITS, exponent)


@register
@dataclass
class KeepLow(Strategy):
    """KnormPress (Devoto et al. 2024): keys with a low L2 norm tend to draw high attention, so the
    score is s_j = -|k_j| and the lowest-norm keys are kept. The paper (and kvpress' KnormPress)
    keeps no recent window: keep_ratio 0 reproduces it; the default 0.5 is the seed's mixed
    retention. Difference: |k_j| is rounded to NORM_BITS significant bits (`key_norm`), so keys whose
    norms differ only by float noise tie, and ties go to the earlier position."""

    name = "keep_low"

    def score(self, view):
        return -key_norm(view.keys)


@register
@dataclass
class KeepHigh(Strategy):
    """The KnormPress paper's negative control: s_j = +|k_j| (rounded as for keep_low), keep the
    highest-norm keys."""

    name = "keep_high"

    def score(self, view):
        return key_norm(view.keys)


@register
@dataclass
class RecentOnly(Strategy):
    """Sliding window: s_j = j, newer is better, so the older slots extend the recent window
    (identical to keep_ratio = 1, whatever keep_ratio is set)."""

    name = "recent_only"

    def score(self, view):
        return view.positions.float()


@register
@dataclass
class Sinks(RecentOnly):
    """StreamingLLM (Xiao et al. 2024): the first `n_sink` tokens (attention sinks, 4 in the paper)
    plus a sliding window. The paper places the cached keys at their slots in the cache, not their
    positions in the text: positions=rerotate reproduces that; positions=true keeps text positions."""

    name = "sinks"
    needs_sinks = True


@register
@dataclass
class Random(Strategy):
    """A uniform random priority per (layer, head, position), fixed by `seed`. Because the
    priority is a pure function of the token, the kept older tokens are a uniform random
    subset of all older tokens, and the masked engine can use it."""

    name = "random"
    seed: int = 0

    def score(self, view):
        import torch

        b, h, _ = view.positions.shape
        head = torch.arange(h).view(1, h, 1).expand(b, h, -1)
        return _hash_uniform(self.seed, view.layer, head, view.positions.cpu()).to(view.keys.device)


@register
@dataclass
class RandomPerStep(Strategy):
    """The naive random press: a fresh random draw at every compression step. Old tokens then
    survive with geometrically falling odds, unlike `random`. Not static, and one generator
    serves every layer in call order, so only the token-by-token engine reproduces it."""

    name = "random_per_step"
    static = False
    replayable = False
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, view):
        import torch

        return torch.rand(view.positions.shape, generator=self.generator).to(view.keys.device)


_MASK64 = (1 << 64) - 1


def _hash_uniform(seed: int, layer: int, head: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Counter-based hash (splitmix64 finaliser) to float32 in [0, 1): no state to carry
    between steps, so streaming and masked engines draw the same number for a token."""
    import torch

    with np.errstate(over="ignore"):
        x = positions.numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= head.numpy().astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        x ^= np.uint64((layer * 0x94D049BB133111EB + seed * 0xD6E8FEB86659FD93) & _MASK64)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        x ^= x >> np.uint64(31)
    return torch.from_numpy((x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24))
