"""Each script at most once per page, so that the browser console stays free of errors.

sphinx-thebe (which Jupyter Book always loads, even with thebe off) registers its inline
configuration script, ``const THEBE_JS_URL = ...``, a second time when the environment
is read again; a page then declares the constant twice and the browser logs
``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. This removes
repeated identical scripts (same file or same inline body, same attributes) from every
page, keeping the first.
"""

from __future__ import annotations


def _key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # None and "" both mean inline; priority ignored
    filename = getattr(script, "filename", script) or ""
    return str(filename), tuple(
        sorted((name, str(value)) for name, value in attributes.items())
    )


def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    # In place: handlers that run later (MathJax on pages with math) add to this
    # same list.
    scripts[:] = unique


def setup(app):
    # Bumped when this extension's output changes, so that an existing build
    # rewrites every page.
    app.add_config_value("page_scripts_version", 2, "html")
    # Early: a later handler may return a template name, which ends the event
    # (emit_firstresult).
    app.connect("html-page-context", _unique_scripts, priority=100)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
