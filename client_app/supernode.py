"""Flower's SuperNode with shorter waits: ``python -m client_app.supernode [--idle-poll S] ARGS``.

ARGS are ``flower-supernode``'s own. Flower 1.42's SuperNode waits a hard-coded 3 s after each
empty pull from the SuperLink, 0.5 s at a time for its ClientApp's reply, and its SuperExec 1 s
between checks for a ClientApp to start (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``): a node that just
replied to its training message sees the round's evaluation message up to 4.5 s late, twice a
round. This runs the same SuperNode with the pull's wait at most S seconds (default 0.5: S is the
latency a message may wait and 1/S the pulls per second the SuperLink serves per idle node) and
the node's local waits (reply, SuperExec) at most 0.1 s. Nothing else about the SuperNode changes.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import time
from typing import Any

from flwr.supernode import start_client_internal
from flwr.supernode.cli.flower_supernode import flower_supernode

DEFAULT_IDLE_POLL = 0.5
LOCAL_WAIT = 0.1  # the node's own waits: for its ClientApp's reply, the SuperExec's checks (no network)
FLOWER_IDLE_WAIT = "time.sleep(3)"  # the line in start_client_internal this shortens


class ShortWaits:
    """The ``time`` module as the SuperNode's loop sees it: its idle pull's 3 s wait at most
    ``idle_poll`` s, its shorter (local) waits at most :data:`LOCAL_WAIT` s."""

    def __init__(self, idle_poll: float):
        self.idle_poll = idle_poll

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.idle_poll if seconds >= 3 else LOCAL_WAIT))


def shorten_idle_poll(idle_poll: float) -> bool:
    """Make the SuperNode's idle pull wait at most ``idle_poll`` s and its local waits at most
    :data:`LOCAL_WAIT` s; False if this Flower's loop no longer has the wait this shortens (then
    nothing is changed)."""
    if FLOWER_IDLE_WAIT not in inspect.getsource(start_client_internal):
        return False
    start_client_internal.time = ShortWaits(idle_poll)  # type: ignore[assignment]
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(LOCAL_WAIT)  # read by the SuperExec it starts
    return True


def split_idle_poll(argv: list[str]) -> tuple[float, list[str]]:
    """``--idle-poll S`` (seconds, > 0) taken out of ``argv``; the rest is flower-supernode's."""
    if "--idle-poll" not in argv:
        return DEFAULT_IDLE_POLL, argv
    at = argv.index("--idle-poll")
    try:
        limit = float(argv[at + 1])
    except (IndexError, ValueError):
        raise SystemExit(f"--idle-poll needs seconds, got {argv[at + 1 : at + 2]}") from None
    if not 0.01 <= limit <= 3:
        raise SystemExit(f"--idle-poll {limit:g}: give 0.01 to 3 seconds (3 is Flower's own)")
    return limit, argv[:at] + argv[at + 2 :]


def main() -> None:
    limit, rest = split_idle_poll(sys.argv[1:])
    if not shorten_idle_poll(limit):
        logging.getLogger(__name__).warning(
            "this Flower's SuperNode no longer waits with %s: --idle-poll changes nothing", FLOWER_IDLE_WAIT
        )
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
