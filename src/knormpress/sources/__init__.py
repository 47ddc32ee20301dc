"""Models and evaluation texts, loadable offline: pinned PyPI files verified by sha256, cached once on disk.

Names are imported on first use, so reading a dataset (and checking a config) starts without torch
or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOME = {  # public name -> module of this package that defines it
    "ByteTokenizer": "tiny",
    "Dataset": "datasets",
    "Document": "datasets",
    "ModelBundle": "models",
    "Sample": "texts",
    "cache_dir": "cache",
    "check_supported": "support",
    "fetch_pypi": "cache",
    "get_dataset": "datasets",
    "load_model": "models",
    "load_model_config": "models",
    "load_samples": "texts",
    "register_dataset": "datasets",
    "select_samples": "texts",
    "strip_gutenberg": "gutenberg",
    "validate_model_spec": "models",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:  # a submodule (`from knormpress.sources import models`) is imported as such
        try:
            return import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
