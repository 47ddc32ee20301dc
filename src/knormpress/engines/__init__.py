"""Engines: run a model over one sequence under a compression and return logits, the cache and the
memory held; they know nothing of metrics (tasks turn logits into numbers).

"streaming" reads token by token with a real cache (the reference); "masked" computes the same
numbers in one forward pass by key expiry, for static strategies with true positions (any
interval); "replay" in one forward pass in which each layer replays its own eviction, for any
replayable strategy and either position policy; "auto" picks the fastest that reproduces the
setting. Each is one registered `Engine` in its own module (`base.py` is the interface, `maths.py`
the maths they share, `run.py` the choice), and `prompt.py` reads prompts and decodes after them.
"""

from knormpress.engines.base import Engine, EngineOutput, register_engine
from knormpress.engines.run import AUTO, evaluate, pick_engine, run_engine, usable

__all__ = ["AUTO", "Engine", "EngineOutput", "evaluate", "pick_engine", "register_engine", "run_engine", "usable"]
