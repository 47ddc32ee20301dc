"""knormpress: fixed-size KV-cache compression and exact evaluation of what it costs."""

from knormpress.compression import CacheCompressor, Compression, fix_size_l2_compress
from knormpress.engines import evaluate
from knormpress.errors import ConfigError
from knormpress.eviction import Budget
from knormpress.metrics import EvalResult, pooled, summarize
from knormpress.strategies import STRATEGIES, Strategy, get_strategy, register

__all__ = [
    "STRATEGIES",
    "Budget",
    "CacheCompressor",
    "Compression",
    "ConfigError",
    "EvalResult",
    "Strategy",
    "evaluate",
    "fix_size_l2_compress",
    "get_strategy",
    "pooled",
    "register",
    "summarize",
]
