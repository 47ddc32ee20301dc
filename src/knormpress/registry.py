"""Registries of small dataclasses built by name from config: strategies and tasks.

A registered class has a `name` and dataclass fields that are its own settings, so a YAML node
`{name: random, seed: 3}` builds `Random(seed=3)`, and `settings(obj)` gives that node back for
MLflow params. A misspelled name or setting fails with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any, Generic, TypeVar

from knormpress.errors import ConfigError, choose

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class, for one kind of plug-in ("strategy", "task")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` buildable by its `name`."""
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass so its settings can come from config")
        self.classes[cls.name] = cls
        return cls

    def build(self, spec: str | Mapping[str, Any] | T, base: type[T]) -> T:
        """An instance from a name, a `{name: ..., <setting>: ...}` mapping, or an instance (returned as is)."""
        if isinstance(spec, base):
            return spec
        node = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = node.pop("name", None)
        choose(self.kind, name, sorted(self.classes))
        cls = self.classes[name]
        valid = [f.name for f in fields(cls) if f.init]
        unknown = sorted(set(node) - set(valid))
        if unknown:
            raise ConfigError(
                f"{self.kind} {name!r} has no setting {unknown[0]!r}; its settings are: {', '.join(valid) or 'none'}"
            )
        return cls(**node)

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.classes))


def settings(obj: Any) -> dict[str, Any]:
    """The config node that rebuilds `obj`: its name and its own settings."""
    return {"name": obj.name, **{f.name: getattr(obj, f.name) for f in fields(obj) if f.init}}

