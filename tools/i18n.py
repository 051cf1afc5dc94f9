"""The Chinese edition's machinery (issue 17): catalogs, checks and the zh build.

The English notebooks under ``book/`` are the only source. Sphinx's gettext builder
extracts their prose into one template per document; ``locale/zh_CN/LC_MESSAGES``
holds the translations, merged with GNU ``msgmerge --previous`` so that a changed
sentence becomes fuzzy (the build then shows the English: it fails safe).

Subcommands::

    python tools/i18n.py update   # after editing a notebook (`make translations`)
    python tools/i18n.py check    # msgfmt -c, markup of every translation, coverage
    python tools/i18n.py config   # write the git-ignored _config.zh.yml
    python tools/i18n.py build    # build the zh edition into _build/html/zh/
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCALE = ROOT / "locale"
LANG = "zh_CN"
# Documents whose messages may stay English (the API appendix's docstrings).
EXCLUDED = {"api"}
ZH_TITLE = "参数共享与注意力"
ZH_CONFIG = ROOT / "_config.zh.yml"


def _bin(name: str) -> str:
    """An executable of the virtual environment this script runs in, or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


# --------------------------------------------------------------------------- markup

_CODE = re.compile(
    r"(?:\{(?P<role>[\w:.+-]+)\})?(?P<ticks>`+)(?P<body>.+?)(?P=ticks)", re.S
)
_DMATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.S)
_MATH = re.compile(r"(?<![\\$])\$(?!\$)(.+?)(?<![\\$])\$", re.S)
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FOOTNOTE = re.compile(r"\[\^[^\]]+\]")
_SUBST = re.compile(r"\{\{.*?\}\}", re.S)
_HTML = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>")
_BOLD = re.compile(r"\*\*|__(?=\w)|(?<=\w)__")
_ITALIC = re.compile(r"(?<![*\\])\*(?!\*)")
# Roles whose content may be `text <target>`: only the target must survive.
_TEXT_ROLES = {"ref", "doc", "numref", "term", "eq", "download", "any"}


def markup(text: str) -> Counter:
    """The markup of one message as a multiset of (kind, value) pairs.

    Prose may be reordered and reworded; math spans, code spans, roles with their
    targets, link targets, footnotes, substitutions, HTML tags and the number of
    bold/italic markers may not change.
    """
    found: Counter = Counter()

    def code(m: re.Match) -> str:
        role, body = m.group("role"), m.group("body")
        if role:
            if role in _TEXT_ROLES:
                target = re.search(r"<([^<>]+)>\s*$", body)
                body = target.group(1) if target else body
            found[("role", f"{{{role}}}`{body.strip()}`")] += 1
        else:
            found[("code", body)] += 1
        return " "

    rest = _CODE.sub(code, text)
    for kind, pattern in (("math", _DMATH), ("math", _MATH)):

        def math(m: re.Match, kind: str = kind) -> str:
            found[(kind, m.group(1).strip())] += 1
            return " "

        rest = pattern.sub(math, rest)
    for kind, pattern in (
        ("link target", _LINK_TARGET),
        ("footnote", _FOOTNOTE),
        ("substitution", _SUBST),
        ("html tag", _HTML),
    ):
        for m in pattern.finditer(rest):
            found[(kind, m.group(1) if pattern is _LINK_TARGET else m.group(0))] += 1
        rest = pattern.sub(" ", rest)
    bold = len(_BOLD.findall(rest))
    rest = _BOLD.sub(" ", rest)
    if bold:
        found[("bold markers", str(bold))] += 1
    italic = len(_ITALIC.findall(rest))
    if italic:
        found[("italic markers", str(italic))] += 1
    return found


def markup_difference(msgid: str, msgstr: str) -> list[str]:
    """Readable differences between the markup of a message and its translation."""
    a, b = markup(msgid), markup(msgstr)
    problems = []
    dollars = re.compile(r"(?<!\\)\$")
    if len(dollars.findall(_CODE.sub(" ", msgid))) % 2:
        # A fragment of a split paragraph (e.g. a source line that starts with "+ "
        # becomes a list item): math spans cannot be paired, so count the dollars.
        a = Counter({k: v for k, v in a.items() if k[0] != "math"})
        b = Counter({k: v for k, v in b.items() if k[0] != "math"})
        na = len(dollars.findall(_CODE.sub(" ", msgid)))
        nb = len(dollars.findall(_CODE.sub(" ", msgstr)))
        if na != nb:
            problems.append(f"'$' signs: {na} in msgid, {nb} in msgstr")
    for key in sorted(set(a) | set(b)):
        if a[key] != b[key]:
            kind, value = key
            if kind.endswith("markers"):
                continue
            problems.append(f"{kind} {value!r}: {a[key]} in msgid, {b[key]} in msgstr")
    for kind in ("bold markers", "italic markers"):
        na = sum(int(v) for (k, v) in a if k == kind)
        nb = sum(int(v) for (k, v) in b if k == kind)
        # Chinese has no italics (issue 29 item 8): a translation may drop the
        # emphasis of an English term, in pairs, but never add any.
        dropped = kind == "italic markers" and nb < na and (na - nb) % 2 == 0
        if na != nb and not dropped:
            problems.append(f"{kind}: {na} in msgid, {nb} in msgstr")
    return problems


