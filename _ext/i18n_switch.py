"""The two editions of the book (issue 17): a language switch and translated captions.

* Every page gets a link to the same page in the other edition: the English site is
  ``_build/html/X.html``, the Chinese one ``_build/html/zh/X.html`` (written by
  ``python tools/i18n.py build``). The link sits at the top of the article.
* sphinx-external-toc inserts the table of contents (priority 100) after Sphinx's
  translation step (priority 20), so the part captions of ``_toc.yml`` stay English in
  a translated build. This translates them from the root document's catalog, where the
  gettext builder extracts them.
"""

from __future__ import annotations

from os import path

from sphinx import addnodes
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
    app.connect("html-page-context", _switch)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
