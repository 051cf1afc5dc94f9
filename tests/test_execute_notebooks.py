"""``tools/execute_notebooks.py`` runs the build-status appendix last and records each
notebook's time as soon as it finishes (issue 22 item 13)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location(
    "execute_notebooks", ROOT / "tools" / "execute_notebooks.py"
)
tool = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tool)


def test_build_status_runs_last_whatever_the_order_given():
    book = ROOT / "book"
    given = [book / "build_status.ipynb", book / "fast.ipynb", book / "preface.ipynb"]
    assert tool.run_order(given) == [given[1], given[2], given[0]]
    assert tool.run_order(given[1:]) == given[1:]  # no appendix, order kept
    assert tool.run_order([given[1], given[1]]) == [given[1]]


def test_the_full_run_ends_with_build_status():
    order = tool.run_order(tool.toc_notebooks())
    assert order[-1].name == "build_status.ipynb"
    assert len(order) == len(set(order)) > 10


def test_record_writes_at_once_and_keeps_other_times(tmp_path, monkeypatch):
    times = tmp_path / "execution_times.json"
    times.write_text(json.dumps({"book/a": 1.0}))
    monkeypatch.setattr(tool, "TIMES", times)
    tool.record("book/b", 2.345)
    assert json.loads(times.read_text()) == {"book/a": 1.0, "book/b": 2.3}