# --------------------------------------------------------------------------- check


@dataclass
class Coverage:
    document: str
    translated: int
    fuzzy: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.translated / self.total if self.total else 100.0


def catalogs(locale_dir: Path = LOCALE) -> list[Path]:
    return sorted((locale_dir / LANG / "LC_MESSAGES").rglob("*.po"))


def msgfmt_errors(path: Path) -> str:
    result = subprocess.run(
        ["msgfmt", "-c", "-o", "/dev/null", str(path)], capture_output=True, text=True
    )
    return "" if result.returncode == 0 else (result.stderr.strip() or "msgfmt failed")


def check_file(path: Path) -> tuple[list[str], Coverage]:
    import polib

    po = polib.pofile(str(path))
    errors = []
    translated = fuzzy = total = 0
    for entry in po:
        if entry.obsolete:
            continue
        total += 1
        if entry.fuzzy:
            fuzzy += 1
            continue
        if not entry.msgstr:
            continue
        translated += 1
        for problem in markup_difference(entry.msgid, entry.msgstr):
            start = entry.msgid[:60].replace("\n", " ")
            errors.append(f"{path}:{entry.linenum}: {start!r}: {problem}")
    parts = path.with_suffix("").parts
    name = (
        "/".join(parts[parts.index("LC_MESSAGES") + 1 :])
        if "LC_MESSAGES" in parts
        else path.stem
    )
    return errors, Coverage(name, translated, fuzzy, total)


def _counted(row: Coverage) -> bool:
    """A page of the book, not the API appendix (whose docstrings may stay English)
    nor a theme catalog (sphinx.po, booktheme.po)."""
    return row.document.startswith("book/") and Path(row.document).name not in EXCLUDED


def coverage_table(rows: list[Coverage]) -> str:
    lines = [
        "| document | translated | fuzzy | total | coverage |",
        "|---|---:|---:|---:|---:|",
    ]
    counted = [r for r in rows if _counted(r)]
    for r in rows:
        note = "" if _counted(r) else " (not counted)"
        lines.append(
            f"| {r.document}{note} | {r.translated} | {r.fuzzy} | {r.total} "
            f"| {r.percent:.1f}% |"
        )
    t = sum(r.translated for r in counted)
    n = sum(r.total for r in counted)
    f = sum(r.fuzzy for r in counted)
    percent = 100.0 * t / max(n, 1)
    lines.append(f"| **all but the API appendix** | {t} | {f} | {n} | {percent:.1f}% |")
    return "\n".join(lines)


def run_check(paths: list[Path]) -> tuple[list[str], list[Coverage]]:
    errors, rows = [], []
    for path in paths:
        bad = msgfmt_errors(path)
        if bad:
            errors.append(f"{path}: msgfmt -c: {bad}")
        file_errors, row = check_file(path)
        errors += file_errors
        rows.append(row)
    return errors, rows


def overall_coverage(rows: list[Coverage]) -> float:
    counted = [r for r in rows if _counted(r)]
    n = sum(r.total for r in counted)
    return 100.0 * sum(r.translated for r in counted) / n if n else 100.0


def cmd_check(args) -> int:
    paths = [Path(p).resolve() for p in args.files] or catalogs(Path(args.locale_dir))
    errors, rows = run_check(paths)
    sys.stdout.write(coverage_table(rows) + "\n")
    for line in errors:
        sys.stdout.write(line + "\n")
    cov = overall_coverage(rows)
    status = 0
    if errors:
        sys.stdout.write(f"{len(errors)} markup/msgfmt error(s)\n")
        status = 1
    if args.min_coverage is not None and cov < args.min_coverage:
        sys.stdout.write(f"coverage {cov:.1f}% < required {args.min_coverage:.1f}%\n")
        status = 1
    return status


# --------------------------------------------------------------------------- update


