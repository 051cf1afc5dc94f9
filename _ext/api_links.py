"""Links between the API appendix (``book/api.ipynb``) and the chapters, both ways.

1. Docstring -> chapter.
The package's docstrings name the chapter that explains them in plain words (they are
read in terminals and editors too):
``Explained in the book chapter *Attention: algorithm and math*.`` When autodoc renders
a docstring for the API appendix, each ``*Title*`` in such a sentence becomes a
``:doc:`` link to the chapter whose ``#`` title starts with ``Title`` (a docstring may
shorten a long title). A title that matches no chapter stays emphasised text; it never
breaks the build.

2. Chapter -> API. Autodoc documents each object under the module that defines it
(``companion.numpy.attention.attention_tiled``). A reference to the name a reader
imports,
``{py:func}`companion.numpy.attention_tiled```, or to a bare name inside a docstring
(``:class:`KVCache``` in :mod:`companion.torch.models`),
is resolved by importing it and following the object to its defining module.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

SENTENCE = re.compile(
    r"(Explained in the book chapters? )(.*?)(\.\s|\.$|$)", flags=re.S
)
EMPHASIS = re.compile(r"(?<![*\w`])\*([^*`]+?)\*(?![*\w])", flags=re.S)


def _title(path: Path) -> str | None:
    """The first ``#`` heading of a notebook or markdown page."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        text = "\n".join(
            "".join(c.get("source", ""))
            for c in cells
            if c.get("cell_type") == "markdown"
        )
    else:
        text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def _chapters(app) -> dict[str, str]:
    """Chapter title -> absolute docname, for every page under ``book/``."""
    chapters = {}
    for path in sorted(Path(app.srcdir, "book").glob("*")):
        if path.suffix in (".ipynb", ".md"):
            try:
                title = _title(path)
            # a page being rewritten: the build reads it later
            except (OSError, ValueError):
                continue
            if title:
                chapters[" ".join(title.split())] = f"/book/{path.stem}"
    return chapters


def _link(app, text: str) -> str:
    wanted = " ".join(text.split())
    for title, docname in app.env.companion_chapters.items():
        if title == wanted or title.startswith(wanted):
            return f":doc:`{wanted} <{docname}>`"
    return f"*{text}*"


def _process_docstring(app, what, name, obj, options, lines) -> None:
    text = "\n".join(lines)
    if "book chapter" not in text:
        return
    linked = SENTENCE.sub(
        lambda m: (
            m.group(1)
            + EMPHASIS.sub(lambda e: _link(app, e.group(1)), m.group(2))
            + m.group(3)
        ),
        text,
    )
    if linked != text:
        lines[:] = linked.split("\n")


def _read_chapters(app) -> None:
    app.env.companion_chapters = _chapters(app)


def _import(dotted: str):
    """The object named ``dotted`` (``package.module.attr.attr``), or None."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _canonical(target: str, module: str | None) -> str | None:
    """Where the object called ``target`` (seen from ``module``) is defined, if in
    companion."""
    candidates = [target] if target.startswith("companion.") else []
    if module and module.startswith("companion"):
        candidates.append(f"{module}.{target}")
    for dotted in candidates:
        obj = _import(dotted)
        defined_in = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if (
            obj is not None
            and defined_in
            and qualname
            and defined_in.startswith("companion")
        ):
            canonical = f"{defined_in}.{qualname}"
            if canonical != target:
                return canonical
    return None


def _missing_reference(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    canonical = _canonical(target, node.get("py:module"))
    if canonical is None:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
    )


def setup(app):
    app.connect("builder-inited", _read_chapters)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("missing-reference", _missing_reference)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
