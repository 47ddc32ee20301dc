"""The compression spec `Compression`: every setting of a compression, declared once, and its checks.

Each setting is a field (`knormpress.settings.setting`) that says its help text, whether it shows
in a run's name or belongs to the headline setting, and what runs logged before it existed
computed; from these fields come the Hydra `compress` node's defaults, the MLflow params, run
names, the report's columns and the bench's flags. Pruning a cache with a spec is
`knormpress.compression`'s business; this module imports no torch, so the report reads it too.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from knormpress.errors import ConfigError, choose
from knormpress.registry import settings
from knormpress.settings import name_parts, setting

if TYPE_CHECKING:
    from knormpress.eviction import Budget
    from knormpress.strategies import Strategy

WHEN = ("prefill", "streaming")  # compress.when: prune once after the prompt, or keep within budget while reading
POSITIONS = ("true", "rerotate")  # see the README, "Positions after pruning"
log = logging.getLogger("knormpress")


@dataclass
class Compression:
    """The compression spec: the one list of settings that the library call, both engines, the
    Hydra `compress` node and the MLflow params share. Validated on creation, so mistakes
    surface before any model work. `strategy` is a name, a `{name: ..., <setting>: ...}` node or
    a `Strategy` instance; it is stored as the instance.

    The budget is given once: `fix_kv_size` (tokens per layer and KV head) or `ratio` (the share
    of a prompt's tokens to drop: 0.9 keeps 10%, resolved per prompt by `resolved`), the other
    None. `when`: "streaming" keeps the cache within the budget while the text is read;
    "prefill" reads a prompt whole, prunes once, then decodes under the budget (retrieval tasks)."""

    strategy: Strategy | str | Mapping[str, Any] = "keep_low"
    fix_kv_size: int | None = setting(512, "tokens kept per compressed layer and KV head (or null, and give ratio)",
                                      named="kv={}", always=True)
    keep_ratio: float = setting(0.5, "share of fix_kv_size reserved for the most recent tokens", named="r={:g}",
                                always=True)
    skip_layers: Sequence[int] = setting((0, 1), "layers never compressed")
    sort_by_time: bool = setting(True, "kept tokens in time order (false: the original paper's score order)")
    # n_sink is left out of the headline setting: the sinks strategy needs n_sink >= 1 at its default setting
    n_sink: int = setting(0, "first tokens always kept (StreamingLLM's attention sinks)", headline=False)
    positions: str = setting("true", "where kept keys sit after pruning: true (their absolute positions) | rerotate "
                             "(slots 0..n-1)", before="true")
    interval: int = setting(1, "prune back to fix_kv_size once the cache holds fix_kv_size + interval tokens",
                            before=1)
    ratio: float | None = setting(None, "or: the share of each text's or prompt's tokens dropped (0.9 keeps 10%); "
                                  "then fix_kv_size: null", named="ratio={:g}")
    when: str = setting("streaming", "streaming: never above the budget while reading | prefill: prune once after "
                        "the prompt (retrieval tasks)", named="{}", before="streaming")

    def __post_init__(self) -> None:
        from knormpress.strategies import get_strategy

        self.strategy = get_strategy(self.strategy)
        if self.positions is True:  # YAML and Hydra read `positions: true` as a boolean
            self.positions = "true"
        choose("positions", self.positions, POSITIONS)
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"interval must be an integer >= 1 (1: prune after every token), got {self.interval!r}")
        if (self.fix_kv_size is None) == (self.ratio is None):
            given = f"fix_kv_size={self.fix_kv_size}, ratio={self.ratio}"
            raise ConfigError(f"give the budget once, as fix_kv_size (tokens) or ratio (share of the prompt dropped), "
                              f"the other null; got {given}")
        if self.fix_kv_size is not None and (isinstance(self.fix_kv_size, bool) or not isinstance(self.fix_kv_size, int)
                                             or self.fix_kv_size < 1):
            raise ConfigError(f"fix_kv_size must be an integer >= 1, got {self.fix_kv_size!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 < self.ratio < 1):
            raise ConfigError(f"ratio must lie in (0, 1) (0.9 drops 90% of the prompt's tokens), got {self.ratio!r}")
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not 0 <= self.keep_ratio <= 1:
            raise ConfigError(f"keep_ratio must lie in [0, 1], got {self.keep_ratio!r}")
        limit = self.fix_kv_size or 1 << 62
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or not 0 <= self.n_sink < limit:
            raise ConfigError(f"n_sink must be an integer in [0, fix_kv_size={self.fix_kv_size}), got {self.n_sink!r}")
        choose("compress.when", self.when, WHEN)
        if self.strategy.needs_sinks and self.n_sink < 1:
            raise ConfigError(f"strategy {self.strategy.name!r} needs n_sink >= 1 (e.g. n_sink=4), got {self.n_sink}")
        if not isinstance(self.sort_by_time, bool):
            raise ConfigError(f"sort_by_time must be true or false, got {self.sort_by_time!r}")
        if isinstance(self.skip_layers, (str, bytes)) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.skip_layers):
            raise ConfigError(f"skip_layers must be a list of layer indices >= 0, got {self.skip_layers!r}")
        self.skip_layers = tuple(sorted(set(self.skip_layers)))
        self.keep_ratio = float(self.keep_ratio)
        no_window = self.keep_ratio == 0 or (self.fix_kv_size is not None and self.budget.n_recent == 0)
        if no_window and (why := self.strategy.without_recent_window()):
            _advise(f"{self.strategy.label} with keep_ratio={self.keep_ratio:g} keeps no recent window: {why}")

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> Compression:
        """Build from a config node, naming the valid keys when one is unknown."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(node) - set(valid))
        if unknown:
            raise ConfigError(f"compress has no setting {unknown[0]!r}; its settings are: {', '.join(valid)}")
        return cls(**node)

    def to_dict(self) -> dict[str, Any]:
        """The config node that rebuilds this spec (strategy settings filled in): what runs log."""
        node = {f.name: getattr(self, f.name) for f in fields(self)}
        return node | {"strategy": settings(self.strategy), "skip_layers": list(self.skip_layers)}

    @property
    def label(self) -> str:
        """The run's name: the strategy's label, then the named settings (e.g. `h2o kv=512 r=0.5`, `h2o r=0.5 ratio=0.9 prefill`)."""
        return " ".join([self.strategy.label, *name_parts(self)])

    def resolved(self, n_tokens: int) -> Compression:
        """This spec with the budget in tokens for a text or prompt of `n_tokens` tokens: `ratio`
        becomes fix_kv_size = round_half_up((1 - ratio) * n_tokens), at least 1."""
        if self.ratio is None:
            return self
        size = max(1, math.floor((1 - self.ratio) * n_tokens + 0.5))
        if self.n_sink >= size:
            raise ConfigError(f"n_sink={self.n_sink} leaves no room in the {size} tokens ratio={self.ratio:g} keeps of "
                              f"{n_tokens}; lower n_sink or ratio")
        return replace(self, fix_kv_size=size, ratio=None)

    @property
    def budget(self) -> Budget:
        from knormpress.eviction import Budget

        if self.fix_kv_size is None:
            raise ConfigError(f"ratio={self.ratio:g} gives no budget until a length is known; call resolved(n_tokens)")
        return Budget(self.fix_kv_size, float(self.keep_ratio), self.n_sink)

    def check_layers(self, n_layers: int) -> None:
        """Fail on skip layers the model does not have."""
        bad = [i for i in self.skip_layers if i >= n_layers]
        if bad:
            raise ConfigError(f"skip_layers {bad} do not exist; this model has layers 0..{n_layers - 1}")


@functools.cache
def _advise(line: str) -> None:
    """Log a warning once per process (a run builds its compression several times)."""
    log.warning(line)
