"""knormpress: fixed-size KV-cache compression and exact evaluation of what it costs.

Names are imported on first use, so `import knormpress` (and the CSV-only report scripts) start
without loading torch, transformers or mlflow.
"""

from __future__ import annotations

from knormpress.lazy import lazy_names

_HOME = {  # public name -> module that defines it
    "Budget": "eviction",
    "CacheCompressor": "compression",
    "Compression": "compression",
    "fix_size_l2_compress": "compression",
    "ConfigError": "errors",
    "Engine": "engines",
    "EngineOutput": "engines",
    "register_engine": "engines",
    "run_engine": "engines",
    "EvalResult": "metrics",
    "pooled": "metrics",
    "summarize": "metrics",
    "Dataset": "sources.datasets",
    "Document": "sources.datasets",
    "register_dataset": "sources.datasets",
    "CacheView": "strategies",
    "STRATEGIES": "strategies",
    "Strategy": "strategies",
    "get_strategy": "strategies",
    "register": "strategies",
    "Outcome": "tasks",
    "TASKS": "tasks",
    "Task": "tasks",
    "get_task": "tasks",
    "register_task": "tasks",
    "evaluate": "engines",
}
__all__, __getattr__, __dir__ = lazy_names(__name__, _HOME)
