"""Rebuild the shipped corpora from the public repositories (run once, offline, by a
maintainer; nothing here runs when the package is used).

::

    python -m companion.corpora._prepare CHAR_RNN_CHECKOUT CHINESE_POETRY_CHECKOUT

reads ``data/tinyshakespeare/input.txt`` of karpathy/char-rnn and
``全唐诗/poet.tang.*.json`` of chinese-poetry/chinese-poetry, writes
``shakespeare.txt.xz`` and ``tang.txt.xz`` beside this file and prints the sha256 of
each prepared (uncompressed) text for ``SOURCES``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# a regular line: five or seven Han characters (no gaps such as "□", no notes)
_HAN = re.compile(r"^[\u4e00-\u9fff]+$")


def regular_poem(paragraphs: list[str]) -> list[str] | None:
    """The couplets of a regular five- or seven-character quatrain or octave
    (jueju, lüshi), or ``None``.

    Every paragraph must be one couplet ``AAAAA，BBBBB。`` with both lines of the same
    length, 5 or 7, all lines of the poem that length, and 2 or 4 couplets.
    """
    if len(paragraphs) not in (2, 4):
        return None
    width = None
    for couplet in paragraphs:
        if not couplet.endswith("。") or couplet.count("，") != 1:
            return None
        first, second = couplet[:-1].split("，")
        if not (_HAN.match(first) and _HAN.match(second)):
            return None
        if len(first) != len(second) or len(first) not in (5, 7):
            return None
        if width is None:
            width = len(first)
        elif len(first) != width:
            return None
    return list(paragraphs)


def tang_text(root: Path) -> str:
    """Every regular poem of ``root/全唐诗/poet.tang.N.json`` in file order (``N``
    ascending), one couplet a line, poems separated by one empty line."""
    files = sorted(
        (root / "全唐诗").glob("poet.tang.*.json"),
        key=lambda p: int(p.name.split(".")[2]),
    )
    poems = []
    for path in files:
        for poem in json.loads(path.read_text(encoding="utf-8")):
            couplets = regular_poem(poem.get("paragraphs", []))
            if couplets is not None:
                poems.append("\n".join(couplets))
    return "\n\n".join(poems) + "\n"


def write(name: str, text: str) -> None:
    data = text.encode("utf-8")
    (HERE / f"{name}.txt.xz").write_bytes(
        lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    )
    digest = hashlib.sha256(data).hexdigest()
    sys.stdout.write(f"{name}: {len(text)} characters, {len(data)} bytes, {digest}\n")


def main(argv: list[str]) -> None:
    char_rnn, poetry = (Path(a) for a in argv)
    shakespeare = (char_rnn / "data/tinyshakespeare/input.txt").read_text("utf-8")
    write("shakespeare", shakespeare)
    write("tang", tang_text(poetry))


if __name__ == "__main__":
    main(sys.argv[1:])
