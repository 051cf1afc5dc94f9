"""Execute notebooks in place and store their outputs (``make notebooks``).

The book renders stored outputs and ``make test`` runs strict nbval over them, so every
notebook must be re-executed and committed after a change. Each notebook runs in its own
folder (as nbval runs it) with a fresh kernel from this environment. Per-cell timing
metadata is not recorded (it would change on every run); the wall time of each notebook
goes to ``book/_data/execution_times.json`` for the build-status appendix, written after
each notebook (an interrupted run keeps the times it measured).

The build-status appendix reports those times, so in any run that includes it, it is
executed last, after every other notebook of the run has recorded its time: the table it
stores then comes from the same run as the notebooks it describes.

Every figure gets its Chinese twin in the same run (issue 29, item 7): the kernel loads
``tools/figure_i18n.py`` as an IPython extension, which draws each matplotlib figure a
second time with its strings from ``book/_data/figure_strings.zh.json`` and a CJK font;
the images go to ``book/_figures_zh/<notebook>/<cell id>-<output index>.png``, listed in
``book/_figures_zh/manifest.json`` with the English PNG each stands for. A figure string
missing from the catalogue fails the run (after the notebook is written), listed.

Usage: ``python tools/execute_notebooks.py [NOTEBOOK ...]`` (default: every notebook in
``_toc.yml`` order under ``book/``). ``--zh-figures-only`` executes the notebooks and
writes only their Chinese figures (the stored English notebook and its times are left
as they are; run it after adding strings to the catalogue); with no notebook named it
also redraws the static figures (``python tools/figure_i18n.py static``). ``--stale``
does the same for only the notebooks whose Chinese figures are out of date (an English
figure changed, or a string it uses was added or edited in the catalogue).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("PYTHONHASHSEED", "0")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMES = ROOT / "book" / "_data" / "execution_times.json"
sys.path.insert(0, str(ROOT / "tools"))
import figure_i18n  # noqa: E402


def toc_notebooks() -> list[Path]:
    """The notebooks named in ``_toc.yml``, in reading order."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def execute(path: Path, zh_dir: Path, write: bool = True) -> float:
    """Execute ``path`` (written back unless ``write`` is false); the kernel leaves
    the Chinese twins of its figures in ``zh_dir``."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
        extra_arguments=["--IPKernelApp.extensions=figure_i18n"],
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "tools"), env.get("PYTHONPATH")) if p
    )
    env[figure_i18n.ENV_DIR] = str(zh_dir)
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    if write:
        nbformat.write(nb, path)
    drawn, zh_seconds = file_zh_figures(path, nb, zh_dir)
    if drawn:
        print(f"(+ {drawn} Chinese figure(s), {zh_seconds:.1f} s)", end=" ", flush=True)
    return seconds


def _png_outputs(cell) -> list[tuple[int, str]]:
    """(output index, sha256 of the PNG) of each PNG output of a code cell."""
    import base64

    found = []
    for index, output in enumerate(cell.get("outputs", [])):
        data = output.get("data", {})
        if "image/png" in data:
            png = base64.b64decode(data["image/png"])
            found.append((index, figure_i18n.sha256(png)))
    return found


PROBLEMS: list[str] = []


def file_zh_figures(path: Path, executed, zh_dir: Path) -> tuple[int, float]:
    """Move the kernel's Chinese images to ``book/_figures_zh/<notebook>/`` under the
    cell id and output index of the English output in the stored notebook; returns
    how many were drawn and the seconds the kernel spent drawing them."""
    stored = nbformat.read(path, as_version=4)
    name = path.relative_to(ROOT).as_posix()
    # The kernel's records, found by the English PNG they were drawn beside.
    records: dict[str, list[dict]] = {}
    log = zh_dir / "records.jsonl"
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            records.setdefault(record["en_sha256"], []).append(record)
    target = figure_i18n.ZH_FIGURES / path.stem
    shutil.rmtree(target, ignore_errors=True)
    entries = {}
    filed: list[dict] = []
    stored_cells = {c.get("id"): c for c in stored.cells}
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        ran = _png_outputs(cell)
        keep = stored_cells.get(cell.get("id"))
        shown = _png_outputs(keep) if keep is not None else []
        where = f"{name} cell {cell.get('id')}"
        if len(ran) != len(shown):
            PROBLEMS.append(f"{where}: {len(shown)} stored PNGs, {len(ran)} drawn now")
            continue
        # Keyed by the stored output's index (a re-run may print more before it).
        for (_, en_sha), (index, stored_sha) in zip(ran, shown):
            if not records.get(en_sha):
                PROBLEMS.append(f"{where} output {index}: no Chinese twin was drawn")
                continue
            record = records[en_sha].pop(0)
            filed.append(record)
            if "error" in record:
                PROBLEMS.append(f"{where} output {index}: {record['error']}")
                continue
            target.mkdir(parents=True, exist_ok=True)
            key = f"{cell.id}-{index}"
            shutil.copyfile(zh_dir / f"{record['key']}.png", target / f"{key}.png")
            entries[key] = {
                "en_sha256": stored_sha,
                "used": record["used"],
                "missing": record["missing"],
                "strings_sha256": figure_i18n.strings_digest(record["used"]),
            }
            PROBLEMS.extend(
                f"{where} output {index}: untranslated {text!r}"
                for text in record["missing"]
            )
    with figure_i18n.manifest_lock():
        manifest = figure_i18n.read_manifest()
        if entries:
            manifest["notebooks"][name] = entries
        else:
            manifest["notebooks"].pop(name, None)
        figure_i18n.write_manifest(manifest)
    drawn = [r for rs in records.values() for r in rs] + filed
    return len(drawn), sum(r.get("seconds", 0.0) for r in drawn)


BUILD_STATUS = ROOT / "book" / "build_status.ipynb"


def run_order(paths: list[Path]) -> list[Path]:
    """``paths`` without duplicates, in the given order, except that the build-status
    appendix (which reads the times the others record) comes last."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if p != BUILD_STATUS] + [
        p for p in unique if p == BUILD_STATUS
    ]


