r"""A readable byte-level byte-pair encoding (BPE) tokenizer: train, encode, decode.

Byte-level BPE (GPT-2, Llama 3) starts from the 256 byte values, so every Unicode
string can be encoded (no unknown token) and decoding is exact. Training repeats one
step:

1. cut the text into *words* with :data:`PATTERN` (an optional space and a run of
   word characters, an optional space and a run of punctuation, or white space), so
   that no token crosses a word boundary, and count each distinct word once;
2. count every pair of adjacent tokens inside the words, weighted by the word counts;
3. merge the most frequent pair into a new token everywhere (ties: the pair of smaller
   ids, first the left one), and record the merge.

Encoding cuts the text the same way and, inside each word, applies the recorded merges
in the order they were learned. Decoding concatenates the tokens' bytes.

:meth:`ByteBPE.train` is the readable trainer (pure Python, fine for a few hundred
kilobytes); ``ByteBPE.train(..., fast=True)`` trains with Hugging Face ``tokenizers``
(imported only then) on the same words and reads its merges back, so the two give a
:class:`ByteBPE` of the same form. They learn the same merges while the most frequent
pair is unique; on a tie, ``tokenizers`` takes the pair whose ids are smaller in *its*
numbering (the 256 bytes ordered by GPT-2's printable stand-in characters, so the space
byte, ``Ġ``, comes after the letters), ours the pair of smaller byte values, so the
two may take different, equally frequent, pairs from the first tie on.
:meth:`ByteBPE.to_tokenizers` builds the equivalent ``tokenizers.Tokenizer`` for fast
encoding.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["PATTERN", "ByteBPE", "tokens_per_character"]

# One pattern for both trainers: GPT-2's split, with \w for its letter and digit
# classes. Python's re and the Oniguruma engine of tokenizers cut both corpora the
# same way (tested); their Unicode tables may disagree on rare characters, and then
# only the fast encoder of to_tokenizers() differs, never the round trip.
#: The regular expression that cuts a text into words before merging.
PATTERN = r" ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+"
_SPLIT = re.compile(PATTERN)


def _words(text: str) -> list[str]:
    """``text`` cut into the pieces no token crosses; they concatenate to ``text``."""
    return _SPLIT.findall(text)


def _merge(word: tuple[int, ...], pair: tuple[int, int], new: int) -> tuple[int, ...]:
    """``word`` with every non-overlapping ``pair`` (left to right) replaced by
    ``new``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _check_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


