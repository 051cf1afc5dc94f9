"""Chinese figures (issue 29, item 7): one catalogue of strings, one image per language.

A figure's English strings stay literals in the code that draws it; their Chinese lives
in ONE file, ``book/_data/figure_strings.zh.json``::

    {"strings":  {"sequence length n": "序列长度 n", ...},
     "patterns": {"{way} ({t} ms/token)": "{way}（每个词元 {t} ms）", ...},
     "keep":     ["numpy", "GPT-2", ...]}

``strings`` maps a whole English string (a title, an axis label, a legend entry, a tick
label, an annotation) to its Chinese; ``keep`` lists names shown as they are in both
editions (``numpy``, ``SDPA``, ``GPT-2``). ``patterns`` are for strings that carry
measured numbers: ``{name}`` matches any text, which is translated in turn (numbers pass
unchanged). A string whose letters are all inside ``$...$`` math, or that is a single-
letter symbol (``n``, ``H_kv``), needs no entry. Any other string with letters and no
entry is *recorded as missing*: the run that drew the figure fails and lists it, so a
new figure cannot ship untranslated.

How the Chinese image is made:

* Notebook outputs (``tools/execute_notebooks.py``): the kernel that executes a notebook
  loads this module as an IPython extension. Each time IPython turns a matplotlib figure
  into the PNG of an output (the English image, unchanged), the same figure is drawn a
  second time with every ``Text`` translated and a CJK font (Noto Sans CJK SC) behind
  the figure's own font, then restored. The Chinese PNG and what it used go to the
  folder named by ``BOOK_FIGURE_ZH_DIR``; ``execute_notebooks.py`` files them under
  ``book/_figures_zh/<notebook>/<cell id>-<output index>.png`` with a manifest. No
  second execution, and the two images show the same data.
* Static figures (``book/figures/bench``, drawn by ``companion.bench.report.plot``):
  ``python tools/figure_i18n.py static`` draws them again from their stored JSON with
  every string translated as it is set, as ``<name>.zh_CN.png`` beside the English
  file (Sphinx's ``figure_language_filename`` then picks it in the zh build).

The zh build swaps the images (``_ext/zh_figures.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "book" / "_data" / "figure_strings.zh.json"
ZH_FIGURES = ROOT / "book" / "_figures_zh"
MANIFEST = ZH_FIGURES / "manifest.json"
CJK_FONT = "Noto Sans CJK SC"
# Static figures: (English PNG relative to the root, JSON it is drawn from, drawer).
STATIC_DIRS = {"book/figures/bench": "book/figures/bench/bench.json"}
ENV_DIR = "BOOK_FIGURE_ZH_DIR"
ENV_CATALOGUE = "BOOK_FIGURE_STRINGS"

_MATH = re.compile(r"(?<!\\)\$.*?(?<!\\)\$", re.S)
_WORD = re.compile(r"[A-Za-z]{2,}")
_SYMBOL = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def needs_translation(text: str) -> bool:
    """Whether ``text`` has words a Chinese reader should see translated (or kept
    on purpose): letters outside math, other than a one-letter symbol."""
    rest = _MATH.sub(" ", text)
    if _SYMBOL.match(rest):
        return False
    return bool(_WORD.search(rest))


class Translator:
    """English -> Chinese through the catalogue; remembers what it used and missed."""

    def __init__(self, catalogue: dict) -> None:
        unknown = set(catalogue) - {"strings", "patterns", "keep", "_comment"}
        if unknown:
            raise ValueError(f"catalogue: unknown sections {sorted(unknown)}")
        self.strings: dict[str, str] = dict(catalogue.get("strings", {}))
        for name in catalogue.get("keep", []):
            if name in self.strings:
                raise ValueError(f"catalogue: {name!r} is both kept and translated")
            self.strings[name] = name
        self.patterns = []
        for template, target in catalogue.get("patterns", {}).items():
            names = _PLACEHOLDER.findall(template)
            if not names or set(_PLACEHOLDER.findall(target)) != set(names):
                raise ValueError(
                    f"catalogue pattern {template!r} -> {target!r}: both sides need "
                    "the same {placeholders}"
                )
            regex = ""
            last = 0
            for m in _PLACEHOLDER.finditer(template):
                regex += (
                    re.escape(template[last : m.start()]) + f"(?P<{m.group(1)}>.+?)"
                )
                last = m.end()
            regex += re.escape(template[last:])
            self.patterns.append((template, re.compile(rf"^{regex}$", re.S), target))
        # The most specific pattern first ("layer {l}, head {h}" before "layer {l}").
        self.patterns.sort(key=lambda p: -len(_PLACEHOLDER.sub("", p[0])))
        self.used: set[str] = set()
        self.missing: set[str] = set()

    @classmethod
    def from_file(cls, path: Path = CATALOGUE) -> Translator:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")))

    def _lookup(self, text: str) -> str | None:
        if text in self.strings:
            self.used.add(text)
            return self.strings[text]
        stripped = text.strip()
        if stripped != text and stripped in self.strings:
            self.used.add(stripped)
            return text.replace(stripped, self.strings[stripped])
        for template, regex, target in self.patterns:
            m = regex.match(text)
            if m:
                self.used.add(template)
                values = {k: self(v) for k, v in m.groupdict().items()}
                return _PLACEHOLDER.sub(lambda g, v=values: v[g.group(1)], target)
        return None

    def __call__(self, text: str) -> str:
        if not text or not needs_translation(text):
            return text
        found = self._lookup(text)
        if found is not None:
            return found
        if "\n" in text:
            return "\n".join(self(line) for line in text.split("\n"))
        self.missing.add(text)
        return text


# --------------------------------------------------------------------- matplotlib

_STATE = threading.local()
_PATCHED = False


def _patch_text() -> None:
    """``Text.set_text`` translates while a translator is active (tick labels are
    set during drawing, so translating at set time covers them too)."""
    global _PATCHED
    if _PATCHED:
        return
    from matplotlib.text import Text

    original = Text.set_text

    def set_text(self, s):
        translator = getattr(_STATE, "translator", None)
        if translator is not None and s is not None:
            s = translator(str(s))
        return original(self, s)

    set_text.__wrapped__ = original
    Text.set_text = set_text
    _PATCHED = True


def cjk_font_path() -> str:
    """The file of the CJK font matplotlib uses (ValueError when it has none)."""
    from matplotlib import font_manager

    path = font_manager.findfont(
        font_manager.FontProperties(family=CJK_FONT), fallback_to_default=False
    )
    return path


@contextlib.contextmanager
def translating(translator: Translator):
    """Inside: every matplotlib string set is translated and every new text falls
    back to the CJK font (for figures drawn from scratch, like the bench's)."""
    import matplotlib

    _patch_text()
    families = list(matplotlib.rcParams["font.family"])
    previous = getattr(_STATE, "translator", None)
    with matplotlib.rc_context({"font.family": families + [CJK_FONT]}):
        _STATE.translator = translator
        try:
            yield
        finally:
            _STATE.translator = previous


_CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


def _cjk_props(props, text: str):
    """The CJK font behind the text's own font; in front of it where the text mixes
    Chinese with ``$...$`` math (mathtext sets the words around the math in the first
    family's font alone, with no fallback)."""
    cjk = props.copy()
    families = list(props.get_family())
    if "$" in text and _CJK.search(text):
        cjk.set_family([CJK_FONT] + families)
    else:
        cjk.set_family(families + [CJK_FONT])
    return cjk


@contextlib.contextmanager
def captured():
    """Warnings, matplotlib's log and any printing while the Chinese twin is drawn,
    kept out of the notebook (its English outputs stay exactly as they were) and
    returned as a list of messages (a missing glyph is a problem to report)."""
    import io
    import logging
    import warnings

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("matplotlib")
    handler, propagate = Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("always")
            yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        messages.extend(str(w.message) for w in caught)
        messages.extend(line for line in sink.getvalue().splitlines() if line)


@contextlib.contextmanager
def chinese(figure, translator: Translator):
    """An existing figure in Chinese for the duration (restored on exit)."""
    from matplotlib.text import Text

    texts = figure.findobj(Text)
    saved = [(t, t.get_text(), t.get_fontproperties()) for t in texts]
    try:
        with translating(translator):
            for t, text, props in saved:
                t.set_text(text)
                t.set_fontproperties(_cjk_props(props, t.get_text()))
            yield
    finally:
        for t, text, props in saved:
            t.set_text(text)
            t.set_fontproperties(props)


# --------------------------------------------------------------------- the kernel


def load_ipython_extension(shell) -> None:
    """Loaded in the kernel by ``tools/execute_notebooks.py``: for each PNG of a
    matplotlib figure, write its Chinese twin into ``$BOOK_FIGURE_ZH_DIR``."""
    out = Path(os.environ[ENV_DIR])
    out.mkdir(parents=True, exist_ok=True)
    catalogue = Path(os.environ.get(ENV_CATALOGUE, CATALOGUE))
    formatter = shell.display_formatter.formatters["image/png"]
    cls = type(formatter)
    original = cls.__call__
    drawn = [0]

    def __call__(self, obj):
        result = original(self, obj)
        figure_module = sys.modules.get("matplotlib.figure")
        if (
            self is formatter
            and result is not None
            and figure_module is not None
            and isinstance(obj, figure_module.Figure)
        ):
            drawn[0] += 1
            _twin(obj, result, out, str(drawn[0]), catalogue, original, self)
        return result

    cls.__call__ = __call__


def _png_bytes(result) -> bytes:
    import base64

    data = result[0] if isinstance(result, tuple) else result
    return data if isinstance(data, bytes) else base64.b64decode(data)


def _twin(figure, english, out: Path, key: str, catalogue, original, formatter):
    """Draw ``figure`` in Chinese through the same formatter; never raises (the
    English output must not depend on this)."""
    import time

    record = {"key": key, "en_sha256": sha256(_png_bytes(english))}
    start = time.perf_counter()
    try:
        translator = Translator.from_file(catalogue)
        with captured() as messages, chinese(figure, translator):
            zh = original(formatter, figure)
        (out / f"{key}.png").write_bytes(_png_bytes(zh))
        record["seconds"] = time.perf_counter() - start
        record.update(used=sorted(translator.used), missing=sorted(translator.missing))
        if messages:
            record["error"] = "while drawing in Chinese: " + "; ".join(messages)
    except Exception as error:  # noqa: BLE001 - reported by execute_notebooks.py
        record["error"] = f"{type(error).__name__}: {error}"
    with open(out / "records.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------- manifest


def strings_digest(used: list[str], catalogue: dict | None = None) -> str:
    """sha256 of the catalogue entries a figure used, as they read now: a twin whose
    digest differs was drawn before one of its translations was edited."""
    if catalogue is None:
        catalogue = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    table = dict(catalogue.get("strings", {}))
    table.update(catalogue.get("patterns", {}))
    table.update({name: name for name in catalogue.get("keep", [])})
    subset = {key: table.get(key) for key in sorted(used)}
    return sha256(json.dumps(subset, ensure_ascii=False, sort_keys=True).encode())


@contextlib.contextmanager
def manifest_lock():
    """One writer of the manifest at a time (notebooks may run in parallel)."""
    import fcntl

    lock = ROOT / "_build" / ".figures-zh.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest() -> dict:
    if MANIFEST.exists():
        return json.loads(MANIFEST.read_text(encoding="utf-8"))
    return {"notebooks": {}, "static": {}}


def write_manifest(manifest: dict) -> None:
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "_comment": "Written by tools/execute_notebooks.py and tools/figure_i18n.py: "
        "each Chinese figure, the English PNG it stands for (sha256) and the "
        "catalogue entries it used.",
        "notebooks": dict(sorted(manifest.get("notebooks", {}).items())),
        "static": dict(sorted(manifest.get("static", {}).items())),
    }
    MANIFEST.write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=False) + "\n",
        encoding="utf-8",
    )


