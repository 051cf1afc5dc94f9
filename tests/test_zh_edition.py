"""The Chinese edition reads as an editor would want it (issue 29): tools/zh_lint.py.

``test_i18n.py`` proves that each translation keeps its markup and that msgfmt accepts
the catalogs; this file runs the editor's checks of ``tools/zh_lint.py`` over every
catalog of the book (one test per catalog, so that a failure names it): emphasis as
MyST parses it, the glossary's terms and the forbidden renderings, untranslated
English, quotations of the sources, link texts and admonition titles, typography.
The checks themselves are tested on small examples first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("zh_lint", ROOT / "tools" / "zh_lint.py")
zh_lint = importlib.util.module_from_spec(_spec)
sys.modules["zh_lint"] = zh_lint
_spec.loader.exec_module(zh_lint)

# Catalogs whose chapters are being rewritten and are translated only after the new
# English is merged (`make translations`). They are still checked and reported (xfail,
# not strict: a clean one passes); remove a name once its catalog is translated and
# clean. Keep this the only list. Empty: every catalog must pass.
PENDING: set[str] = set()

CATALOGS = zh_lint.all_catalogs()


def _param(path: Path):
    marks = (
        [pytest.mark.xfail(reason="translated after this wave's merge", strict=False)]
        if path.stem in PENDING
        else []
    )
    return pytest.param(path, id=path.stem, marks=marks)


# --------------------------------------------------------------------------- checks


def test_emphasis_is_parsed_not_counted():
    # The same number of '**' markers, but CommonMark does not open bold between two
    # punctuation marks: the Chinese version renders literal stars.
    msgid = "The **score** is the logit."
    broken = "logit，**“分数”**是它。"
    assert zh_lint.check_emphasis(msgid, "**分数**就是 logit。") == []
    problems = zh_lint.check_emphasis(msgid, broken)
    assert any("strong" in p for p in problems) and any("'*'" in p for p in problems)
    # Italics may be dropped (Chinese has none), never added.
    assert zh_lint.check_emphasis("the *seen* column", "“seen”列") == []
    assert zh_lint.check_emphasis("the seen column", "*seen* 列")


def test_forbidden_renderings():
    assert zh_lint.check_forbidden("本书包中的函数")
    assert zh_lint.check_forbidden("缓存小 $H$ 倍")
    assert zh_lint.check_forbidden("结果一致到 $10^{-10}$")
    assert zh_lint.check_forbidden("整个块矩阵")
    assert zh_lint.check_forbidden("整个图像块矩阵") == []
    assert zh_lint.check_forbidden("至少快 3 倍") == []
    assert zh_lint.check_forbidden("缓存为原来的 $1/H$，配套包") == []
    # The review sample: 本包 is 配套包 (but 样本包含 and 基本包括 are words),
    # 挂钟 is 墙钟, the Universal Transformer is 通用 Transformer, a kernel 核函数.
    assert zh_lint.check_forbidden("本包的 `softmax`")
    assert zh_lint.check_forbidden("每个样本包含一个序列，基本包括两步") == []
    assert zh_lint.check_forbidden("挂钟秒数")
    assert zh_lint.check_forbidden("ALBERT 和 Universal Transformer 复用整个层")
    assert zh_lint.check_forbidden("通用 Transformer（Universal Transformer）") == []
    assert zh_lint.check_forbidden("分块注意力核中的在线 softmax")
    assert zh_lint.check_forbidden("注意力核函数不改变计算的内容") == []


def test_glossary_terms_are_required():
    msgid = "Weight tying uses one matrix twice."
    assert zh_lint.check_glossary(msgid, "权重绑定把一个矩阵用两次。") == []
    assert zh_lint.check_glossary(msgid, "参数绑定把一个矩阵用两次。")


def test_untranslated_english_is_found():
    msgid = "The cache grows with the sequence."
    assert zh_lint.check_untranslated(msgid, "缓存随序列增长。") == []
    assert zh_lint.check_untranslated(msgid, "缓存 grows with the 序列。")
    assert zh_lint.check_untranslated(msgid, msgid)
    # Code, math, roles and names do not count.
    assert (
        zh_lint.check_untranslated(
            "See `torch.nn.functional.scaled_dot_product_attention`.",
            "见 `torch.nn.functional.scaled_dot_product_attention` 与《Attention Is "
            "All You Need》。",
        )
        == []
    )


def test_quotes_of_the_sources_are_exact():
    seeds = zh_lint._seed_text()
    assert "有助于减少模型的参数数量" in seeds
    assert zh_lint.check_quotes("原文说注意力“有助于减少模型的参数数量”。") == []
    assert zh_lint.check_quotes("原文说注意力“可以减少参数的数量”。")
    # Quotation marks around a term are not a quotation.
    assert zh_lint.check_quotes("原文所说的“共享”") == []


def test_typography():
    assert zh_lint.check_typography("用 `softmax` 计算 3 个值（见上）。") == []
    assert zh_lint.check_typography("用`softmax`计算")
    assert zh_lint.check_typography("误差为 5 %。")
    assert zh_lint.check_typography("是这样,而且")
    assert zh_lint.check_typography("**定义。** 然后")
    assert zh_lint.check_typography("一个例子(见上)")
    # Spacing as rendered: emphasis markers take no room.
    assert zh_lint.check_typography("又把*KV 缓存*缩小")
    assert zh_lint.check_typography("又把 *KV 缓存*缩小") == []
    # A {ref}/{doc} link renders a Chinese title: no space around it.
    assert zh_lint.check_typography("见{ref}`提速 <fast>`一章") == []
    assert zh_lint.check_typography("见 {ref}`提速 <fast>` 一章")


def test_link_texts_name_their_target():
    labels, doc_titles, _ = zh_lint._targets()
    assert doc_titles["fast"] and "glossary" in labels
    title = doc_titles["fast"]
    zh = zh_lint.chinese_title("fast", title)
    assert zh
    msgid = f"See {{doc}}`{title} <fast>`."
    assert zh_lint.check_links(msgid, f"见{{doc}}`{zh} <fast>`。") == []
    assert zh_lint.check_links(msgid, "见{doc}`让它变快 <fast>`。")


# --------------------------------------------------------------------------- catalogs


@pytest.mark.parametrize("path", [_param(p) for p in CATALOGS])
def test_catalog_reads_well(path):
    findings = zh_lint.lint_catalog(path)
    findings += [
        f for f in zh_lint.admonition_findings(CATALOGS) if f.catalog == path.stem
    ]
    assert not findings, f"{len(findings)} finding(s):\n" + "\n".join(
        str(f) for f in findings[:40]
    )


def test_pending_names_existing_catalogs():
    stems = {p.stem for p in CATALOGS} | {
        p.stem for p in (ROOT / "book").glob("*.ipynb")
    }
    assert PENDING <= stems, PENDING - stems


# --------------------------------------------------------------------------- glosses


def _build(src: Path, out: Path, builder: str, language: str) -> str:
    from sphinx.application import Sphinx

    app = Sphinx(
        str(src),
        str(src),
        str(out),
        str(out / ".doctrees"),
        builder,
        confoverrides={"language": language},
        status=None,
        warning=None,
        freshenv=True,
    )
    app.build()
    name = "index.html" if builder == "html" else "index.pot"
    return (out / name).read_text(encoding="utf-8")


def test_english_glosses_are_kept_in_english_and_left_out_of_zh(tmp_path):
    """_ext/zh_edition.py: the en-gloss container of a quotation renders in the
    English build, and neither the Chinese build nor gettext sees it."""
    pytest.importorskip("myst_parser")
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / '_ext')!r})\n"
        "extensions = ['myst_parser', 'zh_edition']\n"
        "myst_enable_extensions = ['colon_fence']\n",
        encoding="utf-8",
    )
    (src / "index.md").write_text(
        "# T\n\n> 参数共享是指共享参数。\n>\n> :::{container} en-gloss\n"
        "> *Sharing means shared parameters.*\n> :::\n\nAfter.\n",
        encoding="utf-8",
    )
    en = _build(src, tmp_path / "en", "html", "en")
    assert "Sharing means shared parameters." in en and "en-gloss" in en
    zh = _build(src, tmp_path / "zh", "html", "zh_CN")
    assert "参数共享是指共享参数。" in zh and "Sharing means" not in zh
    assert "zh_edition.css" in zh and "zh_edition.css" not in en
    pot = _build(src, tmp_path / "pot", "gettext", "en")
    assert "参数共享是指共享参数。" in pot and "Sharing means" not in pot


def test_every_translated_gloss_note_is_gone():
    """The fourteen '（引文原为中文，见上。）' notes: each English gloss they
    translated is marked en-gloss in its notebook (or its catalog is pending)."""
    notes = [
        f
        for path in CATALOGS
        if path.stem not in PENDING
        for f in zh_lint.lint_catalog(path)
        if f.check == "gloss"
    ]
    assert not notes, "\n".join(map(str, notes))
