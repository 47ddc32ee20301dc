"""One exception type for user mistakes, so the CLI can print one line instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A bad value from the user: the message names the value and the valid choices."""


def unknown(what: str, value: Any, choices: Iterable[Any]) -> ConfigError:
    """The one wording for a value outside its choices: `unknown <what> <value>; choose one of ...`,
    then the nearest choice when one is close (a typo)."""
    choices = list(choices)
    return ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}{did_you_mean(value, choices)}")


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """`; did you mean 'x'?` for the choice nearest to a mistyped `value`, or "" when none is close."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def choose(what: str, value: Any, choices: Iterable[Any]) -> None:
    """Fail with `unknown` unless `value` is among `choices`."""
    choices = list(choices)
    if value not in choices:
        raise unknown(what, value, choices)
