"""The shipped corpora (issue 24): fixed splits, checksums, sources, clear errors."""

import hashlib
import importlib.resources
import lzma
import math
import re

import pytest

from companion.corpora import CORPORA, SOURCES, corpus, regular_line_share
from companion.data import corpus as data_corpus


def test_names_and_reexport():
    assert CORPORA == ("shakespeare", "tang")
    assert data_corpus is corpus


@pytest.mark.parametrize("name", ["shakespeare", "tang"])
def test_shipped_text_matches_its_checksum_and_metadata(name):
    blob = importlib.resources.files("companion.corpora") / f"{name}.txt.xz"
    data = lzma.decompress(blob.read_bytes())
    assert hashlib.sha256(data).hexdigest() == SOURCES[name]["sha256"]
    assert len(data.decode("utf-8")) == SOURCES[name]["characters"]
    for key in ("title", "url", "licence", "language"):
        assert SOURCES[name][key]
    assert "MIT" in SOURCES[name]["licence"]
    assert "public domain" in SOURCES[name]["licence"]


@pytest.mark.parametrize("name", ["shakespeare", "tang"])
def test_splits_are_fixed_disjoint_and_cover_the_text(name):
    a, b = corpus(name), corpus(name)
    assert a == b  # the same strings on every call
    assert a.train and a.validation
    assert 0.85 < len(a.train) / (len(a.train) + len(a.validation)) < 0.95
    assert a.source["sha256"] == SOURCES[name]["sha256"]
    # changing the returned metadata does not change the table
    a.source["url"] = "elsewhere"
    assert SOURCES[name]["url"] != "elsewhere"


def test_shakespeare_split_is_nanogpts():
    c = corpus("shakespeare")
    assert c.text == lzma.decompress(
        (
            importlib.resources.files("companion.corpora") / "shakespeare.txt.xz"
        ).read_bytes()
    ).decode("ascii")
    assert len(c.train) == int(0.9 * 1115394)
    assert c.train.startswith("First Citizen:\nBefore we proceed any further")


def test_tang_poems_are_regular_and_traditional():
    c = corpus("tang")
    assert c.train.startswith("秦川雄帝宅，函谷壯皇居。\n")  # 壯, not 壮
    for split in (c.train, c.validation):
        poems = split.rstrip("\n").split("\n\n")
        for poem in poems[:: max(1, len(poems) // 500)]:
            couplets = poem.split("\n")
            assert len(couplets) in (2, 4), poem
            widths = {len(line) for line in re.split("[，。]", "".join(couplets))[:-1]}
            assert widths in ({5}, {7}), poem
    train_poems = c.train.rstrip("\n").split("\n\n")
    validation_poems = c.validation.rstrip("\n").split("\n\n")
    # every tenth poem is held out
    assert len(train_poems) == 9 * len(validation_poems) + (
        (len(train_poems) + len(validation_poems)) % 10
    )


@pytest.mark.parametrize("bad", ["Shakespeare", "wiki", "", None, 3])
def test_unknown_name_lists_the_names(bad):
    with pytest.raises(ValueError, match="shakespeare.*tang"):
        corpus(bad)


def test_regular_line_share():
    c = corpus("tang")
    assert regular_line_share(c.validation) == 1.0
    assert regular_line_share(c.train[: c.train.index("\n\n", 20_000)]) == 1.0
    assert (
        regular_line_share("秦川雄帝宅，函谷壯皇居。\n秦川雄帝，函谷壯皇居。\n\n")
        == 0.5
    )
    assert regular_line_share("白日依山盡，黃河入海流。\nabcde，fghij。") == 0.5
    assert regular_line_share("一二三四五六七，一二三四五六七。") == 1.0
    assert regular_line_share("一二三四五，一二三四五六七。") == 0.0  # mixed widths
    assert regular_line_share(corpus("shakespeare").validation) == 0.0
    assert math.isnan(regular_line_share("\n\n"))
    with pytest.raises(TypeError, match="text"):
        regular_line_share(b"abc")
