"""Checks of the Chinese edition's catalogs (issue 29): what an editor would catch.

``tools/i18n.py check`` proves that a translation keeps its markup; this module
reads the Chinese itself. Each check would have caught a problem of the first edit pass:

* ``emphasis``: msgid and msgstr are parsed with the parser MyST uses (markdown-it-py,
  dollarmath, myst roles): the same number of strong nodes, no more em nodes (an
  English term's italics may be dropped: Chinese has none), and no literal ``*``
  left in the rendered text (CommonMark does not open ``**`` between two punctuation
  marks the way a Chinese writer expects: ``，**“词”**是`` renders the stars).
* ``glossary``: where a term of ``book/glossary.md`` occurs in the English, its Chinese
  occurs in the translation; ``forbidden``: renderings the edit pass replaced.
* ``untranslated``: three or more English words in a row outside code, math, roles and
  links (names allow-listed); a msgstr equal to its msgid.
* ``quote``: Chinese text in quotation marks in a message that cites a source document
  is a substring of that source (``book/_data/seeds/``, whitespace ignored).
* ``link-text``: ``{ref}`text <label>``` / ``{doc}`text <doc>``` whose English text is
  the target's title has the target's Chinese title as text; ``admonition``: one
  rendering per admonition title across the book.
* ``typography``: a space between CJK and Latin letters, digits, code and math (the rule
  the catalogs follow), none between CJK and a ``{ref}``/``{doc}`` link (it renders a
  Chinese title), full-width punctuation next to CJK, no space before ``%``, no space
  after a closing ``**`` that follows Chinese punctuation, full-width brackets around
  Chinese text, a colon where the English introduces what follows.
* ``gloss``: an English gloss of a Chinese quotation is marked ``en-gloss`` in its
  notebook and left out of the Chinese build (``_ext/zh_edition.py``), not translated
  as a note.

Usage::

    python tools/zh_lint.py                 # every catalog
    python tools/zh_lint.py path/to/x.po    # some
    python tools/zh_lint.py --counts        # findings per catalog and check

Each finding prints as ``catalog:line msgid-excerpt -> problem``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CATALOGS = ROOT / "locale" / "zh_CN" / "LC_MESSAGES" / "book"
GLOSSARY = BOOK / "glossary.md"
# The two source documents (Chinese blog articles), verbatim: the same files as
# shared/seeds/ of the project; see book/_data/seeds/README.md.
SEEDS = BOOK / "_data" / "seeds"

CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_RE = re.compile(f"[{CJK}]")
# Full-width punctuation of Chinese text.
ZH_PUNCT = "，。、；：？！（）“”‘’《》「」『』【】—…·"


@dataclass(frozen=True)
class Finding:
    catalog: str
    line: int
    msgid: str
    check: str
    problem: str

    def __str__(self) -> str:
        excerpt = self.msgid[:50].replace("\n", " ")
        return (
            f"{self.catalog}:{self.line} {excerpt!r} -> [{self.check}] {self.problem}"
        )


# --------------------------------------------------------------------------- parsing


@lru_cache(maxsize=1)
def _parser():
    from markdown_it import MarkdownIt
    from mdit_py_plugins.dollarmath import dollarmath_plugin
    from mdit_py_plugins.myst_role import myst_role_plugin

    return (
        MarkdownIt("commonmark")
        .use(dollarmath_plugin, double_inline=True)
        .use(myst_role_plugin)
    )


@dataclass
class Parsed:
    strong: int
    em: int
    text: list[str]  # rendered prose outside code, math, roles and links
    roles: list[tuple[str, str]]  # (name, content)


def parse(message: str) -> Parsed:
    """A message as MyST reads it."""
    tokens = _parser().parse(message)
    strong = em = 0
    text: list[str] = []
    roles: list[tuple[str, str]] = []
    for block in tokens:
        if block.type in ("fence", "code_block", "math_block", "html_block"):
            continue
        in_link = 0
        for tok in block.children or []:
            if tok.type == "strong_open":
                strong += 1
            elif tok.type == "em_open":
                em += 1
            elif tok.type == "link_open":
                in_link += 1
            elif tok.type == "link_close":
                in_link -= 1
            elif tok.type == "myst_role":
                roles.append((tok.meta.get("name", ""), tok.content))
            elif tok.type == "text" and not in_link:
                text.append(tok.content)
            elif tok.type in ("softbreak", "hardbreak"):
                text.append(" ")
    return Parsed(strong, em, text, roles)


_LINK = re.compile(r"\[([^\]]*)\]\([^)\s]*\)")
_TITLE_ROLE = re.compile(r"\{(?:ref|doc|numref|term)\}`[^`]*`")
_INLINE = re.compile(
    r"(?:\{[\w:.+-]+\})?(`+).+?\1"  # roles and code spans
    r"|(?<!\\)\$\$.+?(?<!\\)\$\$|(?<![\\$])\$(?!\$).+?(?<![\\$])\$"  # math
    r"|\]\([^)]*\)"  # link targets
    r"|https?://\S+"
    r"|<[^<>]+>",
    re.S,
)
PLACEHOLDER = "\ue000"
# A {ref}/{doc} link renders the Chinese title of its target: Chinese text.
TITLE = "\ue001"


def masked(message: str) -> str:
    """The message with links replaced by their text, {ref}/{doc} roles by TITLE, and
    code, other roles, math and URLs by PLACEHOLDER (which counts as Latin)."""
    message = _LINK.sub(r"\1", message)
    message = _TITLE_ROLE.sub(TITLE, message)
    return _INLINE.sub(PLACEHOLDER, message)


# --------------------------------------------------------------------------- glossary


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _variants(cell: str) -> list[str]:
    """``注意力（机制）`` -> [注意力（机制）, 注意力] (``a / b``: by the caller)."""
    out = [cell.strip()]
    bare = re.sub(r"\s*[（(][^）)]*[）)]", "", cell).strip()
    if bare and bare != out[0]:
        out.append(bare)
    return out


def glossary_pairs() -> list[tuple[str, list[str]]]:
    """(English term, accepted Chinese renderings) from the two-column tables of the
    glossary (``English | 中文``); ``a / b`` cells pair term by term."""
    pairs = []
    for line in GLOSSARY.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = _cells(line)
        if len(cells) != 2 or set(cells[0]) <= set("-: ") or cells[0] == "English":
            continue
        en = [e.strip() for e in cells[0].split(" / ")]
        zh = [z.strip() for z in cells[1].split(" / ")]
        if len(en) != len(zh):
            zh = [cells[1]] * len(en)
        for e, z in zip(en, zh):
            e = re.sub(r"\s*\([^)]*\)", "", e).strip()
            if e:
                pairs.append((e, _variants(z)))
    return pairs


# English terms not enforced, each with the reason (a term must have one meaning in the
# book's English for its Chinese to be required wherever it occurs).
GLOSSARY_SKIP = {
    # Several meanings, told apart by the text: GPU kernel 核函数, convolution kernel
    # 卷积核, kernel regression 核, Keras's kernel weights.
    "kernel": "three meanings",
    "kernels": "GPU/CPU kernels (核函数), Keras's kernel weights, convolution kernels",
    "embedding": "also 'embedding dimension' and the verb; 嵌入 mostly, not always",
    "the book": "also 全书 / 这本书, and quoted English (the API docstrings' line)",
    "solution": "an exercise's solution (解答) or the solution of a task (解法)",
}

# Other accepted renderings of a glossary term (a context where the table's word reads
# badly); keep this short.
GLOSSARY_ALSO = {
    "equivariance": ["等变"],
    "overfitting": ["过拟合"],
    "convolution": ["卷积"],
    "pooling": ["池化"],
    "self-attention": ["自注意力"],
    "query": ["查询", "Q"],
    "key": ["键", "K"],
    "value": ["值", "V"],
    "attention": ["注意力"],
    "source 1": ["原文一"],
    "source 2": ["原文二"],
    "errata": ["勘误"],
    "batch": ["批"],
    "score": [
        "打分",
        "得分",
    ],  # the verb: 为每个词打分  # 一批样本 reads better than 一个批量的样本
}


# Renderings the edit pass of issue 29 replaced: (pattern, what to write instead).
FORBIDDEN: list[tuple[re.Pattern, str]] = [
    (re.compile("本书包"), "the companion package is 配套包"),
    (re.compile("(?<!图像)块矩阵"), "a matrix of image patches is 图像块矩阵"),
    (
        re.compile("(?<![至多])[少小][^，。；：！？、\\n]{0,12}?倍"),
        "'少/小 N 倍' is ambiguous: 为原来的 1/N, 相差 N 倍, 成倍减少",
    ),
    (re.compile("按倍数"), "'按倍数减少' -> 成倍减少 / 为原来的 1/N"),
    (re.compile("一致到"), "'一致到 10^-10' -> 误差在 10^-10 以内"),
    (re.compile("键/值缓存|键值缓存"), "KV cache is KV 缓存"),
    (re.compile("批次"), "batch is 批量"),
    (re.compile("笔记本(?!电脑)"), "notebook stays notebook (笔记本电脑 is a laptop)"),
    (re.compile("滑动的最大值|滑动最大值"), "running max is 当前的最大值"),
    (
        re.compile("屏蔽|遮蔽|遮盖|遮挡|遮掉|遮住|掩盖|掩掉|被掩码"),
        "masked (verb) is 掩蔽; a mask is 掩码",
    ),
    (re.compile("自动求导|自动梯度"), "autograd is 自动微分"),
    (re.compile("一热|单热"), "one-hot is 独热"),
    (re.compile("GPU\\s*内核|内核函数"), "GPU kernels are 核函数"),
    (re.compile("让它变快"), "the chapter is 提速"),
    (re.compile("常见问题一章"), "the chapter is 常见问题解答"),
    (re.compile("超越原文"), "beyond the sources is 超出原文 (as in the preface)"),
    (re.compile("会计数"), "'会计数的' reads 会计: 带计数的"),
    (re.compile("原文一个也没有"), "reads 原文一: 原文对这两点只字未提"),
    (
        re.compile("权重绑定（即权重共享）"),
        "weight tying is not weight sharing in general",
    ),
    (re.compile("全连接\\s*MLP"), "opposite MoE a feed-forward block is 稠密"),
    (re.compile("密集(?:模型|MLP|前馈|层)"), "dense (vs MoE) is 稠密"),
    # Found by the 150-message review sample of issue 29 (seed 29).
    (re.compile("(?<![基样文])本包(?![括含])"), "the companion package is 配套包"),
    (re.compile("挂钟"), "wall-clock time is 墙钟时间 (as in the other catalogs)"),
    (
        re.compile("(?<!（)Universal Transformer"),
        "the Universal Transformer is 通用 Transformer (English only in parentheses)",
    ),
    (re.compile("注意力核(?!函数)"), "compiled kernels are 核函数: 分块核函数"),
]


# --------------------------------------------------------------------------- names

# English names that may stand in Chinese text as they are (models, papers, APIs,
# libraries). Matched case-insensitively as whole phrases.
NAMES = [
    r"Attention Is All You Need",
    r"Dive into Deep Learning",
    r"Nadaraya[- ]Watson",
    r"Hugging Face(?: \w+)?",
    r"Universal Transformers?",
    r"Vision Transformers?",
    r"Flash ?Attention(?:-\d)?",
    r"Multi[- ]Head Attention",
    r"Google Colab",
    r"Jupyter (?:Book|Lab|Notebook)(?: \d)?",
    r"Noto Sans CJK(?: SC)?",
    r"Llama(?:-\d)?(?:-\d+B)?",
    r"Mixtral \d+x\d+B",
    r"GPT-\d(?: \w+)?",
    r"Tang poetry",
    r"Tiny Shakespeare",
    r"Read the Docs",
    r"Apple Silicon",
    r"Mixture of Experts",
    r"Sparsely[- ]Gated",
    r"Long Range Arena",
    r"image to columns",  # im2col's expansion
    r"Network in Network",  # a paper title
    r"mi hun roti tu kilo",  # the translation chapter's made-up language
    r"torch SDPA",
    r"dog bites man|man bites dog",  # the tokens of the positions chapter's code
]
_NAMES_RE = re.compile("|".join(f"(?:{n})" for n in NAMES), re.I)
_WORD = r"[A-Za-z][A-Za-z'’]*(?:-[A-Za-z0-9]+)*"
_RUN = re.compile(rf"{_WORD}(?:[ ]+{_WORD}){{2,}}")
# A run of English words only counts when one of them is an ordinary lower-case word
# (a run of capitalised names, e.g. "Multi Head Attention", is a name).
_LOWER = re.compile(r"\b[a-z]{2,}\b")


# --------------------------------------------------------------------------- titles


def _book_sources() -> dict[str, list[str]]:
    """The Markdown of every document, by docname (``attention_math``)."""
    docs: dict[str, list[str]] = {}
    for path in sorted(BOOK.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        docs[path.stem] = [
            "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
        ]
    for path in sorted(BOOK.glob("*.md")):
        docs.setdefault(path.stem, []).append(path.read_text(encoding="utf-8"))
    return docs


@lru_cache(maxsize=1)
def _targets() -> tuple[dict[str, tuple[str, str]], dict[str, str], set[str]]:
    """label -> (docname, English title); docname -> English title; admonitions."""
    labels: dict[str, tuple[str, str]] = {}
    doc_titles: dict[str, str] = {}
    admonitions: set[str] = set()
    for doc, cells in _book_sources().items():
        for text in cells:
            lines = text.splitlines()
            for i, line in enumerate(lines):
                m = re.match(r"^#+\s+(.*\S)\s*$", line)
                if m and doc not in doc_titles and line.startswith("# "):
                    doc_titles[doc] = m.group(1)
                m = re.match(r"^\(([\w.:-]+)\)=\s*$", line)
                if m:
                    for nxt in lines[i + 1 :]:
                        if nxt.strip():
                            h = re.match(r"^#+\s+(.*\S)\s*$", nxt)
                            if h:
                                labels[m.group(1)] = (doc, h.group(1))
                            break
                m = re.match(r"^(?::{3,}|`{3,})\{admonition\}\s*(.*\S)", line)
                if m:
                    admonitions.add(m.group(1))
    return labels, doc_titles, admonitions


@lru_cache(maxsize=None)
def _catalog(path: Path):
    import polib

    return polib.pofile(str(path))


@lru_cache(maxsize=None)
def _translations(doc: str) -> dict[str, str]:
    path = CATALOGS / f"{doc}.po"
    if not path.exists():
        return {}
    return {
        e.msgid: e.msgstr
        for e in _catalog(path)
        if e.msgstr and not e.fuzzy and not e.obsolete
    }


def chinese_title(doc: str, english: str) -> str | None:
    return _translations(doc).get(english)


@lru_cache(maxsize=1)
def _seed_text() -> str:
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(SEEDS.glob("*.txt")))
    return _normalise_quote(text)


def _normalise_quote(text: str) -> str:
    text = re.sub(r"\s+", "", text)
    return text.replace("“", "").replace("”", "").replace('"', "")


# --------------------------------------------------------------------------- checks


def check_emphasis(msgid: str, msgstr: str) -> list[str]:
    a, b = parse(msgid), parse(msgstr)
    problems = []
    # Bold must survive; italics may be dropped (Chinese has none: issue 29 item 8),
    # never added.
    if a.strong != b.strong or b.em > a.em:
        problems.append(
            f"strong/em nodes: {a.strong}/{a.em} in msgid, {b.strong}/{b.em} in msgstr"
        )
    stars_a = sum(t.count("*") for t in a.text)
    stars_b = sum(t.count("*") for t in b.text)
    if stars_b > stars_a:
        problems.append(f"{stars_b - stars_a} literal '*' left in the rendered msgstr")
    return problems


def _prose(message: str) -> str:
    return " ".join(parse(message).text)


def check_glossary(msgid: str, msgstr: str) -> list[str]:
    english = re.sub(r"\s+", " ", _prose(msgid)).lower()
    problems = []
    for term, chinese in glossary_pairs():
        if term.lower() in GLOSSARY_SKIP:
            continue
        words = re.escape(term.lower())
        if not re.search(rf"(?<![\w-]){words}(?:s|es)?(?![\w-])", english):
            continue
        accepted = chinese + GLOSSARY_ALSO.get(term.lower(), [])
        if not any(z.lower() in msgstr.lower() for z in accepted):
            problems.append(f"glossary: {term!r} is {' / '.join(chinese)}")
    return problems


def check_forbidden(msgstr: str) -> list[str]:
    text = masked(msgstr)
    return [
        f"forbidden {m.group(0)!r}: {why}"
        for pattern, why in FORBIDDEN
        for m in [pattern.search(text)]
        if m
    ]


def check_untranslated(msgid: str, msgstr: str) -> list[str]:
    problems = []
    if "\\" in msgid and not CJK_RE.search(msgstr):
        return problems  # a formula (a math directive's content)
    if msgstr == msgid and _LOWER.search(_NAMES_RE.sub(" ", _prose(msgid))):
        if re.search(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", _prose(msgid)):
            problems.append("msgstr equals msgid")
            return problems
    prose = _NAMES_RE.sub(PLACEHOLDER, " ".join(parse(msgstr).text))
    for m in _RUN.finditer(prose):
        if _LOWER.search(m.group(0)):
            problems.append(f"English left: {m.group(0)!r}")
    return problems


_QUOTED = re.compile(r"“([^“”]+)”")


_SOURCE_QUESTION = re.compile(r"^(.*?)（原文[一二]，问题 \d+）")


def check_quotes(msgstr: str) -> list[str]:
    if "原文" not in msgstr:
        return []
    problems = []
    seeds = _seed_text()
    # A heading that names a source's question quotes the question.
    m = _SOURCE_QUESTION.match(msgstr)
    if m and _normalise_quote(m.group(1)) not in seeds:
        problems.append(f"not the source's question: {m.group(1)!r}")
    for m in _QUOTED.finditer(msgstr):
        quote = m.group(1)
        if len(CJK_RE.findall(quote)) < 4:
            continue  # a word, not a quotation
        for part in re.split(r"……|…|\.\.\.", quote):
            part = _normalise_quote(re.sub(r"\*\*|`", "", part))
            if len(CJK_RE.findall(part)) >= 4 and part not in seeds:
                problems.append(f"quote not in the sources: “{m.group(1)[:40]}”")
                break
    return problems


_LINK_ROLE = re.compile(r"\{(ref|doc)\}`([^`<]*?)\s*<([^<>`]+)>`")


_MD_DOC_LINK = re.compile(r"\[([^\]]+)\]\(([\w-]+)\.(?:ipynb|md)\)")


def _link_texts(message: str) -> list[tuple[str, str, str]]:
    """(role, text, target) of each {ref}/{doc} link with a text and each Markdown
    link to a chapter (as role ``doc``)."""
    return [
        (m.group(1), m.group(2).strip(), m.group(3))
        for m in _LINK_ROLE.finditer(message)
    ] + [
        ("doc", m.group(1).strip(), m.group(2)) for m in _MD_DOC_LINK.finditer(message)
    ]


def _target_title(role: str, target: str) -> tuple[str, str] | None:
    labels, doc_titles, _ = _targets()
    if role == "ref":
        return labels.get(target)
    doc = target.split("/")[-1].removesuffix(".ipynb").removesuffix(".md")
    return (doc, doc_titles[doc]) if doc in doc_titles else None


def _same_title(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        s = re.sub(r"^(the|a|an)\s+", "", s.strip().lower())
        return re.sub(r"[\s*`.:]+", " ", s).strip()

    return norm(a) == norm(b)


_PAREN_END = re.compile(r"\s*\([^()]*\)\s*$")
_ZH_PAREN_END = re.compile(r"\s*（[^（）]*）\s*$")

# Chapters whose short name is not their title before the colon: (English, Chinese).
SHORT_NAMES = {"faq": ("FAQ", "常见问题解答")}


def check_links(msgid: str, msgstr: str) -> list[str]:
    problems = []
    english = {target: text for _, text, target in _link_texts(msgid)}
    for role, text, target in _link_texts(msgstr):
        found = _target_title(role, target)
        if not found:
            continue
        doc, title = found
        zh = chinese_title(doc, title)
        en_text = english.get(target, "")
        if not zh:
            continue
        if _same_title(en_text, title) and text != zh:
            problems.append(f"link text {text!r} for {target}: the title is {zh!r}")
        elif _same_title(en_text, _PAREN_END.sub("", title)) and text != (
            short := _ZH_PAREN_END.sub("", zh)
        ):
            # "How does ...? (source 2, question 2)" linked without its parenthesis.
            problems.append(f"link text {text!r} for {target}: the title is {short!r}")
        elif role == "doc" or _targets()[1].get(doc) == title:
            # A chapter's short name: its title before the colon, one per chapter.
            short_en, short_zh = SHORT_NAMES.get(
                doc, (title.split(":")[0], zh.split("：")[0])
            )
            if _same_title(en_text, short_en) and text != short_zh:
                problems.append(
                    f"link text {text!r} for {target}: the chapter is {short_zh!r}"
                )
    return problems


def check_colon(msgid: str, msgstr: str) -> list[str]:
    """A sentence that introduces what follows (a code cell, a list, a formula) ends
    with a colon in both languages."""
    if msgid.rstrip().endswith(":") and not re.search(r"[：:]\s*$", msgstr):
        return ["the English ends with ':' (what follows is introduced); add '：'"]
    return []


def check_typography(msgstr: str) -> list[str]:
    text = masked(msgstr)
    # A quotation of a source document keeps the source's own spacing.
    seeds = _seed_text()
    text = _QUOTED.sub(
        lambda m: "“”" if _normalise_quote(m.group(1)) in seeds else m.group(0), text
    )
    problems = []
    latin = f"A-Za-z0-9{PLACEHOLDER}"
    shown = re.sub(r"\*+", "", text)  # as rendered: emphasis markers take no space
    m = re.search(f"[{CJK}][{latin}]|[{latin}][{CJK}]", shown)
    if m:
        problems.append(f"no space between CJK and Latin/digits/code: {m.group(0)!r}")
    m = re.search(f"[{CJK}][,;:?!]|[,;:?!][{CJK}]|[{CJK}]\\.(?!\\.)(?=\\s|$)", text)
    if m:
        problems.append(f"half-width punctuation next to CJK: {m.group(0)!r}")
    m = re.search(f"[{CJK}] {TITLE}|{TITLE} [{CJK}]", text)
    if m:
        problems.append(
            "a space between CJK and a {ref}/{doc} link (it renders Chinese)"
        )
    m = re.search(r"\d\s+%", text)
    if m:
        problems.append(f"space before %: {m.group(0)!r}")
    m = re.search(f"[{ZH_PUNCT}]\\*\\*[ \\t]+(?=[{CJK}{ZH_PUNCT}])", text)
    if m:
        problems.append(
            f"space after a closing ** after Chinese punctuation: {m.group(0)!r}"
        )
    m = re.search(f"\\(([^()]*[{CJK}][^()]*)\\)|[{CJK}]\\(|\\)[{CJK}]", text)
    if m:
        problems.append(f"half-width brackets around Chinese text: {m.group(0)!r}")
    m = re.search(f"[{CJK}]\\s+[，。、；：？！）」』】]|[（「『【]\\s+[{CJK}]", text)
    if m:
        problems.append(f"space next to full-width punctuation: {m.group(0)!r}")
    return problems


# Messages a check may not judge, by (catalog stem, msgid start, check) with the reason.
ALLOW: list[tuple[str, str, str, str]] = [
    # (catalog, msgid prefix, check, why)
    (
        "api",
        "This appendix is generated from the docstrings",
        "untranslated",
        "quotes the docstrings' own English line 'Explained in the book chapter'",
    ),
]


def _allowed(stem: str, msgid: str, check: str) -> bool:
    return any(stem == c and msgid.startswith(p) and check == k for c, p, k, _ in ALLOW)


@lru_cache(maxsize=1)
def bilingual_cells() -> set[str]:
    """The cells of every table of the book that has Chinese in it (the glossary, the
    preface's table of the sources' terms): their English column is meant to stay
    English in the Chinese edition."""
    cells: set[str] = set()
    for texts in _book_sources().values():
        for text in texts:
            table: list[str] = []
            for line in [*text.splitlines(), ""]:
                if line.lstrip().startswith("|"):
                    table.append(line)
                    continue
                if table and any(CJK_RE.search(row) for row in table):
                    for row in table:
                        cells.update(c for c in _cells(row) if c)
                table = []
    return cells


@lru_cache(maxsize=1)
def gloss_paragraphs() -> set[str]:
    """The English glosses marked ``en-gloss`` in the notebooks (whitespace
    normalised): neither the zh build nor gettext keeps them (_ext/zh_edition.py), so
    their entries leave the catalogs at the next ``make translations``."""
    found = set()
    fence = re.compile(r"^(?:>\s*)?:::\{container\} en-gloss\s*$")
    for cells in _book_sources().values():
        for text in cells:
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if fence.match(line):
                    body = []
                    for nxt in lines[i + 1 :]:
                        nxt = re.sub(r"^>\s?", "", nxt)
                        if nxt.strip() == ":::":
                            break
                        body.append(nxt)
                    found.add(" ".join(" ".join(body).split()))
    return found


GLOSS_NOTE = "引文原为中文"


def lint_catalog(path: Path) -> list[Finding]:
    """Every finding of every check in one catalog."""
    path = Path(path)
    stem = path.stem
    findings: list[Finding] = []
    for entry in _catalog(path):
        if entry.obsolete or entry.fuzzy or not entry.msgstr or not entry.msgid:
            continue
        msgid, msgstr = entry.msgid, entry.msgstr
        if " ".join(msgid.split()) in gloss_paragraphs():
            continue  # not extracted any more: leaves at the next make translations
        if GLOSS_NOTE in msgstr:
            findings.append(
                Finding(
                    stem,
                    entry.linenum,
                    msgid,
                    "gloss",
                    "an English gloss of a Chinese quote: mark it en-gloss in the "
                    "notebook (the zh build drops it) instead of translating it",
                )
            )
            continue
        chinese = bool(CJK_RE.search(msgstr))
        quoting = msgstr == msgid and chinese  # a source's sentence, quoted as is
        checks: dict[str, list[str]] = {
            "emphasis": check_emphasis(msgid, msgstr),
            "forbidden": check_forbidden(msgstr),
            "typography": []
            if quoting
            else check_typography(msgstr) + check_colon(msgid, msgstr),
            "quote": check_quotes(msgstr),
            "link-text": check_links(msgid, msgstr),
        }
        if msgid not in bilingual_cells():
            checks["untranslated"] = check_untranslated(msgid, msgstr)
            if chinese:
                checks["glossary"] = check_glossary(msgid, msgstr)
        for check, problems in checks.items():
            if problems and _allowed(stem, msgid, check):
                continue
            for problem in problems:
                findings.append(Finding(stem, entry.linenum, msgid, check, problem))
    return findings


# The agreed rendering of an admonition title (issue 29 item 4: a title must not
# contradict its first sentence; "Follows the sources" boxes also open with "Beyond the
# sources:" or "Neither source ...", so the title says what the box is, a comparison
# with the sources).
ADMONITION_TITLES = {
    "Follows the sources": "原文对照",
    "Beyond the sources": "超出原文",
    "Solution": "解答",
    "Solutions": "解答",
}


def admonition_findings(paths: list[Path]) -> list[Finding]:
    """Each admonition title has one rendering across the catalogs (the agreed one
    where ADMONITION_TITLES names it)."""
    _, _, titles = _targets()
    seen: dict[str, dict[str, list[tuple[str, int]]]] = defaultdict(dict)
    for path in paths:
        for entry in _catalog(Path(path)):
            if entry.msgid in titles and entry.msgstr and not entry.fuzzy:
                seen[entry.msgid].setdefault(entry.msgstr, []).append(
                    (Path(path).stem, entry.linenum)
                )
    findings = []
    for title, renderings in seen.items():
        agreed = ADMONITION_TITLES.get(title)
        if len(renderings) > 1 or (agreed and agreed not in renderings):
            common = agreed or max(renderings, key=lambda r: len(renderings[r]))
            for zh, places in renderings.items():
                if zh != common:
                    for stem, line in places:
                        findings.append(
                            Finding(
                                stem,
                                line,
                                title,
                                "admonition",
                                f"{zh!r}; the agreed rendering is {common!r}",
                            )
                        )
    return findings


def all_catalogs() -> list[Path]:
    return sorted(CATALOGS.glob("*.po"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="catalogs (default: all of book/)")
    parser.add_argument("--counts", action="store_true", help="counts only")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.files] or all_catalogs()
    findings = [f for p in paths for f in lint_catalog(p)]
    findings += admonition_findings(all_catalogs())
    findings = [f for f in findings if f.catalog in {Path(p).stem for p in paths}]
    if args.counts:
        table = Counter((f.catalog, f.check) for f in findings)
        per = defaultdict(dict)
        for (cat, check), n in table.items():
            per[cat][check] = n
        for cat in sorted(per):
            total = sum(per[cat].values())
            sys.stdout.write(f"{cat}: {total} {dict(sorted(per[cat].items()))}\n")
    else:
        for f in findings:
            sys.stdout.write(f"{f}\n")
    sys.stdout.write(f"{len(findings)} finding(s)\n")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
