"""Client states on the client's own disk, one file per training session, so a resumed run (or a
restarted SuperNode, whose in-memory state Flower forgot, or another node the client moved to) continues
each bottom exactly as the server committed it.

Files live in ``<folder>/client-<partition id>/round-<round>-<session id>.pt`` and are written
atomically. A session loads the file of the client's last committed session (the server names it:
``SessionSettings.base``), never merely the newest: a session the server rolled back, or a second
session of the client that ran at once on another node, leaves a file nobody loads. Files of rounds
before the one a session started from are pruned when it saves; when the run finishes only each
client's committed file is kept (its final bottom).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from fl_app.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint
from fl_app.records import ClientState, history_from_record, history_to_record

_NAME = re.compile(r"round-(\d+)(?:-([0-9a-f]{16}))?\.pt")


def _files(folder: Path, partition_id: int) -> list[tuple[int, str, Path]]:
    """(round, session id, path) of a client's state files ("" for a file named without an id), oldest first."""
    own = folder / f"client-{partition_id}"
    found = (_NAME.fullmatch(p.name) for p in own.glob("round-*.pt")) if own.is_dir() else ()
    return sorted((int(m.group(1)), m.group(2) or "", own / m.group(0)) for m in found if m)


def save_client_state(folder: Path, partition_id: int, rnd: int, state: ClientState, keep_from: int) -> Path:
    """Write the state after round ``rnd`` (named by the session that wrote it, ``state.session``); drop
    the client's files of rounds before ``keep_from`` (the round of the state the session started from)."""
    name = f"round-{rnd:05d}" + (f"-{state.session}" if state.session else "") + ".pt"
    path = folder / f"client-{partition_id}" / name
    payload = {
        "weights": state.weights,
        "steps": state.steps,
        "synced_round": state.synced_round,
        "trial": state.trial,
        "subset_ids": list(state.subset_ids),
        "subset_weights": list(state.subset_weights),
        "updates": history_to_record(state.updates) if state.updates is not None else None,
        "session": state.session,
        "run_id": folder.name,  # the run it belongs to (its folder is named by it): see load_client_state
    }
    save_checkpoint(path, payload)
    for r, _, old in _files(folder, partition_id):
        if r < keep_from:
            old.unlink(missing_ok=True)
    return path


def saved_round(folder: Path, partition_id: int, upto_round: int, session: str | None = None) -> int:
    """The round of the state :func:`load_client_state` loads with the same arguments (0 if none)."""
    found = _find(folder, partition_id, upto_round, session)
    return found[0] if found else 0


def _find(folder: Path, partition_id: int, upto_round: int, session: str | None) -> tuple[int, Path] | None:
    """The newest file up to ``upto_round``, or (``session`` given) the one that session wrote."""
    files = [
        (r, path)
        for r, sid, path in _files(folder, partition_id)
        if (r <= upto_round if session is None else sid == session != "")
    ]
    return files[-1] if files else None


def load_client_state(
    folder: Path, partition_id: int, upto_round: int, run_id: str | None = None, session: str | None = None
) -> ClientState | None:
    """The state saved after the newest round <= ``upto_round`` or, with ``session``, the one that
    session wrote (None if there is none; always None for ``session = ""``); with ``run_id``, a state
    another run wrote (copied into this run's folder) is refused naming its file."""
    found = _find(folder, partition_id, upto_round, session)
    if found is None:
        return None
    path = found[1]
    payload = load_checkpoint(path)
    owner = payload.pop("run_id", None) if isinstance(payload, dict) else None  # files written before it: none
    if run_id is not None and owner is not None and owner != run_id:
        raise CheckpointRefused(f"{path} is a client state of run {str(owner)[:64]!r}, not of this run ({run_id})")
    try:
        updates = payload.pop("updates", None)
        state = ClientState(**payload, updates=history_from_record(updates) if updates is not None else None)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointRefused(f"{path} is not a client state of this project ({type(err).__name__}: {err})") from None
    if session and state.session != session:
        raise CheckpointRefused(f"{path} holds the state of session {state.session[:40]!r}, not {session} (renamed?)")
    if state.updates is not None:
        check_updates(state, str(path))
    return state


def check_updates(state: ClientState, where: str, most_steps: int | None = None) -> None:
    """A state kept as seeds is replayable: one finite rate and finite projected gradients per step,
    as many steps as its step counter says, and (``most_steps``) no more than the run can have taken;
    else CheckpointRefused naming ``where`` (its file, or the node memory it came from)."""
    updates = state.updates
    if updates is None:
        return
    if len(updates) != state.steps:
        raise CheckpointRefused(
            f"{where}: holds {len(updates)} steps to replay, but its step counter says {state.steps}"
        )
    if most_steps is not None and len(updates) > most_steps:
        raise CheckpointRefused(
            f"{where}: holds {len(updates)} steps to replay, more than the run can have taken ({most_steps})"
        )
    bad = next(
        (
            i
            for i, (lr, grads) in enumerate(zip(updates.lrs, updates.grads))
            if not all(map(math.isfinite, [lr, *grads]))
        ),
        None,
    )
    if bad is not None:
        raise CheckpointRefused(f"{where}: step {bad} has a rate or projected gradient that is not finite")


def keep_committed_states(folder: Path, committed: Mapping[int, str]) -> int:
    """A finished run's client states: each client's file of its last committed session (``committed``:
    client -> session id) stays, its final bottom; every other file goes, since nothing resumes from
    them; returns how many files were removed."""
    removed = 0
    for own in sorted(folder.glob("client-*")) if folder.is_dir() else ():
        client = own.name.removeprefix("client-")
        for _, sid, path in _files(folder, int(client)) if client.isdigit() else ():
            if sid != committed.get(int(client)):
                path.unlink(missing_ok=True)
                removed += 1
    return removed