def record(name: str, seconds: float) -> None:
    """Store one notebook's time at once, so the next notebook (and an interrupted
    run) sees it."""
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[name] = round(seconds, 1)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(dict(sorted(times.items())), indent=1) + "\n")


def stale_twins(path: Path) -> list[str]:
    """Why the Chinese twins of ``path`` are out of date ([] when they are not): an
    output without a twin, a twin of another image, a twin drawn with missing or
    since-edited catalogue strings."""
    name = path.relative_to(ROOT).as_posix()
    entries = figure_i18n.read_manifest()["notebooks"].get(name, {})
    nb = nbformat.read(path, as_version=4)
    outputs = {
        f"{cell.get('id')}-{index}": digest
        for cell in nb.cells
        if cell.cell_type == "code"
        for index, digest in _png_outputs(cell)
    }
    why = [f"{k}: no twin" for k in outputs if k not in entries]
    why += [f"{k}: no such output" for k in entries if k not in outputs]
    for key, entry in entries.items():
        if key in outputs and entry["en_sha256"] != outputs[key]:
            why.append(f"{key}: the English image changed")
        elif entry["missing"]:
            why.append(f"{key}: drawn with untranslated strings")
        elif entry.get("strings_sha256") != figure_i18n.strings_digest(entry["used"]):
            why.append(f"{key}: its strings changed in the catalogue")
    return why


OPTIONS = ("--zh-figures-only", "--stale")


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    unknown = [a for a in argv if a.startswith("-") and a not in OPTIONS]
    if unknown:
        print(f"unknown option(s) {unknown}; known: {', '.join(OPTIONS)} (--help)")
        return 2
    zh_only = "--zh-figures-only" in argv or "--stale" in argv
    names = [a for a in argv if a not in OPTIONS]
    paths = run_order([Path(a).resolve() for a in names] or toc_notebooks())
    if zh_only:
        # The build-status appendix draws no figure and must not be re-run.
        paths = [p for p in paths if p != BUILD_STATUS]
    if "--stale" in argv:
        paths = [p for p in paths if stale_twins(p)]
        print(f"notebooks with out-of-date Chinese figures: {len(paths)}", flush=True)
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.relative_to(ROOT)} ...", end=" ", flush=True)
        with tempfile.TemporaryDirectory(prefix="figures-zh-") as zh_dir:
            if not zh_only:
                seconds = execute(path, Path(zh_dir))
            else:
                try:
                    seconds = execute(path, Path(zh_dir), write=False)
                except Exception as error:  # a chapter being edited: go on
                    PROBLEMS.append(f"{path.relative_to(ROOT)}: {error!s:.300}")
                    print("failed", flush=True)
                    continue
        if not zh_only:
            record(path.relative_to(ROOT).with_suffix("").as_posix(), seconds)
        print(f"{seconds:.1f} s", flush=True)
    if zh_only and not names:
        if figure_i18n.main(["static"]) != 0:
            PROBLEMS.append("static figures: untranslated strings (listed above)")
    if PROBLEMS:
        catalogue = figure_i18n.CATALOGUE.relative_to(ROOT)
        print(
            f"\nChinese figures: {len(PROBLEMS)} problem(s); the notebooks are written."
        )
        for line in PROBLEMS:
            print(f"  {line}")
        print(
            f"Add the strings to {catalogue}, then run\n"
            "  python tools/execute_notebooks.py --zh-figures-only <notebook ...>"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