# --------------------------------------------------------------------- static


def _numeric_keys(value):
    """JSON turned the integer keys of the bench results into strings."""
    if isinstance(value, dict):
        return {
            (int(k) if isinstance(k, str) and k.isdigit() else k): _numeric_keys(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_numeric_keys(v) for v in value]
    return value


def draw_static(translator: Translator) -> dict:
    """The Chinese twins of the bench figures, drawn by companion.bench from the stored
    JSON; returns their manifest entries."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    from companion.bench import report

    entries = {}
    for directory, source in STATIC_DIRS.items():
        results = _numeric_keys(json.loads((ROOT / source).read_text(encoding="utf-8")))
        with tempfile.TemporaryDirectory() as tmp:
            with captured() as messages, translating(translator):
                written = report.plot(results, tmp)
            if messages:
                raise RuntimeError(f"drawing {directory} in Chinese: {messages}")
            for path in written:
                name = Path(path).name
                english = ROOT / directory / name
                target = english.with_name(english.stem + ".zh_CN.png")
                target.write_bytes(Path(path).read_bytes())
                entries[str(english.relative_to(ROOT))] = {
                    "zh": str(target.relative_to(ROOT)),
                    "en_sha256": sha256(english.read_bytes()),
                    "source": source,
                }
    return entries


def main(argv: list[str]) -> int:
    if argv[:1] != ["static"]:
        sys.stderr.write("usage: python tools/figure_i18n.py static\n")
        return 2
    sys.path.insert(0, str(ROOT))
    translator = Translator.from_file()
    static = draw_static(translator)
    for entry in static.values():
        entry["used"] = sorted(translator.used)
        entry["missing"] = sorted(translator.missing)
        entry["strings_sha256"] = strings_digest(entry["used"])
    with manifest_lock():
        manifest = read_manifest()
        manifest["static"] = static
        write_manifest(manifest)
    for name, entry in manifest["static"].items():
        sys.stdout.write(f"{entry['zh']} (for {name})\n")
    if translator.missing:
        sys.stdout.write(
            "untranslated figure strings (add them to "
            f"{CATALOGUE.relative_to(ROOT)}):\n"
        )
        for text in sorted(translator.missing):
            sys.stdout.write(f"  {text!r}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
