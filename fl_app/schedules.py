"""Learning-rate schedules for a client's optimiser (ZO or FO): warm-up, then constant or decaying.

The factor depends on the client's own step count only, so a restarted or resumed client, and a
synced client replaying another's steps (each step's rate travels in the history), get the same
rates.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, warmup: int, horizon: int) -> float:
    """The multiplier of the base rate at 0-based ``step``: a linear warm-up over the first ``warmup``
    steps (1/warmup, 2/warmup, ..., 1), then 1 (``constant``), or a decay towards 0 at ``horizon``
    steps (``linear``, or ``cosine``: half a cosine). ``horizon`` 0 means unknown: no decay."""
    if schedule not in SCHEDULES:
        raise ValueError(f"client-lr-schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < 0 or warmup < 0 or horizon < 0:
        raise ValueError(f"schedule needs step, warm-up and horizon >= 0, got {step}, {warmup}, {horizon}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or horizon <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (horizon - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
