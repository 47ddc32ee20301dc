"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A bad value from the user: the message names the value and the valid choices."""


def unknown(what: str, value: Any, choices: Iterable[Any]) -> ConfigError:
    """The one wording for a value outside its choices: `unknown <what> <value>; choose one of ...`."""
    return ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def choose(what: str, value: Any, choices: Iterable[Any]) -> None:
    """Fail with `unknown` unless `value` is among `choices`."""
    choices = list(choices)
    if value not in choices:
        raise unknown(what, value, choices)
