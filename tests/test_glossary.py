"""Every English term of the glossary occurs in the English text of the book.

The glossary (``book/glossary.md``) claims to list the terms the book uses; a term that
no chapter uses is noise, and issue 22 item 14 found five of them. The book's text here
is the Markdown of every notebook and page under ``book/`` except the glossary itself:
what a reader reads, not the code.

A glossary cell may hold several terms separated by `` / `` (``query / key / value``);
each must occur. A part in parentheses is an explanation or an abbreviation
(``kernel (of a convolution)``, ``grouped-query attention (GQA)``) and is not required.
Matching ignores case and line breaks, and requires whole words.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"
GLOSSARY = BOOK / "glossary.md"


def glossary_terms() -> list[str]:
    """The English column of every glossary table, split into single terms."""
    terms = []
    for line in GLOSSARY.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 2 or set(cells[0]) <= set("-: "):
            continue
        if cells[0] == "English":  # the header
            continue
        for term in cells[0].split(" / "):
            term = re.sub(r"\s*\([^)]*\)", "", term).strip()
            if term:
                terms.append(term)
    return terms


def book_text() -> str:
    parts = []
    for path in sorted(BOOK.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        parts += ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    parts += [p.read_text(encoding="utf-8") for p in sorted(BOOK.glob("*.md"))]
    parts = [p for p in parts if "(glossary)=" not in p]  # not the glossary itself
    return re.sub(r"\s+", " ", "\n".join(parts)).lower()


TEXT = book_text()
TERMS = glossary_terms()


def occurs(term: str, text: str) -> bool:
    words = re.escape(re.sub(r"\s+", " ", term.lower()))
    return re.search(rf"(?<![a-z0-9]){words}(?![a-z0-9])", text) is not None


def test_glossary_has_terms_and_the_text_is_read():
    assert len(TERMS) > 50
    assert "locally connected layer" in TERMS and "query" in TERMS
    assert "kernel" in TERMS  # "kernel (of a convolution)" without its explanation
    assert len(TEXT) > 100_000


def test_occurs_matches_whole_words_only():
    assert occurs("mask", "a causal mask here")
    assert not occurs("mask", "the masks")
    assert occurs("pre-norm", "a pre-norm\nblock".replace("\n", " "))


@pytest.mark.parametrize("term", TERMS)
def test_every_glossary_term_occurs_in_the_book(term):
    assert occurs(term, TEXT), f"glossary term {term!r} occurs nowhere in the book"
