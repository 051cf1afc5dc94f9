r"""Two real corpora shipped with the package, compressed: nothing is downloaded.

* ``"shakespeare"``: Tiny Shakespeare, ``data/tinyshakespeare/input.txt`` of
  karpathy/char-rnn (about 40,000 lines of the plays, 1,115,394 ASCII characters),
  unchanged.
* ``"tang"``: the regular five- and seven-character quatrains and octaves (jueju and
  lüshi) of the Complete Tang Poems, from ``全唐诗/poet.tang.*.json`` of
  chinese-poetry/chinese-poetry, in **traditional characters** as the source has them:
  one couplet a line (``秦川雄帝宅，函谷壯皇居。``), poems separated by an empty line.

Traditional characters are kept: the conversion to simplified characters is
many-to-one (髮 and 發 both become 发), so it loses distinctions the poems make; the
shipped text stays checkable against its source byte for byte; and it adds no
dependency (OpenCC). A reader who wants simplified text can convert the returned
strings.

:func:`corpus` returns a :class:`Corpus` with fixed ``train`` and ``validation``
strings: Shakespeare's first 90 % of characters and the last 10 % (the split of
nanoGPT's ``shakespeare_char``), and for the poems every tenth poem (poems 9, 19,
29, ...) held out, so that both halves span the whole period and every poet. The
prepared texts' sha256 is checked when they are read.
``companion/corpora/_prepare.py`` rebuilds the files from the two repositories.
"""

from __future__ import annotations

import hashlib
import lzma
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = ["CORPORA", "SOURCES", "Corpus", "corpus", "regular_line_share"]

_HERE = Path(__file__).resolve().parent

# name -> where the text comes from, under which licence, and the sha256 of the
# prepared (uncompressed, UTF-8) text shipped as ``<name>.txt.xz``.
SOURCES = {
    "shakespeare": {
        "title": "Tiny Shakespeare",
        "url": "https://github.com/karpathy/char-rnn/blob/"
        "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        "licence": "the plays are in the public domain; the char-rnn repository that "
        "collects them is MIT-licensed (Andrej Karpathy)",
        "language": "en",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "characters": 1115394,
    },
    "tang": {
        "title": "Complete Tang Poems (全唐诗): regular 5- and 7-character poems",
        "url": "https://github.com/chinese-poetry/chinese-poetry/tree/"
        "99ebbef7e1345c0985c44b9fd96a3f9e776f117b/%E5%85%A8%E5%94%90%E8%AF%97",
        "licence": "the poems are in the public domain; the chinese-poetry collection "
        "is MIT-licensed (Copyright (c) 2016 JackeyGao)",
        "language": "zh-Hant",
        "sha256": "f7daad2927a5ef272e9b2509176ade60d1c2faabe40bfdc52555125a1a0534f8",
        "characters": 1767304,
    },
}
#: The names :func:`corpus` accepts.
CORPORA = tuple(SOURCES)


@dataclass(frozen=True)
class Corpus:
    """A corpus's fixed ``train`` and ``validation`` text and where it comes from."""

    name: str
    train: str
    validation: str
    source: dict

    @property
    def text(self) -> str:
        """Both splits, as one string (training first)."""
        return self.train + self.validation


@lru_cache(maxsize=None)
def _text(name: str) -> str:
    data = lzma.decompress((_HERE / f"{name}.txt.xz").read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCES[name]["sha256"]:
        raise RuntimeError(
            f"the shipped corpus {name!r} is damaged: sha256 {digest}, expected "
            f"{SOURCES[name]['sha256']}"
        )
    return data.decode("utf-8")


def _split(name: str, text: str) -> tuple[str, str]:
    if name == "shakespeare":
        cut = int(0.9 * len(text))
        return text[:cut], text[cut:]
    poems = text.rstrip("\n").split("\n\n")
    train = [p for i, p in enumerate(poems) if i % 10 != 9]
    validation = [p for i, p in enumerate(poems) if i % 10 == 9]
    return "\n\n".join(train) + "\n", "\n\n".join(validation) + "\n"


def corpus(name: str) -> Corpus:
    """The corpus ``name`` (one of :data:`CORPORA`) with its fixed train/validation
    split; the same strings on every call and every machine."""
    if not isinstance(name, str) or name not in SOURCES:
        raise ValueError(f"corpus name must be one of {CORPORA}, got {name!r}")
    train, validation = _split(name, _text(name))
    return Corpus(name, train, validation, dict(SOURCES[name]))


# one couplet of a regular poem: two lines of five, or two of seven, Han characters
_COUPLET = re.compile(
    r"[\u4e00-\u9fff]{5}，[\u4e00-\u9fff]{5}。|"
    r"[\u4e00-\u9fff]{7}，[\u4e00-\u9fff]{7}。"
)


def regular_line_share(text: str) -> float:
    """The share of the non-empty lines of ``text`` that are one couplet of a regular
    poem, as the ``"tang"`` corpus writes them: ``AAAAA，BBBBB。`` or
    ``AAAAAAA，BBBBBBB。`` (Han characters only). 1.0 for the corpus itself; a
    measure of form, not of sense, for generated text. ``nan`` without lines."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return float("nan")
    return sum(bool(_COUPLET.fullmatch(line)) for line in lines) / len(lines)