@dataclass
class ByteBPE:
    """A trained byte-level BPE: ``vocab[i]`` is token ``i``'s bytes (the first 256 are
    the single bytes) and ``merges[r] = (a, b)`` the merge of rank ``r``, which makes
    the token whose bytes are ``vocab[a] + vocab[b]``."""

    vocab: list[bytes]
    merges: list[tuple[int, int]]
    # from the readable trainer: how often each merged pair occurred, and how many
    # pairs shared that highest count (1: no tie)
    counts: list[int] | None = None
    ties: list[int] | None = None
    _ids: dict = field(init=False, repr=False)
    _ranks: dict = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.vocab) < 256 or any(
            self.vocab[i] != bytes([i]) for i in range(256)
        ):
            raise ValueError("vocab must start with the 256 single bytes, in order")
        self._ids = {token: i for i, token in enumerate(self.vocab)}
        self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # --- training ---------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int, *, fast: bool = False) -> "ByteBPE":
        """Learn ``vocab_size - 256`` merges from ``text``.

        Stops early when no pair occurs any more. ``fast=True`` trains with Hugging
        Face ``tokenizers`` instead of the loop below (same words, same rule while the
        most frequent pair is unique; see the module's docstring for ties).
        """
        text = _check_text("text", text)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < 256:
            raise ValueError(
                f"vocab_size must be >= 256 (the single bytes), got {vocab_size}"
            )
        if fast:
            return cls._train_tokenizers(text, vocab_size)
        counts = Counter(_words(text))  # word -> how often it occurs
        words = [tuple(w.encode("utf-8")) for w in counts]  # each as byte ids
        freq = list(counts.values())
        vocab = [bytes([i]) for i in range(256)]
        ids = {token: i for i, token in enumerate(vocab)}
        merges, merge_counts, ties = [], [], []
        while len(vocab) < vocab_size:
            pairs = Counter()  # (a, b) -> occurrences in the text
            for word, n in zip(words, freq):
                for pair in zip(word, word[1:]):
                    pairs[pair] += n
            if not pairs:
                break
            # the most frequent pair; on a tie the smaller (a, b)
            best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
            token = vocab[best[0]] + vocab[best[1]]
            if token not in ids:
                ids[token] = len(vocab)
                vocab.append(token)
            merges.append(best)
            merge_counts.append(pairs[best])
            ties.append(sum(1 for n in pairs.values() if n == pairs[best]))
            new = ids[token]
            words = [_merge(w, best, new) if len(w) > 1 else w for w in words]
        return cls(vocab, merges, merge_counts, ties)

    @classmethod
    def _train_tokenizers(cls, text: str, vocab_size: int) -> "ByteBPE":
        tokenizer = _empty_tokenizer({}, [])
        from tokenizers import pre_tokenizers, trainers

        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tokenizer.train_from_iterator([text], trainer=trainer)
        decode = _unicode_to_bytes()
        vocab = [bytes([i]) for i in range(256)]
        ids = {token: i for i, token in enumerate(vocab)}
        merges = []
        for left, right in _merges_of(tokenizer):
            a, b = ids[_to_bytes(left, decode)], ids[_to_bytes(right, decode)]
            token = vocab[a] + vocab[b]
            if token not in ids:
                ids[token] = len(vocab)
                vocab.append(token)
            merges.append((a, b))
        return cls(vocab, merges)

    # --- encoding ---------------------------------------------------------------------

    def _encode_word(self, word: str) -> list[int]:
        tokens = tuple(word.encode("utf-8"))
        while len(tokens) > 1:
            # the pair learned first among those present
            pair = min(
                zip(tokens, tokens[1:]), key=lambda p: self._ranks.get(p, float("inf"))
            )
            if pair not in self._ranks:
                break
            tokens = _merge(
                tokens, pair, self._ids[self.vocab[pair[0]] + self.vocab[pair[1]]]
            )
        return list(tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        text = _check_text("text", text)
        cache: dict[str, list[int]] = {}
        ids: list[int] = []
        for word in _words(text):
            if word not in cache:
                cache[word] = self._encode_word(word)
            ids.extend(cache[word])
        return ids

    def decode(self, ids) -> str:
        """The text of token ``ids``; bytes that are not valid UTF-8 (a sequence cut
        inside a character) become U+FFFD."""
        data = b"".join(self._token(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    def _token(self, i) -> bytes:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"ids must be integers, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < len(self.vocab):
            raise ValueError(f"ids must be in 0 .. {len(self.vocab) - 1}, got {i}")
        return self.vocab[i]

    def tokens_per_character(self, text: str) -> float:
        """``len(encode(text)) / len(text)``: how many tokens a character costs."""
        return tokens_per_character(self, text)

    # --- the fast path ----------------------------------------------------------------

    def to_tokenizers(self):
        """The same tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (same ids,
        same encodings)."""
        encode = _bytes_to_unicode()

        def name(token: bytes) -> str:
            return "".join(encode[b] for b in token)

        vocab = {}
        for i, token in enumerate(self.vocab):
            vocab.setdefault(name(token), i)
        merges = [(name(self.vocab[a]), name(self.vocab[b])) for a, b in self.merges]
        return _empty_tokenizer(vocab, merges)


def tokens_per_character(tokenizer, text: str) -> float:
    """Tokens per character of ``text`` under ``tokenizer`` (anything with
    ``encode(text) -> ids``); a ``ValueError`` for an empty text."""
    text = _check_text("text", text)
    if not text:
        raise ValueError("text must not be empty")
    ids = tokenizer.encode(text)
    ids = getattr(ids, "ids", ids)  # a tokenizers.Encoding
    return len(ids) / len(text)


# --- GPT-2's byte <-> printable character table (what tokenizers stores) --------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes stand for themselves, the others for the
    characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def _to_bytes(name: str, decode: dict[str, int]) -> bytes:
    return bytes(decode[c] for c in name)


def _empty_tokenizer(vocab: dict, merges: list):
    """A ``tokenizers.Tokenizer`` with our split and GPT-2's byte-level mapping."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    model = models.BPE(vocab=vocab, merges=merges) if vocab else models.BPE()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_of(tokenizer) -> list[list[str]]:
    """A ``tokenizers.Tokenizer``'s BPE merges as ``[left, right]`` strings."""
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
