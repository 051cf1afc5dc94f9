"""The Chinese edition shows the Chinese figures (issue 29, item 7).

``tools/execute_notebooks.py`` draws every matplotlib figure of a notebook twice, in
English (the stored output) and in Chinese (``book/_figures_zh/<notebook>/<cell
id>-<output index>.png``), and lists each Chinese image in
``book/_figures_zh/manifest.json`` with the sha256 of the English PNG it stands for.
myst-nb writes a PNG output to a file named by that same sha256, so in a zh build each
image node whose file is an English output with a Chinese twin is pointed at the twin,
before Sphinx collects the images.

Static figures need nothing here: ``book/figures/bench/<name>.png`` has its Chinese
twin ``<name>.zh_CN.png`` beside it, which Sphinx picks itself in a ``zh_CN`` build
(``figure_language_filename``, default ``{root}.{language}{ext}``).

An English output without a twin is left as it is and named in the log; the tests
(tests/test_zh_figures.py) fail on it.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

MANIFEST = Path("book") / "_figures_zh" / "manifest.json"


def _is_zh(config) -> bool:
    return bool(config.language) and str(config.language).lower().startswith("zh")


def twins(srcdir: str | Path) -> dict[str, str]:
    """sha256 of an English PNG output -> its Chinese twin, relative to srcdir."""
    path = Path(srcdir) / MANIFEST
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    found = {}
    for notebook, entries in manifest.get("notebooks", {}).items():
        folder = MANIFEST.parent / Path(notebook).stem
        for key, entry in entries.items():
            found[entry["en_sha256"]] = (folder / f"{key}.png").as_posix()
    return found


def _swap(app, doctree) -> None:
    if not _is_zh(app.config):
        return
    # Read once per build (not kept in the pickled environment); a page is read
    # again when the manifest changes.
    if getattr(app, "_zh_figure_twins", None) is None:
        app._zh_figure_twins = twins(app.srcdir)
    found = app._zh_figure_twins
    app.env.note_dependency(str(Path(app.srcdir) / MANIFEST))
    for node in doctree.findall(nodes.image):
        uri = node.get("uri", "")
        stem, ext = posixpath.splitext(posixpath.basename(uri))
        if ext != ".png" or "jupyter_execute" not in uri:
            continue
        if stem in found:
            node["uri"] = "/" + found[stem]
        else:
            logger.info(
                "zh_figures: %s shows an English figure (%s) with no Chinese twin; "
                "run tools/execute_notebooks.py --zh-figures-only on its notebook",
                app.env.docname,
                uri,
            )


def setup(app):
    # Before Sphinx's ImageCollector (doctree-read, priority 500) resolves the uris.
    app.connect("doctree-read", _swap, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
