"""What the Chinese edition leaves out or styles differently (issue 29, items 6 and 8).

* English glosses of Chinese quotations. The English pages quote the Chinese sources
  and follow each quotation with an English gloss, marked in the notebook as a
  container of class ``en-gloss``::

      > 参数共享是指……
      >
      > :::{container} en-gloss
      > *Parameter sharing means ...*
      > :::

  A Chinese reader needs no gloss of a Chinese quotation, so the container is removed
  from the doctree of the Chinese build, and also from the gettext build, so that the
  glosses are not extracted for translation at all. The English build keeps them.
* No synthetic italics for Chinese: in the Chinese pages ``em`` is not slanted (CJK
  fonts have no italic and browsers shear the glyphs); it is marked with emphasis dots
  under the text, the Chinese convention. The stylesheet is added to Chinese builds
  only.
"""

from __future__ import annotations

from pathlib import Path

from docutils import nodes
from sphinx.transforms import SphinxTransform

GLOSS_CLASS = "en-gloss"
STATIC = Path(__file__).resolve().parent / "zh_static"
CSS = "zh_edition.css"


def _is_zh(config) -> bool:
    return bool(config.language) and str(config.language).lower().startswith("zh")


def drops_glosses(app) -> bool:
    """The Chinese build and the gettext extraction leave the glosses out."""
    builder = getattr(app, "builder", None)
    return _is_zh(app.config) or (builder is not None and builder.name == "gettext")


class DropEnglishGlosses(SphinxTransform):
    """Remove ``en-gloss`` containers (before the i18n transform, priority 20, so
    that nothing inside them is looked up in a catalog)."""

    default_priority = 15

    def apply(self, **kwargs) -> None:
        if not drops_glosses(self.app):
            return
        for node in list(self.document.findall(nodes.container)):
            if GLOSS_CLASS in node.get("classes", []):
                node.parent.remove(node)


def _add_zh_css(app) -> None:
    if not _is_zh(app.config) or app.builder.format != "html":
        return
    app.config.html_static_path = [*app.config.html_static_path, str(STATIC)]
    app.add_css_file(CSS)


def setup(app):
    app.add_transform(DropEnglishGlosses)
    app.connect("builder-inited", _add_zh_css)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
