"""Project Gutenberg's file format: the header, licence and small print around a book's body,
in the modern form and the 1990s one, and the title from the header.

The markers Gutenberg has used: the 1990s small print ends with "*END*THE SMALL PRINT! FOR PUBLIC
DOMAIN ETEXTS*Ver.04.29.93*END*" (later "*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*...*END*");
from about 2003 the body sits between "*** START OF THIS PROJECT GUTENBERG EBOOK X ***" and
"*** END OF THIS PROJECT GUTENBERG EBOOK X ***" (also written "***START OF THE ... X***", and
"THE" since about 2020), with "End of the Project Gutenberg EBook of X" (or "End of Project
Gutenberg's X") before the END marker. A long title wraps the START marker over more lines
("***START OF THE PROJECT GUTENBERG EBOOK THE LIFE AND EPISTLES OF" / "ST. PAUL***"); the marker
then ends at the first line that closes it with "*". Right after it come the producers' credits
("Produced by ...", "E-text prepared by ...", "Transcribed from the 1890 edition by ..."), which are
not the book either.
"""

import re

# A START marker (modern, or the end of the 1990s small print) runs to the first line ending in "*",
# at most 3 lines further and with no blank line between (a wrapped title); unclosed, it is one line.
_START = re.compile(
    r"^[ \t*]*(?:START OF (?:THE|THIS) PROJECT GUTENBERG|END[* ]+THE SMALL PRINT)"
    r"(?:(?:[^\n]*\n(?=[ \t]*\S)){0,3}?[^\n]*\*[ \t]*$|[^\n]*$)",
    re.I | re.M,
)
_END = re.compile(r"^[ \t*]*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
_TITLE = re.compile(r"^Title:[ \t]*(\S.*?)\s*$", re.M)
_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg\.org|gutenberg-tm|\bsmall print\b|\be-?texts?\b|\be-?books?\b|^produced by"
    r"|^(?:title|author|release date|language|character set encoding):",
    re.I | re.M,
)
# A producers' credit: a paragraph whose first words name a digitising step, then "by" on its first two lines
# ("Transcribed from the 1893 Macmillan edition by ...", "Scanned and proofed by ...", "This text was prepared by ...").
# Title-page lines such as "Edited by" or "Translated by" are the book's and stay.
_CREDIT = re.compile(
    r"\A[^\w\n]*(?:[\w'-]+[ \t]+){0,4}?(?:produced|prepared|transcribed|scanned|proof-?read|proofed|digiti[sz]ed|typed)"
    r"\b[^\n]*(?:\n[^\n]*)?\bby\b",
    re.I,
)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file, without its header, licence, small print and producers' credits."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    end = _END.search(text)
    stop = end.start() if end else len(text)
    start = _START.search(text, 0, stop)  # only before the end, so a trailing small-print block is not taken for a start
    parts = re.split(r"(\n[ \t]*\n\s*)", text[start.end() if start else 0 : stop].strip())  # paragraphs, separators
    while parts and (_BOILERPLATE.search(parts[0]) or _CREDIT.search(parts[0])):  # licence and credits left at the start
        del parts[:2]
    while parts and _BOILERPLATE.search(parts[-1]):  # licence paragraphs left at the end (files without markers)
        del parts[-2:]
    return "".join(parts).strip()


def is_gutenberg(text: str) -> bool:
    """Whether a text carries a Project Gutenberg start or end marker (modern or small-print)."""
    return bool(_START.search(text) or _END.search(text))


def gutenberg_title(text: str) -> str | None:
    """The "Title:" line of the header (before the body starts), if there is one."""
    start = _START.search(text)
    match = _TITLE.search(text[: start.start()] if start else text[:5000])
    return match.group(1) if match else None
