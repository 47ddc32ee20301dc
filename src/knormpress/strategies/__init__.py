"""Strategies: each one is a score per cached token, higher = more worth keeping.

A strategy only ranks the *older* tokens (outside the sink and recent window); the budget
arithmetic and the selection itself live in `knormpress.eviction`, shared by every strategy.
A strategy is a small dataclass whose fields are its own settings (built from the `strategy`
node of a `compress` config), registered once with `@register`.

Every strategy here gets the same recent window of keep_ratio x fix_kv_size newest tokens (and
n_sink first tokens when asked), which some papers have and others do not: each docstring states
the paper's formula, where this implementation differs on purpose, and which settings reproduce it.

The interface and registry are in `base.py`; the strategies in `attention.py` (h2o, tova, keydiff,
oracle) and `norms.py` (keep_low, keep_high, recent_only, sinks, random, random_per_step).
"""

from knormpress.strategies.base import REGISTRY, REPEATS, STRATEGIES, CacheView, Strategy, get_strategy, label, register
from knormpress.strategies.attention import H2O, TOVA, KeyDiff, Oracle  # noqa: I001  (registration order: the study's)
from knormpress.strategies.norms import (NORM_BITS, KeepHigh, KeepLow, Random, RandomPerStep, RecentOnly, Sinks,
                                         key_norm)

__all__ = ["NORM_BITS", "REGISTRY", "REPEATS", "STRATEGIES", "CacheView", "H2O", "KeepHigh", "KeepLow", "KeyDiff", "Oracle",
           "Random", "RandomPerStep", "RecentOnly", "Sinks", "Strategy", "TOVA", "get_strategy", "key_norm", "label",
           "register"]
