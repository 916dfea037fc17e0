"""Every benchmark writes ``<stem>.md`` and ``<stem>.json`` stamped with the commit and the machine."""

from __future__ import annotations

import json
import os
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
