"""Settings declared once, on the fields of a dataclass spec, and what is derived from them.

A setting is a field made with `setting(default, help, ...)`. Its name, type and default come from
the field; its metadata says what cannot be inferred: the help text, how it shows in a run's name
(`named`: a format for its value, shown when the value differs from the default, or `always`),
whether it is part of the headline setting DVC's metrics are read at (`headline`), and what runs
logged before the setting existed computed (`before`; unset: such runs leave it blank). Run names
(`name_parts`), the report's columns and their types (`settings_of`, `kind`) and the bench's flags
(`add_flags`, `from_flags`) all read these fields, so a new setting is one field plus its check.
Nothing here imports torch: the report reads the spec too.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import yaml

SCALARS = {"bool": bool, "int": int, "float": float, "str": str}  # annotation -> the type a value is read as


def setting(default: Any, help: str, *, named: str | None = None, always: bool = False, headline: bool = True,
            before: Any = MISSING) -> Any:
    """A spec field that is a setting (see the module docstring); a list default is copied per instance."""
    meta = {"help": help, "named": named, "always": always, "headline": headline, "before": before}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.copy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One setting of a spec, as the rest of the code reads it."""

    name: str
    kind: type  # bool, int, float or str; object for anything else (shown and logged as text)
    sequence: bool  # a list of `kind` values (e.g. skip_layers: Sequence[int])
    default: Any
    help: str
    named: str | None
    always: bool
    headline: bool
    before: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings_of(spec: type) -> list[Setting]:
    """The settings of a spec class (its `setting(...)` fields), in field order."""
    out = []
    for f in fields(spec):
        if "help" not in f.metadata:
            continue
        kind, sequence = _kind(f.type)
        default = f.default_factory() if f.default is MISSING else f.default
        out.append(Setting(f.name, kind, sequence, default, **f.metadata))
    return out


def _kind(annotation: Any) -> tuple[type, bool]:
    """(value type, is a sequence) from an annotation such as "int | None" or "Sequence[int]"."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|") if p.strip() != "None"]
    if len(parts) != 1:
        return object, False
    outer, _, inner = parts[0].partition("[")
    if inner and outer.rsplit(".", 1)[-1] in ("Sequence", "list", "tuple"):
        return SCALARS.get(inner.split(",")[0].strip(" ]"), object), True
    return SCALARS.get(parts[0], object), False


def name_parts(spec: Any) -> list[str]:
    """What a spec instance adds to a run's name: each `named` setting that is set (not None) and
    differs from its default (or is `always` named), formatted, in field order."""
    parts = []
    for s in settings_of(type(spec)):
        value = getattr(spec, s.name)
        if s.named and value is not None and (s.always or value != s.default):
            parts.append(s.named.format(value))
    return parts


def add_flags(parser: argparse.ArgumentParser, spec: type) -> None:
    """One command-line flag per setting (`--fix-kv-size`), defaulting to the spec's default; values
    are read as YAML (`--ratio null`, `--positions true`), so the spec's own checks judge them."""
    for s in settings_of(spec):
        nargs = {"nargs": "*"} if s.sequence else {}
        parser.add_argument(s.flag, dest=s.name, type=_yaml, default=s.default, **nargs,
                            help=f"{s.help} (default: {s.default})".replace("%", "%%"))  # argparse formats help with %


def from_flags(args: argparse.Namespace, spec: type, **more: Any) -> Any:
    """The spec built from the parsed flags of `add_flags` (plus `more`, e.g. the strategy)."""
    return spec(**{s.name: getattr(args, s.name) for s in settings_of(spec)}, **more)


def _yaml(text: str) -> Any:
    return yaml.safe_load(text)


def defaults(spec: type) -> dict[str, Any]:
    """Each setting's default (sequences as lists): the node Hydra composes a run's settings over."""
    return {s.name: list(s.default) if s.sequence else s.default for s in settings_of(spec)}
