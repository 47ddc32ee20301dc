"""Package names imported on first use (PEP 562), so importing a package, and checking a config,
starts without torch, transformers or mlflow."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_names(package: str, home: dict[str, str]) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose public names live in the
    submodules `home` maps them to (name -> submodule, relative to the package). Any other name is
    tried as a submodule (`from knormpress.sources import models`)."""
    names = sorted(home)
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in home:
            try:
                return import_module(f"{package}.{name}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(import_module(f"{package}.{home[name]}"), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return names

    return names, __getattr__, __dir__
