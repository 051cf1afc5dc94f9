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

Usage: ``python tools/execute_notebooks.py [NOTEBOOK ...]`` (default: every notebook in
``_toc.yml`` order under ``book/``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("PYTHONHASHSEED", "0")

import nbformat  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMES = ROOT / "book" / "_data" / "execution_times.json"


def toc_notebooks() -> list[Path]:
    """The notebooks named in ``_toc.yml``, in reading order."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


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


def main(argv: list[str]) -> int:
    paths = run_order([Path(a).resolve() for a in argv] or toc_notebooks())
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.relative_to(ROOT)} ...", end=" ", flush=True)
        seconds = execute(path)
        record(path.relative_to(ROOT).with_suffix("").as_posix(), seconds)
        print(f"{seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
