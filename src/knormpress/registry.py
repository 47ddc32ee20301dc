"""Registries of small dataclasses built by name from config: strategies and tasks.

A registered class has a `name` and dataclass fields that are its own settings, so a YAML node
`{name: random, seed: 3}` builds `Random(seed=3)`, and `settings(obj)` gives that node back for
MLflow params. A misspelled name or setting fails with the valid ones listed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any, Generic, TypeVar

import yaml

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

    def label(self, node: Mapping[str, Any], leave_out: Collection[str] = ()) -> str:
        """The node's name with every setting that differs from its class' default, e.g.
        `h2o[normalise=mean]` (settings in `leave_out` aside), so variants never share a name. Values
        may be typed or text as MLflow logs them (read as YAML); an unregistered name (a plug-in
        this process has not imported) comes back alone."""
        name = str(node["name"])
        if name not in self.classes:
            return name
        changed = [f"{f.name}={node[f.name]}" for f in fields(self.classes[name])
                   if f.init and f.name not in leave_out and f.name in node and not _is_default(node[f.name], f)]
        return f"{name}[{','.join(changed)}]" if changed else name

    @staticmethod
    def node(label: str) -> dict[str, Any]:
        """The node a label names (the inverse of `label`): `h2o[normalise=mean]` -> {name: h2o, normalise: mean}."""
        name, _, rest = label.partition("[")
        pairs = [p.partition("=") for p in rest.removesuffix("]").split(",") if p]
        if (rest and not rest.endswith("]")) or any(not eq for _, eq, _ in pairs):
            raise ConfigError(f"cannot read {label!r}: write a name, or name[setting=value,...]")
        return {"name": name, **{k: yaml.safe_load(v) for k, _, v in pairs}}

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.classes))


def settings(obj: Any) -> dict[str, Any]:
    """The config node that rebuilds `obj`: its name and its own settings."""
    return {"name": obj.name, **{f.name: getattr(obj, f.name) for f in fields(obj) if f.init}}



def _is_default(value: Any, f: Field) -> bool:
    default = f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
    if value == default or not isinstance(value, str) or isinstance(default, str):
        return value == default
    try:
        return (None if value == "None" else yaml.safe_load(value)) == default  # str(None) is how MLflow logs None
    except yaml.YAMLError:
        return False
