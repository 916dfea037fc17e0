"""Where a client step's time goes: named sections of the step, timed only while a recording is open
(a benchmark or a profile), and nearly free otherwise (one check per section).

    with step_timing.recording() as seconds:
        client.train_step(batch, link)
    seconds  # {"forward": ..., "passes": ..., "generate": ...}

Sections used by the client: ``forward`` (the bottom's forwards), ``passes`` (the ZO perturb and
update passes over the weights), ``generate`` (drawing their directions, inside the passes; Gaussian
chunks are drawn on several threads, so this sums thread-seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_open: dict[str, float] | None = None
_lock = threading.Lock()  # sections may end on several threads at once


@contextmanager
def section(name: str) -> Iterator[None]:
    """Add the block's seconds to ``name`` in the open recording, if any."""
    if _open is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        with _lock:
            if _open is not None:
                _open[name] = _open.get(name, 0.0) + elapsed


@contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Seconds per section of what runs inside the block (a recording already open is set aside)."""
    global _open
    seconds: dict[str, float] = {}
    with _lock:
        previous, _open = _open, seconds
    try:
        yield seconds
    finally:
        with _lock:
            _open = previous
