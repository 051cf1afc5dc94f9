"""Serve MathJax 3 from the built site, so that formulas render with no network.

Jupyter Book 1 points Sphinx at a CDN copy of MathJax. This extension copies MathJax's
``es5`` distribution (from the ``django-static-mathjax`` wheel, which ships the files
and has no dependencies) into ``<outdir>/_static/mathjax/`` when the HTML build finishes
and sets ``mathjax_path`` to it. It is copied into the *output*, not into a source
``_static/`` folder: Jupyter Book adds every ``.js`` file found there as a script tag on
every page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

MATHJAX_ENTRY = "tex-chtml.js"  # TeX input, CommonHTML output; loads the rest on demand
TARGET = Path("_static") / "mathjax"


def mathjax_source() -> Path:
    """The folder holding MathJax 3's ``es5`` files in the installed wheel."""
    import mathjax  # the import package of django-static-mathjax

    root = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (root / MATHJAX_ENTRY).is_file():
        raise FileNotFoundError(
            f"MathJax not found at {root}: install django-static-mathjax"
        )
    return root


def _use_local_path(app, config) -> None:
    # Relative paths in mathjax_path are relative to the output's _static folder.
    config.mathjax_path = f"mathjax/{MATHJAX_ENTRY}"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / TARGET
    if not (target / MATHJAX_ENTRY).is_file():
        shutil.copytree(mathjax_source(), target, dirs_exist_ok=True)


def setup(app):
    mathjax_source()  # fail early, with a clear message, if the files are missing
    app.connect("config-inited", _use_local_path, priority=900)
    app.connect("build-finished", _copy_mathjax)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
