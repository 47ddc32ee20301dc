import hashlib
import logging
import subprocess
from pathlib import Path

import pytest

from knormpress.errors import ConfigError
from knormpress.sources import cache as cache_module
from knormpress.sources.cache import cache_dir, fetch_pypi

PAYLOAD = b"pretend wheel " * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "fake_pkg-1.0-py3-none-any.whl"


class FakePip:
    """Stands in for `python -m pip download`: writes `payload` where pip would, and records the commands."""

    def __init__(self, payload: bytes = PAYLOAD, returncode: int = 0):
        self.payload, self.returncode, self.commands = payload, returncode, []

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        if self.returncode == 0:
            Path(cmd[cmd.index("-d") + 1], NAME).write_bytes(self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: No matching distribution found for fake-pkg==1.0")


@pytest.fixture
def fake_pip(monkeypatch):
    def install(**kwargs) -> FakePip:
        fake = FakePip(**kwargs)
        monkeypatch.setattr(cache_module.subprocess, "run", fake)
        return fake

    return install


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("KNORMPRESS_CACHE", raising=False)
    assert cache_dir() == tmp_path / "xdg" / "knormpress"
    monkeypatch.setenv("KNORMPRESS_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert (tmp_path / "arg").is_dir()


def test_fetch_downloads_once_and_never_installs(tmp_path, fake_pip):
    pip = fake_pip()
    path = fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path)
    assert path == tmp_path / "downloads" / NAME and path.read_bytes() == PAYLOAD
    assert fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path) == path
    assert len(pip.commands) == 1
    cmd = pip.commands[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
    assert [p.name for p in (tmp_path / "downloads").iterdir() if not p.name.endswith(".lock")] == [NAME]


def test_sdist_asks_pip_for_source(tmp_path, fake_pip):
    pip = fake_pip()
    fetch_pypi("fake-pkg==1.0", NAME, SHA, sdist=True, cache=tmp_path)
    assert "--no-binary" in pip.commands[0]


def test_truncated_cache_is_fetched_again(tmp_path, fake_pip, caplog):
    pip = fake_pip()
    path = fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path)
    path.write_bytes(PAYLOAD[:100])  # an interrupted copy
    with caplog.at_level(logging.WARNING, logger="knormpress.sources"):
        assert fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path).read_bytes() == PAYLOAD
    assert len(pip.commands) == 2
    assert "sha256" in caplog.text


def test_bad_download_is_removed(tmp_path, fake_pip):
    fake_pip(payload=b"tampered")
    with pytest.raises(ConfigError, match=f"expected {SHA}"):
        fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path)
    assert [p.name for p in (tmp_path / "downloads").iterdir() if not p.name.endswith(".lock")] == []


def test_offline_pip_says_where_to_put_the_file(tmp_path, fake_pip):
    fake_pip(returncode=1)
    with pytest.raises(ConfigError) as error:
        fetch_pypi("fake-pkg==1.0", NAME, SHA, cache=tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "downloads" / NAME) in message and "No matching distribution" in message