def extract() -> Path:
    """The gettext build of the English book; returns the folder of its templates."""
    out = ROOT / "_build" / "i18n"
    shutil.rmtree(out / "_build" / "gettext", ignore_errors=True)
    result = subprocess.run(
        [
            _bin("jupyter-book"),
            "build",
            str(ROOT),
            "--path-output",
            str(out),
            "--builder",
            "custom",
            "--custom-builder",
            "gettext",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "the gettext build failed:\n"
            + result.stdout[-4000:]
            + result.stderr[-4000:]
        )
    return out / "_build" / "gettext"


def stale_templates(built: Path, pot_dir: Path = LOCALE / "pot") -> list[str]:
    """Templates whose messages differ from a fresh extraction (or that are missing
    or extra): the notebooks changed and `make translations` was not run."""
    import polib

    def ids(path: Path) -> set[str]:
        return {e.msgid for e in polib.pofile(str(path)) if not e.obsolete}

    fresh = {p.relative_to(built): p for p in built.rglob("*.pot")}
    stored = {p.relative_to(pot_dir): p for p in pot_dir.rglob("*.pot")}
    stale = sorted(str(rel) for rel in set(fresh) ^ set(stored))
    for rel in sorted(set(fresh) & set(stored)):
        if ids(fresh[rel]) != ids(stored[rel]):
            stale.append(str(rel))
    return stale


def cmd_update(args) -> int:
    """Extract the English prose, refresh the templates, merge every catalog."""
    try:
        built = extract()
    except RuntimeError as error:
        sys.stderr.write(f"{error}\n")
        return 1
    pot_dir = LOCALE / "pot"
    shutil.rmtree(pot_dir, ignore_errors=True)
    templates = sorted(built.rglob("*.pot"))
    for pot in templates:
        target = pot_dir / pot.relative_to(built)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pot, target)
    po_root = Path(args.locale_dir) / LANG / "LC_MESSAGES"
    changed = merge_catalogs(pot_dir, po_root)
    changed_text = ", ".join(changed) or "none"
    sys.stdout.write(f"{len(templates)} templates; catalogs changed: {changed_text}\n")
    stale = sorted(
        str(po.relative_to(po_root))
        for po in po_root.rglob("*.po")
        if po.parent != po_root
        and not (pot_dir / po.relative_to(po_root).with_suffix(".pot")).exists()
    )
    if stale:
        sys.stdout.write(f"catalogs of documents no longer in the book: {stale}\n")
    return 0


def merge_catalogs(pot_dir: Path, po_root: Path) -> list[str]:
    """msgmerge --previous each template into its catalog (msginit for a new one),
    obsolete entries dropped; returns the catalogs that changed."""
    changed = []
    for pot in sorted(pot_dir.rglob("*.pot")):
        rel = pot.relative_to(pot_dir).with_suffix(".po")
        po = po_root / rel
        po.parent.mkdir(parents=True, exist_ok=True)
        before = po.read_bytes() if po.exists() else b""
        if not po.exists():
            subprocess.run(
                [
                    "msginit",
                    "--no-translator",
                    "-l",
                    LANG,
                    "-i",
                    str(pot),
                    "-o",
                    str(po),
                ],
                check=True,
                capture_output=True,
            )
        else:
            subprocess.run(
                [
                    "msgmerge",
                    "--quiet",
                    "--previous",
                    "--update",
                    "--backup=none",
                    str(po),
                    str(pot),
                ],
                check=True,
            )
            subprocess.run(
                ["msgattrib", "--no-obsolete", "-o", str(po), str(po)], check=True
            )
        if po.read_bytes() != before:
            changed.append(str(rel))
    return changed


# --------------------------------------------------------------------------- config


def zh_config_text() -> str:
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["title"] = ZH_TITLE
    config.setdefault("html", {})["extra_footer"] = (
        "离线构建；本书中每个 notebook 的输出都由测试套件（nbval）复现。"
    )
    sphinx_config = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx_config["language"] = LANG
    sphinx_config["html_search_language"] = "zh"
    header = (
        "# Written by `python tools/i18n.py config` from _config.yml (git-ignored):\n"
        "# the Chinese edition. Edit _config.yml, not this file.\n"
    )
    return header + yaml.safe_dump(config, allow_unicode=True, sort_keys=False)


def cmd_config(args) -> int:
    ZH_CONFIG.write_text(zh_config_text(), encoding="utf-8")
    sys.stdout.write(f"wrote {ZH_CONFIG.relative_to(ROOT)}\n")
    return 0


# --------------------------------------------------------------------------- build


def cmd_build(args) -> int:
    cmd_config(args)
    out = ROOT / "_build" / "zh"
    start = time.perf_counter()
    result = subprocess.run(
        [
            _bin("jupyter-book"),
            "build",
            str(ROOT),
            "--config",
            str(ZH_CONFIG),
            "--path-output",
            str(out),
            "-W",
            "-n",
            "--keep-going",
            "--all",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    sys.stdout.write(log)
    if result.returncode != 0:
        return result.returncode
    target = ROOT / "_build" / "html" / "zh"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(out / "_build" / "html", target)
    sys.stdout.write(
        f"zh edition built in {seconds:.0f} s: {target.relative_to(ROOT)}\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "update", help="gettext build, templates, msgmerge every catalog"
    )
    p.add_argument("--locale-dir", default=str(LOCALE))
    p.set_defaults(func=cmd_update)
    p = sub.add_parser("check", help="msgfmt -c, markup and coverage of the catalogs")
    p.add_argument("files", nargs="*", help="catalogs (default: all of the locale)")
    p.add_argument("--locale-dir", default=str(LOCALE))
    p.add_argument("--min-coverage", type=float, default=None)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("config", help="write _config.zh.yml")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("build", help="build the zh edition into _build/html/zh")
    p.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
