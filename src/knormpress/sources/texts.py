"""Evaluation texts as documents, and the deterministic, cached choice of token windows from them
(the documents come from a dataset: `knormpress.sources.datasets`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knormpress.errors import ConfigError
from knormpress.sources.cache import cache_dir
from knormpress.sources.datasets import Dataset, Document, get_dataset

log = logging.getLogger("knormpress.sources")

SAMPLES_VERSION = 3  # bump when document processing or selection changes, so old cached selections are not reused


@dataclass(frozen=True)
class Sample:
    id: str
    title: str
    input_ids: torch.Tensor  # 1-D LongTensor, exactly max_tokens long


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
    dataset: Dataset | str | dict,
    tokenizer: Any,
    tokenizer_name: str,
    *,
    n_samples: int,
    max_tokens: int,
    start_offset: int,
    seed: int,
    cache: str | Path | None = None,
) -> list[Sample]:
    """The dataset's documents (a `Dataset`, or its name or config node) + select_samples, cached
    under a key built from every input that changes the result."""
    dataset = get_dataset(dataset)
    inputs = {"dataset": dataset.identity(), "tokenizer": tokenizer_name, "n_samples": n_samples,
              "max_tokens": max_tokens, "start_offset": start_offset, "seed": seed, "version": SAMPLES_VERSION}
    key = f"{dataset.name}-{hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]}"
    root = cache_dir(cache)
    if (samples := _read_samples(root / "samples" / f"{key}.pt", n_samples, max_tokens)) is not None:
        log.info("read %d samples (%s) from the cache", len(samples), key)
        return samples
    return select_samples(dataset.documents(root), tokenizer, n_samples=n_samples, max_tokens=max_tokens,
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
