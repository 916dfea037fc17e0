"""A study's finished runs, kept in a JSON file in the repository (``docs/results/ledgers/<study>.json``).

A study longer than a session (SmolLM2 accuracy, tuning over seeds) loses its run folders when the
machine changes; its ledger is committed with the reports, so the next session, on any machine,
reads each finished run back instead of rerunning it. A run is matched by its request (the whole
config or the scenario with its overrides): a run of a changed request is not read back (settings
added to the project since, at their defaults, change nothing), and when one is recorded under the
same name the earlier run is kept as ``<name>@<request hash>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks.report import provenance


class Ledger:
    """Finished runs' summaries by name, each with the request that produced it and where it ran."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str, request: Any) -> dict[str, Any] | None:
        """A copy of the summary of run ``name`` if it finished with this ``request``, else None."""
        entry = self.entries.get(name)
        if entry is None or not _answers(entry["request"], _plain(request)):
            return None
        return json.loads(json.dumps(entry["summary"]))

    def find(self, request: Any) -> dict[str, Any] | None:
        """A copy of the summary of any run that finished with this ``request``, whatever its name
        (one study phase reusing another's run), else None."""
        plain = _plain(request)
        for entry in self.entries.values():
            if _answers(entry["request"], plain):
                return json.loads(json.dumps(entry["summary"]))
        return None

    def put(self, name: str, request: Any, summary: dict[str, Any]) -> None:
        """Record a finished run in the file at once: under a lock, over what is in the file now (another
        process's runs are kept), written atomically (a crash leaves the old file)."""
        stamp = provenance()
        entry = {
            "request": _plain(request),
            "summary": _plain(summary),
            "ran_at": {k: stamp[k] for k in ("commit", "host", "date")},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
            if (earlier := self.entries.get(name)) is not None and earlier["request"] != entry["request"]:
                digest = hashlib.sha256(json.dumps(earlier["request"], sort_keys=True).encode()).hexdigest()[:12]
                self.entries[f"{name}@{digest}"] = earlier  # another request's run: kept, never overwritten
            self.entries[name] = entry
            partial = self.path.with_name(self.path.name + ".tmp")
            partial.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
            os.replace(partial, self.path)


def _answers(stored: Any, request: Any) -> bool:
    """Whether a run recorded for ``stored`` answers ``request``: the same request, or a scenario config
    whose keys the recorded one lacks are all at their defaults (settings added since the run ran,
    which change nothing it did). A key the recorded run had and the request lacks never matches."""
    if stored == request:
        return True
    if not (isinstance(stored, dict) and isinstance(request, dict)) or set(stored) - set(request):
        return False
    from fl_app.config import DEFAULTS  # only config requests get here

    added = set(request) - set(stored)
    return all(k in DEFAULTS and request[k] == _plain(DEFAULTS[k]) for k in added) and all(
        stored[k] == request[k] for k in stored
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, keys as strings), so requests compare alike."""
    return json.loads(json.dumps(value, default=float))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_pending(
    pending: Mapping[str, tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]],
    jobs: int,
    record: Callable[[str, dict[str, Any]], None],
    ledger: Ledger,
) -> None:
    """Every study's runner: call each pending ``function(*args)`` (by run name) in this process
    (``jobs = 1``) or in ``jobs`` spawned processes of one torch thread each (the ZO directions are
    drawn on one core: two one-thread runs side by side give about 1.3x one two-thread run's
    throughput on 2 cores), and ``record(key, summary)`` as each finishes. A failed run does not stop
    the others being recorded; the failures are raised together at the end."""
    if jobs == 1:
        for key, (function, args) in pending.items():
            record(key, function(*args))
        return
    failed = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread) as pool:
        futures = {pool.submit(function, *args): key for key, (function, args) in pending.items()}
        for future in as_completed(futures):
            try:
                record(futures[future], future.result())
            except Exception as err:  # noqa: BLE001 - reported once every other run is recorded
                failed.append(f"{futures[future]}: {type(err).__name__}: {err}")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the others are in {ledger.path}): " + "; ".join(failed))
