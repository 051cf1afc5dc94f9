"""Shared by the spread scripts: merge the JSON lines their runs printed into a
chapter's spread file (``book/_data/spread/<chapter>.json``), one entry per claim with
the values of every run and their range."""

from __future__ import annotations

import json
import pathlib


def collect(paths, claims: dict, chapter: str, out: pathlib.Path) -> None:
    """``claims`` maps a metric to ``(claim, assertion)``; each line of the logs in
    ``paths`` that starts with ``{`` is one run's ``{"metric", "seed", "machine",
    "value"}``."""
    values = {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                values.setdefault(row.pop("metric"), []).append(row)
    entries = []
    for metric, (claim, assertion) in claims.items():
        rows = sorted(values[metric], key=lambda r: (r["machine"], r["seed"]))
        numbers = [r["value"] for r in rows]
        entries.append(
            {
                "claim": claim,
                "metric": metric,
                "values": rows,
                "min": min(numbers),
                "max": max(numbers),
                "assert": assertion,
            }
        )
    spread = {"chapter": chapter, "claims": entries}
    out.write_text(json.dumps(spread, indent=1) + "\n")
