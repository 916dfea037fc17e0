"""Client states on the client's own disk, one file per round it trained, so a resumed run (or a
restarted SuperNode, whose in-memory state Flower forgot) continues each bottom exactly.

Files live in ``<folder>/client-<partition id>/round-<round>.pt`` and are written atomically. A
client loads the newest file up to the last round the server finished; older files are pruned
once a newer one is finished (the server's checkpoint is past it), and when the run finishes only
each client's newest file is kept (its final bottom).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from fl_app.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint
from fl_app.records import ClientState, history_from_record, history_to_record

_NAME = re.compile(r"round-(\d+)\.pt")


def _rounds(folder: Path, partition_id: int) -> dict[int, Path]:
    own = folder / f"client-{partition_id}"
    found = (_NAME.fullmatch(p.name) for p in own.glob("round-*.pt")) if own.is_dir() else ()
    return {int(m.group(1)): own / m.group(0) for m in found if m}


def save_client_state(folder: Path, partition_id: int, rnd: int, state: ClientState, finished_round: int) -> Path:
    """Write the state after round ``rnd``; drop files older than the newest one the server has
    finished with (``finished_round``: its last checkpointed round)."""
    path = folder / f"client-{partition_id}" / f"round-{rnd:05d}.pt"
    payload = {
        "weights": state.weights,
        "steps": state.steps,
        "synced_round": state.synced_round,
        "trial": state.trial,
        "subset_ids": list(state.subset_ids),
        "subset_weights": list(state.subset_weights),
        "updates": history_to_record(state.updates) if state.updates is not None else None,
        "run_id": folder.name,  # the run it belongs to (its folder is named by it): see load_client_state
    }
    save_checkpoint(path, payload)
    files = _rounds(folder, partition_id)
    keep_from = max((r for r in files if r <= finished_round), default=0)
    for r, old in files.items():
        if r < keep_from:
            old.unlink(missing_ok=True)
    return path


def saved_round(folder: Path, partition_id: int, upto_round: int) -> int:
    """The newest round <= ``upto_round`` whose state is saved (0 if none is)."""
    return max((r for r in _rounds(folder, partition_id) if r <= upto_round), default=0)


def load_client_state(
    folder: Path, partition_id: int, upto_round: int, run_id: str | None = None
) -> ClientState | None:
    """The state saved after the newest round <= ``upto_round`` (None if there is none); with ``run_id``,
    a state another run wrote (copied into this run's folder) is refused naming its file."""
    rnd = saved_round(folder, partition_id, upto_round)
    if not rnd:
        return None
    path = _rounds(folder, partition_id)[rnd]
    payload = load_checkpoint(path)
    owner = payload.pop("run_id", None) if isinstance(payload, dict) else None  # files written before it: none
    if run_id is not None and owner is not None and owner != run_id:
        raise CheckpointRefused(f"{path} is a client state of run {str(owner)[:64]!r}, not of this run ({run_id})")
    try:
        updates = payload.pop("updates", None)
        state = ClientState(**payload, updates=history_from_record(updates) if updates is not None else None)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointRefused(f"{path} is not a client state of this project ({type(err).__name__}: {err})") from None
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


def keep_newest_states(folder: Path) -> int:
    """A finished run's client states: each client's newest file stays (its final bottom), older ones
    go, since nothing resumes from them; returns how many files were removed."""
    removed = 0
    for own in sorted(folder.glob("client-*")) if folder.is_dir() else ():
        files = _rounds(folder, int(own.name.removeprefix("client-"))) if own.name[7:].isdigit() else {}
        for r, path in files.items():
            if r < max(files):
                path.unlink(missing_ok=True)
                removed += 1
    return removed
