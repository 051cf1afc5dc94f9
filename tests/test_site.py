"""The book builds with zero warnings, and the built site needs no network.

With ``--build-book`` (``make test`` passes it) the first test builds the book with
``-W -n --keep-going``: a warning, a broken cross-reference or a notebook that raised
fails the build. The other tests read the built HTML: every page must load its scripts,
stylesheets, fonts and images from the site itself (MathJax included), and every chapter
of the table of contents must be in the sidebar.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


class _Resources(HTMLParser):
    """Collects every URL a browser loads while rendering a page (not plain links)."""

    LOADING = {
        ("script", "src"),
        ("img", "src"),
        ("iframe", "src"),
        ("source", "src"),
        ("video", "src"),
        ("audio", "src"),
        ("embed", "src"),
        ("object", "data"),
    }
    LOADING_LINK_RELS = {
        "stylesheet",
        "preload",
        "icon",
        "shortcut",
        "modulepreload",
        "prefetch",
        "manifest",
        "apple-touch-icon",
    }

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for t, attr in self.LOADING:
            if tag == t and a.get(attr):
                self.urls.append(a[attr])
        if tag == "img" and a.get("srcset"):
            self.urls += [
                part.split()[0] for part in a["srcset"].split(",") if part.strip()
            ]
        if tag == "link" and a.get("href"):
            rels = set((a.get("rel") or "").lower().split())
            (self.urls if rels & self.LOADING_LINK_RELS else self.links).append(
                a["href"]
            )
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if a.get("style"):
            self.urls += re.findall(r"url\(\s*['\"]?([^'\")]+)", a["style"])


def _is_external(url: str) -> bool:
    parsed = urlparse(url)
    return bool(parsed.netloc) or parsed.scheme not in ("", "data", "file", "blob")


def _pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)


def test_book_builds(site):
    """The build (with --build-book) had no warning; the site opens to the preface."""
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "preface.html" in index, "index.html does not lead to the preface"


def test_no_page_loads_anything_from_another_host(site):
    offenders = []
    for page in _pages(site):
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        offenders += [
            f"{page.relative_to(site)}: {url}"
            for url in parser.urls
            if _is_external(url)
        ]
        missing = [
            u
            for u in parser.urls
            if not _is_external(u) and not (page.parent / urlparse(u).path).exists()
        ]
        offenders += [
            f"{page.relative_to(site)}: missing local file {u}" for u in missing
        ]
    for css in site.rglob("*.css"):
        for url in re.findall(
            r"url\(\s*['\"]?([^'\")]+)",
            css.read_text(encoding="utf-8", errors="replace"),
        ):
            if _is_external(url):
                offenders.append(f"{css.relative_to(site)}: {url}")
        for url in re.findall(
            r"@import\s+(?:url\()?['\"]?([^'\");]+)",
            css.read_text(encoding="utf-8", errors="replace"),
        ):
            if _is_external(url):
                offenders.append(f"{css.relative_to(site)}: @import {url}")
    assert not offenders, "resources from other hosts or missing:\n" + "\n".join(
        offenders[:50]
    )


def test_mathjax_is_served_locally(site):
    pages_with_math = []
    for page in _pages(site):
        html = page.read_text(encoding="utf-8")
        if 'class="math' in html or "\\(" in html:
            pages_with_math.append(page)
            scripts = re.findall(
                r'<script[^>]+src="([^"]*mathjax[^"]*)"', html, flags=re.I
            )
            assert scripts, f"{page.name} has math but loads no MathJax"
            for src in scripts:
                assert not _is_external(src), f"{page.name} loads MathJax from {src}"
                assert (page.parent / src.split("?")[0]).is_file(), (
                    f"{page.name}: {src} is not in the site"
                )
    assert pages_with_math, "no page with math found: the check would prove nothing"
    assert (
        site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    ).is_dir(), "MathJax's fonts were not copied into the site"


def test_every_chapter_is_in_the_sidebar(site):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    preface = (site / f"{toc['root']}.html").read_text(encoding="utf-8")
    start = preface.find("bd-docs-nav")
    assert start >= 0, "no sidebar (bd-docs-nav) in the preface"
    nav = preface[start:]
    missing = [
        f
        for f in files
        if f'href="{Path(f).name}.html"' not in nav and f'href="{f}.html"' not in nav
    ]
    assert not missing, f"chapters missing from the sidebar of the preface: {missing}"
    for f in files:
        assert (site / f"{f}.html").is_file(), f"{f}.html was not built"


# The Chinese edition (issue 17): built by `tools/i18n.py build` into <site>/zh.


def _zh_site(site: Path) -> Path:
    zh = site / "zh"
    if not (zh / "index.html").exists():
        pytest.skip("no Chinese edition in _build/html/zh: run `make book`")
    return zh


def _switch_links(page: Path) -> list[str]:
    return re.findall(
        r'<a class="i18n-switch-link[^"]*" href="([^"]+)"',
        page.read_text(encoding="utf-8"),
    )


def test_language_switch_links_resolve_both_ways(site):
    zh = _zh_site(site)
    checked = 0
    for edition in (site, zh):
        for page in _pages(edition):
            if edition is site and zh in page.parents:
                continue
            if 'http-equiv="refresh"' in page.read_text(encoding="utf-8").lower()[:500]:
                continue
            links = _switch_links(page)
            if page.name in ("search.html", "genindex.html", "py-modindex.html"):
                continue
            assert len(links) == 1, f"{page.relative_to(site)}: switch links {links}"
            target = (page.parent / links[0]).resolve()
            other = zh if edition is site else site
            relative = page.relative_to(edition)
            assert target == (other / relative).resolve(), (
                f"{page.relative_to(site)} switches to {links[0]}, not its twin"
            )
            assert target.is_file(), f"{page.relative_to(site)}: {links[0]} missing"
            checked += 1
    assert checked >= 2 * 20, f"only {checked} pages carry the language switch"


def test_zh_search_index_has_chinese_words(site):
    zh = _zh_site(site)
    text = (zh / "searchindex.js").read_text(encoding="utf-8")
    index = json.loads(text[text.index("(") + 1 : text.rindex(")")])
    for word in ("注意力", "参数", "共享"):
        assert word in index["terms"], f"{word!r} is not in the zh search index"
    html = (zh / "book" / "concepts.html").read_text(encoding="utf-8")
    assert '<html lang="zh-CN"' in html


def test_zh_part_captions_are_translated(site):
    zh = _zh_site(site)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    preface = (zh / f"{toc['root']}.html").read_text(encoding="utf-8")
    captions = re.findall(r'caption-text">([^<]*)<', preface)
    assert len(captions) == len(toc["parts"]), captions
    english = [p["caption"] for p in toc["parts"] if p["caption"] in captions]
    assert not english, f"part captions left English in the zh sidebar: {english}"
