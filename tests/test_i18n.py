"""The Chinese edition's catalogs (issue 17): markup survives, msgfmt -c accepts them.

Every translated, non-fuzzy message must keep the markup of its English msgid (math,
code spans, roles and their targets, link targets, footnotes, HTML tags, the number of
bold/italic markers). Coverage per chapter is printed (``pytest -s``) and reported.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("i18n", ROOT / "tools" / "i18n.py")
i18n = importlib.util.module_from_spec(_spec)
sys.modules["i18n"] = i18n
_spec.loader.exec_module(i18n)

pytestmark = pytest.mark.skipif(
    shutil.which("msgfmt") is None, reason="GNU gettext (msgfmt) is not installed"
)


def test_markup_accepts_a_faithful_translation():
    msgid = (
        "The **score** $q^\\top k / \\sqrt{D}$ of `attention` (see "
        "{ref}`the chapter <attention-math>` and {cite}`vaswani2017attention`, "
        "[the code](https://example.org/x.py)[^1])."
    )
    msgstr = (
        "`attention` 的**分数**为 $q^\\top k / \\sqrt{D}$（见"
        "{ref}`该章 <attention-math>` 与 {cite}`vaswani2017attention`，"
        "[代码](https://example.org/x.py)[^1]）。"
    )
    assert i18n.markup_difference(msgid, msgstr) == []


@pytest.mark.parametrize(
    "msgstr, kind",
    [
        ("分数 $q^\\top k / \\sqrt{d}$ 的 `attention`，*强调*。", "math"),
        ("分数 $q^\\top k / \\sqrt{D}$ 的 `注意力`，*强调*。", "code"),
        ("分数 $q^\\top k / \\sqrt{D}$ 的 `attention`，*强调*，*多余*。", "italic"),
        ("分数 $q^\\top k / \\sqrt{D}$ 的 `attention`，*强调。", "italic"),
        ("分数 $q^\\top k / \\sqrt{D}$ 的 `attention`，**强调*。", "bold"),
        ("分数 q^\\top k / \\sqrt{D} 的 `attention`，*强调*。", "math"),
    ],
)
def test_markup_reports_a_broken_translation(msgstr, kind):
    msgid = "The score $q^\\top k / \\sqrt{D}$ of `attention`, *emphasis*."
    problems = i18n.markup_difference(msgid, msgstr)
    assert problems and any(kind in p for p in problems), problems


def test_markup_allows_dropping_an_emphasis():
    # Chinese has no italics (issue 29 item 8): *term* may become plain text.
    msgid = "The *seen* column of `attention`."
    assert i18n.markup_difference(msgid, "`attention` 的“seen”列。") == []


def test_markup_role_targets_and_link_targets():
    msgid = "See {ref}`the section <sec-a>` and [here](b.md)."
    assert i18n.markup_difference(msgid, "见{ref}`该节 <sec-a>`与[此处](b.md)。") == []
    assert i18n.markup_difference(msgid, "见{ref}`该节 <sec-b>`与[此处](b.md)。")
    assert i18n.markup_difference(msgid, "见{ref}`该节 <sec-a>`与[此处](c.md)。")
    assert i18n.markup_difference("{cite}`a2020`", "{cite}`b2020`")


def test_catalogs_pass_msgfmt_and_keep_markup(capsys):
    paths = i18n.catalogs()
    assert paths, "no catalogs under locale/zh_CN/LC_MESSAGES"
    errors, rows = i18n.run_check(paths)
    with capsys.disabled():
        print("\nTranslation coverage (zh_CN):\n" + i18n.coverage_table(rows))
    assert not errors, "\n".join(errors[:40])
    # Every page of the book is translated (the API appendix's docstrings may stay
    # English); a sentence edited in a notebook becomes fuzzy and counts as missing.
    missing = [
        f"{r.document}: {r.total - r.translated} of {r.total} ({r.fuzzy} fuzzy)"
        for r in rows
        if i18n._counted(r) and r.translated < r.total
    ]
    assert not missing, "untranslated messages (translate them):\n" + "\n".join(missing)
    documents = {Path(r.document).name for r in rows}
    chapters = {p.stem for p in (ROOT / "book").glob("*.ipynb")} | {
        p.stem for p in (ROOT / "book").glob("*.md")
    }
    assert chapters <= documents, f"catalogs missing for {chapters - documents}"


def _catalog(path: Path, entries: dict[str, str]) -> None:
    import polib

    po = polib.POFile()
    po.metadata = {
        "Project-Id-Version": "test",
        "Content-Type": "text/plain; charset=UTF-8",
        "Content-Transfer-Encoding": "8bit",
        "Language": "zh_CN",
        "Plural-Forms": "nplurals=1; plural=0;",
    }
    for msgid, msgstr in entries.items():
        po.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
    path.parent.mkdir(parents=True, exist_ok=True)
    po.save(str(path))


def test_merge_keeps_translations_and_marks_changed_sentences_fuzzy(tmp_path):
    import polib

    pots, catalogs = tmp_path / "pot", tmp_path / "zh_CN" / "LC_MESSAGES"
    _catalog(
        catalogs / "book" / "a.po",
        {
            "Attention": "注意力",
            "The kernel has $k$ weights.": "卷积核有 $k$ 个权重。",
            "A sentence that was deleted.": "一个被删除的句子。",
        },
    )
    _catalog(
        pots / "book" / "a.pot",
        {"Attention": "", "The kernel has $k^2$ weights.": "", "New sentence.": ""},
    )
    _catalog(pots / "book" / "b.pot", {"Parameter sharing": ""})
    changed = i18n.merge_catalogs(pots, catalogs)
    assert changed == ["book/a.po", "book/b.po"]
    po = polib.pofile(str(catalogs / "book" / "a.po"))
    entries = {e.msgid: e for e in po if not e.obsolete}
    assert set(entries) == {
        "Attention",
        "The kernel has $k^2$ weights.",
        "New sentence.",
    }
    assert not any(e.obsolete for e in po), "obsolete entries were not dropped"
    assert entries["Attention"].msgstr == "注意力" and not entries["Attention"].fuzzy
    edited = entries["The kernel has $k^2$ weights."]
    assert edited.fuzzy and edited.previous_msgid == "The kernel has $k$ weights."
    assert entries["New sentence."].msgstr == ""
    errors, rows = i18n.run_check(sorted(catalogs.rglob("*.po")))
    assert not errors, errors
    coverage = {r.document: (r.translated, r.fuzzy, r.total) for r in rows}
    assert coverage == {"book/a": (1, 1, 3), "book/b": (0, 0, 1)}


def test_catalogs_match_their_templates():
    """Every template of locale/pot has its catalog with exactly its messages (the
    catalogs were merged after the templates were refreshed)."""
    import polib

    pot_dir = ROOT / "locale" / "pot"
    po_root = ROOT / "locale" / "zh_CN" / "LC_MESSAGES"
    templates = sorted(pot_dir.rglob("*.pot"))
    assert templates, "no templates under locale/pot"
    problems = []
    for pot in templates:
        po = po_root / pot.relative_to(pot_dir).with_suffix(".po")
        if not po.is_file():
            problems.append(f"{po.relative_to(ROOT)} is missing")
            continue
        expected = {e.msgid for e in polib.pofile(str(pot))}
        found = {e.msgid for e in polib.pofile(str(po)) if not e.obsolete}
        if expected != found:
            problems.append(
                f"{po.relative_to(ROOT)}: {len(expected - found)} messages missing, "
                f"{len(found - expected)} extra"
            )
    assert not problems, "run `make translations`:\n" + "\n".join(problems)


def test_templates_match_the_notebooks(request):
    """A fresh gettext build of the English book gives the stored templates: nobody
    edited a notebook without `make translations` (the zh edition cannot drift
    silently). Needs a build, so it runs with --build-book (`make test`)."""
    if not request.config.getoption("--build-book"):
        pytest.skip("runs the gettext build: pytest --build-book (make test)")
    stale = i18n.stale_templates(i18n.extract())
    assert not stale, (
        "the English text changed since the catalogs were updated; run "
        f"`make translations` and translate what became fuzzy: {stale}"
    )
