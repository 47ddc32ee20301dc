"""Project Gutenberg's file format: the header, licence and small print around a book's body,
in the modern form and the 1990s one, and the title from the header."""

import re

# Body starts after the modern "*** START OF THE PROJECT GUTENBERG EBOOK ..." line or the 1990s small-print trailer
# ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*", later "*END THE SMALL PRINT! ...").
_START = re.compile(r"^[ \t*]*(?:START OF (?:THE|THIS) PROJECT GUTENBERG|END[* ]+THE SMALL PRINT).*$", re.I | re.M)
_END = re.compile(r"^[ \t*]*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.I | re.M)
_TITLE = re.compile(r"^Title:[ \t]*(\S.*?)\s*$", re.M)
_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg\.org|gutenberg-tm|\bsmall print\b|\be-?texts?\b|\be-?books?\b|^produced by"
    r"|^(?:title|author|release date|language|character set encoding):",
    re.I | re.M,
)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file, without its header, licence and small print."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    end = _END.search(text)
    stop = end.start() if end else len(text)
    start = _START.search(text, 0, stop)  # only before the end, so a trailing small-print block is not taken for a start
    parts = re.split(r"(\n[ \t]*\n\s*)", text[start.end() if start else 0 : stop].strip())  # paragraphs, separators
    while parts and _BOILERPLATE.search(parts[0]):  # licence paragraphs left at either edge (files without markers)
        del parts[:2]
    while parts and _BOILERPLATE.search(parts[-1]):
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
