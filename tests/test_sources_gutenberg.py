"""Project Gutenberg's markers and credits as they appeared over the years, in small synthetic files
read through `dataset=local_text`: only the book's own text is left."""

import pytest

from knormpress.sources import get_dataset, strip_gutenberg
from knormpress.sources.gutenberg import gutenberg_title, is_gutenberg

TITLE_PAGE = "THE LIFE AND EPISTLES OF ST. PAUL.\n\nBY THE REV. W. J. CONYBEARE\n\nEdited by A. Reader"  # the book's
BODY = f"{TITLE_PAGE}\n\nCHAPTER I.\n\nThe life of St. Paul begins in Tarsus.\nIt ends in Rome, scanned by no eye."

FILES = {
    # 1990s: the small print ends the header; the producer's line follows it
    "small_print_1993": f"""**The Project Gutenberg Etext of The Life of St. Paul**
Title: The Life of St. Paul

***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***
Why is this "Small Print!" statement here?
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

This etext was prepared by A. Volunteer, Somewhere.

{BODY}

End of Project Gutenberg Etext of The Life of St. Paul
""",
    "small_print_2002": f"""The Project Gutenberg EBook of The Life of St. Paul
Title: The Life of St. Paul

*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*



Scanned and proofed by A. Volunteer.



{BODY}



End of Project Gutenberg's The Life of St. Paul, by W. J. Conybeare
""",
    # 2000s: START/END lines, "This" and the producers
    "this_ebook": f"""The Project Gutenberg EBook of The Life of St. Paul

Title: The Life of St. Paul

*** START OF THIS PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL ***




Produced by A. Volunteer and the Online Distributed
Proofreading Team at http://www.pgdp.net




{BODY}


End of the Project Gutenberg EBook of The Life of St. Paul

*** END OF THIS PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL ***

***** This file should be named 12345.txt or 12345.zip *****
""",
    "no_spaces": f"""The Project Gutenberg EBook of The Life of St. Paul

Title: The Life of St. Paul

***START OF THE PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL***


Transcribed from the 1893 Longmans, Green, and Co. edition by A. Volunteer,
email someone@example.org


{BODY}

***END OF THE PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL***
""",
    # a long title wraps the markers; the credit names the Project Gutenberg team
    "wrapped": f"""The Project Gutenberg EBook of The Life and Epistles of St. Paul, by W. J. Conybeare and J. S. Howson

Title: The Life and Epistles of St. Paul

***START OF THE PROJECT GUTENBERG EBOOK THE LIFE AND EPISTLES OF
ST. PAUL***


E-text prepared by A. Volunteer
and the Project Gutenberg Online Distributed Proofreading Team



{BODY}



***END OF THE PROJECT GUTENBERG EBOOK THE LIFE AND EPISTLES OF
ST. PAUL***
""",
    "wrapped_twice": f"""Title: The Life and Epistles of St. Paul

*** START OF THE PROJECT GUTENBERG EBOOK THE LIFE AND EPISTLES OF SAINT PAUL, WITH
MAPS, PLANS AND ILLUSTRATIONS, IN TWO VOLUMES, THE FIRST VOLUME, AS PRINTED IN
LONDON ***

Etext prepared by A. Volunteer

{BODY}
""",
    # 2020s: "THE", a credit that goes on over several lines, the licence after the END line
    "the_ebook": f"""The Project Gutenberg eBook of The Life of St. Paul

Title: The Life of St. Paul

Release date: June 1, 2021 [eBook #65500]

*** START OF THE PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL ***

Produced by A. Volunteer and the Online Distributed Proofreading Team at
https://www.pgdp.net (This file was produced from images generously made
available by The Internet Archive)

{BODY}

*** END OF THE PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL ***

Updated editions will replace the previous one.
""",
}


@pytest.fixture
def docs(tmp_path) -> dict:
    folder = tmp_path / "books"
    folder.mkdir()
    for name, text in FILES.items():
        (folder / f"{name}.txt").write_text(text)
    return {d.id: d for d in get_dataset({"name": "local_text", "path": str(folder)}).documents(tmp_path)}


@pytest.mark.parametrize("name", FILES)
def test_only_the_book_is_left(docs, name):
    assert is_gutenberg(FILES[name])
    assert docs[name].text == BODY


def test_the_title_comes_from_the_header(docs):
    assert {name: d.title for name, d in docs.items()} == {name: gutenberg_title(FILES[name]) for name in FILES}
    assert docs["wrapped"].title == "The Life and Epistles of St. Paul" and docs["this_ebook"].title == "The Life of St. Paul"


def test_an_unclosed_start_marker_is_one_line():
    raw = f"*** START OF THIS PROJECT GUTENBERG EBOOK THE LIFE OF ST. PAUL\n{BODY}"  # the title page follows at once
    assert strip_gutenberg(raw) == BODY


def test_windows_line_ends_and_a_byte_order_mark():
    assert strip_gutenberg("\ufeff" + FILES["wrapped"].replace("\n", "\r\n")) == BODY
