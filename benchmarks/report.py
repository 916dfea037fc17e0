"""Every benchmark writes ``<stem>.md`` and ``<stem>.json`` stamped with the commit and the machine."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from fl_app.coordinator import machine

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    """The commit (with ``+dirty`` if the checkout has changes), the machine and the date."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs")  # not the reports written
    commit = git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    return {"commit": commit, **machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_report(stem: Path | str, markdown: str, data: Any, command: str | None = None) -> tuple[Path, Path]:
    """``stem.md`` (the markdown, then a provenance line) and ``stem.json`` (``data`` with the provenance,
    and ``command``, the invocation that wrote it, when given: results.md shows it to reproduce the report)."""
    stem, stamp = Path(stem), provenance()
    stem.parent.mkdir(parents=True, exist_ok=True)
    line = ", ".join(f"{k} {v}" for k, v in stamp.items())
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    md.write_text(f"{markdown.rstrip()}\n\nMeasured at {line}.\n")
    record = {"provenance": stamp, **({"command": command} if command else {}), "data": data}
    js.write_text(json.dumps(record, indent=2, default=float))
    return md, js


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value) of results over seeds."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float], digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    """``mean ± sd`` of results over seeds as table text (times ``scale``, the mean with its sign if
    ``signed``); the mean alone for one value, which has no spread to show."""
    m, sd = spread(values)
    mean = f"{scale * m:{'+' if signed else ''}.{digits}f}"
    return mean + (f" ± {scale * sd:.{digits}f}" if len(values) > 1 else "")


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of results over seeds (0 for one value)."""
    return spread(values)[1] / math.sqrt(len(values))
