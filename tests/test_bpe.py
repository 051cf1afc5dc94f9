"""The readable byte-level BPE and its fast path through tokenizers (issue 24)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.bpe import ByteBPE, tokens_per_character
from companion.corpora import corpus

pytest.importorskip("tokenizers")

ENGLISH = corpus("shakespeare").train[:30_000]
CHINESE = corpus("tang").train[:6_000]


@pytest.fixture(scope="module")
def english():
    return ByteBPE.train(ENGLISH, 300)


@pytest.fixture(scope="module")
def bilingual():
    return ByteBPE.train(ENGLISH[:15_000] + CHINESE, 300)


def merged(bpe, k):
    return [bpe.vocab[a] + bpe.vocab[b] for a, b in bpe.merges[:k]]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_round_trip_is_exact_for_any_string(english, text):
    ids = english.encode(text)
    assert english.decode(ids) == text
    assert all(0 <= i < english.vocab_size for i in ids)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)))
def test_round_trip_chinese(bilingual, text):
    assert bilingual.decode(bilingual.encode(text)) == text


def test_merges_shorten_and_are_learned_from_frequent_pairs(english):
    assert english.vocab_size == 300
    assert len(english.merges) == 44
    ids = english.encode(ENGLISH)
    assert len(ids) < 0.75 * len(ENGLISH.encode("utf-8"))
    # the counts are the merged pairs' occurrences, never increasing much
    assert english.counts[0] == max(english.counts)
    assert b"e " in merged(english, 10) or b" t" in merged(english, 10)


def test_fast_path_agrees_until_the_first_tie(english):
    fast = ByteBPE.train(ENGLISH, 300, fast=True)
    assert fast.vocab_size == english.vocab_size
    first_tie = next(
        (i for i, t in enumerate(english.ties) if t > 1), len(english.merges)
    )
    assert first_tie >= 10  # the comparison covers a real stretch of merges
    assert merged(fast, first_tie) == merged(english, first_tie)
    # from the tie on they may differ, but only among equally frequent pairs: the
    # tied merge that ours took is among the next few of theirs
    if first_tie < len(english.merges):
        window = merged(fast, first_tie + english.ties[first_tie])
        assert merged(english, first_tie + 1)[-1] in window


def test_fast_path_agrees_everywhere_without_ties():
    # one pair per word, the words on their own lines, word k occurring k + 1
    # times: every pair count is distinct, so both must take them in that order
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]
    text = "\n".join(w for k, w in enumerate(words) for _ in range(k + 1))
    slow = ByteBPE.train(text, 300)
    fast = ByteBPE.train(text, 300, fast=True)
    assert slow.ties == [1] * 8
    assert merged(slow, 8) == merged(fast, 8) == [w.encode() for w in words[::-1]]


def test_to_tokenizers_encodes_identically(english, bilingual):
    for bpe, text in ((english, ENGLISH[:5000]), (bilingual, CHINESE[:2000])):
        fast = bpe.to_tokenizers()
        assert fast.encode(text).ids == bpe.encode(text)
        assert fast.decode(bpe.encode(text)) == text


def test_tokens_per_character(english, bilingual):
    english_tpc = tokens_per_character(english, ENGLISH[:5000])
    assert english_tpc == english.tokens_per_character(ENGLISH[:5000])
    assert english_tpc == len(english.encode(ENGLISH[:5000])) / 5000
    # an English-only vocabulary spends about three tokens (bytes) per Han character
    chinese_under_english = tokens_per_character(english, CHINESE[:3000])
    chinese_under_bilingual = tokens_per_character(bilingual, CHINESE[:3000])
    assert chinese_under_english > 2.5
    assert chinese_under_bilingual < chinese_under_english
    fast = english.to_tokenizers()
    assert tokens_per_character(fast, ENGLISH[:5000]) == english_tpc


def test_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        ByteBPE.train("abc", 255)
    with pytest.raises(TypeError, match="vocab_size"):
        ByteBPE.train("abc", 300.0)
    with pytest.raises(TypeError, match="text"):
        ByteBPE.train(b"abc", 300)
    bpe = ByteBPE.train("abab", 258)
    with pytest.raises(TypeError, match="text"):
        bpe.encode(b"ab")
    with pytest.raises(ValueError, match="ids"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        tokens_per_character(bpe, "")
    with pytest.raises(ValueError, match="256 single bytes"):
        ByteBPE([b"a"], [])


def test_bytes_only_tokenizer_has_a_fast_twin():
    bpe = ByteBPE([bytes([i]) for i in range(256)], [])
    text = "naïve 你好"
    assert bpe.encode(text) == list(text.encode("utf-8"))
    assert bpe.to_tokenizers().encode(text).ids == bpe.encode(text)


def test_decode_of_a_cut_character_is_replacement_not_error(bilingual):
    ids = list("你".encode("utf-8"))[:2]  # two of the three bytes, as byte tokens
    assert bilingual.decode(ids) == "\ufffd"
