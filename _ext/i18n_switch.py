"""The two editions of the book (issue 17): a language switch and translated captions.

* Every page gets a link to the same page in the other edition: the English site is
  ``_build/html/X.html``, the Chinese one ``_build/html/zh/X.html`` (written by
  ``python tools/i18n.py build``). The link sits at the top of the article.
* sphinx-external-toc inserts the table of contents (priority 100) after Sphinx's
  translation step (priority 20), so the part captions of ``_toc.yml`` stay English in
  a translated build. This translates them from the root document's catalog, where the
  gettext builder extracts them.
* Theme strings: templates translate through the ``sphinx`` domain, which
  ``locale/<lang>/LC_MESSAGES/sphinx.po`` overrides; sphinx-book-theme's header buttons
  use their own ``booktheme`` domain (its zh_CN catalog has traditional characters), so
  ``booktheme.po`` there is put in front of the theme's catalog. The search box text is
  a theme option, set here for a translated build.
"""

from __future__ import annotations

import gettext
from os import path

from sphinx import addnodes
from sphinx import locale as sphinx_locale
from sphinx.locale import init as init_locale
from sphinx.transforms import SphinxTransform
from sphinx.util.i18n import docname_to_domain

# Where the Chinese edition lives, relative to the English site's root.
ZH_DIR = "zh"


def _is_zh(config) -> bool:
    return bool(config.language) and str(config.language).lower().startswith("zh")


class TranslateTocCaptions(SphinxTransform):
    """Translate the captions of the toctrees sphinx-external-toc inserted."""

    default_priority = 101  # after sphinx_external_toc.events.InsertToctrees (100)

    def apply(self, **kwargs) -> None:
        if not self.config.language or self.config.language == "en":
            return
        toctrees = list(self.document.findall(addnodes.toctree))
        if not any(t.get("caption") for t in toctrees):
            return
        domain = docname_to_domain(self.env.docname, self.config.gettext_compact)
        dirs = [path.join(self.env.srcdir, d) for d in self.config.locale_dirs]
        catalog, has_catalog = init_locale(dirs, self.config.language, domain)
        if not has_catalog:
            return
        for toctree in toctrees:
            caption = toctree.get("caption")
            if caption:
                translated = catalog.gettext(caption)
                toctree["caption"] = translated
                toctree["rawcaption"] = translated


SEARCH_BAR_TEXT = {"zh": "搜索本书……"}


class _Overrides(gettext.NullTranslations):
    """Messages of a project catalog, in front of a theme's own translations."""

    def __init__(self, messages: dict[str, str], fallback) -> None:
        super().__init__()
        self._messages = messages
        if fallback is not None:
            self.add_fallback(fallback)

    def gettext(self, message: str) -> str:
        if self._messages.get(message):
            return self._messages[message]
        return self._fallback.gettext(message) if self._fallback else message


def _theme_translations(app) -> None:
    if not app.config.language or app.config.language == "en":
        return
    from babel.messages.pofile import read_po

    for domain in ("booktheme",):
        for directory in app.config.locale_dirs:
            po = path.join(
                app.srcdir,
                directory,
                app.config.language,
                "LC_MESSAGES",
                f"{domain}.po",
            )
            if not path.isfile(po):
                continue
            with open(po, "rb") as handle:
                catalog = read_po(handle, locale=app.config.language)
            messages = {
                m.id: m.string
                for m in catalog
                if m.id and isinstance(m.id, str) and m.string and not m.fuzzy
            }
            key = ("general", domain)
            sphinx_locale.translators[key] = _Overrides(
                messages, sphinx_locale.translators.get(key)
            )


def _search_bar_text(app, config) -> None:
    language = str(config.language or "en").split("_")[0]
    if language in SEARCH_BAR_TEXT:
        options = dict(config.html_theme_options or {})
        options["search_bar_text"] = SEARCH_BAR_TEXT[language]
        config.html_theme_options = options


def _switch(app, pagename, templatename, context, doctree) -> None:
    if doctree is None or "body" not in context:
        return
    depth = pagename.count("/")
    if _is_zh(app.config):
        href = "../" * (depth + 1) + f"{pagename}.html"
        label, lang, title = "English", "en", "Read this page in English"
    else:
        href = "../" * depth + f"{ZH_DIR}/{pagename}.html"
        label, lang, title = "中文", "zh-CN", "阅读本页的中文版"
    link = (
        f'<p class="i18n-switch" style="text-align:right;margin:0">'
        f'<a class="i18n-switch-link reference external" href="{href}" '
        f'hreflang="{lang}" lang="{lang}" title="{title}">{label}</a></p>\n'
    )
    context["body"] = link + context["body"]


def setup(app):
    app.add_transform(TranslateTocCaptions)
    app.connect("builder-inited", _theme_translations)
    app.connect("config-inited", _search_bar_text)
    app.connect("html-page-context", _switch)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
