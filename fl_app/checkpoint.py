"""Atomic checkpoints and results: written to a temporary file, then renamed over the old one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

SESSION_ID = re.compile(r"[0-9a-f]{16}")  # a session's public id (fl_app.records.session_id)


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested in dicts, lists, tuples) on the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


class WriteFailed(OSError):
    """A file could not be written (disk full, no permission, ...): the old file, if any, is as it
    was and no temporary file is left."""


def write_atomic(path: Path, write: Callable[[BinaryIO], None], private: bool = False) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file that is synced and renamed over it;
    any failure (an ``OSError``, or torch's ``RuntimeError`` on a full disk) removes the temporary
    file and raises :class:`WriteFailed` naming the path. ``private``: mode 0600 whatever an old file had."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WriteFailed(f"could not write {path}: {type(err).__name__}: {reason}") from err


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Save ``payload`` so that a crash at any point leaves either the old or the new checkpoint; its
    tensors are saved from the CPU, so a checkpoint of a run on a GPU loads on any machine."""
    cpu = _on_cpu(payload)
    write_atomic(path, lambda fh: torch.save(cpu, fh))


class CheckpointRefused(ValueError):
    """A checkpoint or client state that cannot be resumed from: unreadable, not ours, or not this
    run's model and rounds."""


CHECKPOINT_KEYS = frozenset(
    {
        "round",
        "run_id",
        "server",
        "optimizer",
        "server_steps",
        "history",
        "average",
        "synced",
        "results",
        "rng",
        "committed",
    }
)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, or a ValueError saying in one line why it cannot be one (unreadable,
    truncated, not ours, keys missing or unknown)."""
    try:
        saved = load_checkpoint(path)
    except pickle.UnpicklingError:
        raise CheckpointRefused(f"{path} holds objects other than tensors and plain values (not read)") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file; all mean the same here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointRefused(f"{path} is not a readable checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(saved, dict) or set(saved) != CHECKPOINT_KEYS:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointRefused(f"{path} is not a checkpoint of this project (keys {found})")
    return saved


def check_weights(saved: Mapping[str, Any], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """``saved`` has exactly ``expected``'s names, each with its shape and a floating dtype, all finite;
    else a CheckpointRefused naming the first tensor that is not."""
    if not isinstance(saved, Mapping) or set(saved) != set(expected):
        differ = sorted(set(saved) ^ set(expected))[:3] if isinstance(saved, Mapping) else type(saved).__name__
        raise CheckpointRefused(f"{what} does not match the model: names differ ({differ})")
    for name, value in saved.items():
        want = expected[name]
        if not torch.is_tensor(value) or value.shape != want.shape or not value.is_floating_point():
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise CheckpointRefused(f"{what}: {name} is {got}, expected a float tensor of shape {tuple(want.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise CheckpointRefused(f"{what}: {name} holds values that are not finite")


def check_run_checkpoint(saved: Mapping[str, Any], top: torch.nn.Module, what: str) -> None:
    """A read checkpoint fits a run whose server holds ``top``: the top's trainable weights by name,
    shape, float dtype and finite values, and a round its own results reached; else CheckpointRefused
    (prefixed ``what``: resume or export) saying in one line what does not."""
    trainable = {n: p for n, p in top.named_parameters() if p.requires_grad}
    check_weights(saved["server"], trainable, f"{what}: the checkpoint's server weights")
    try:
        recorded = [r["round"] for r in json.loads(saved["results"])["rounds"]]
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointRefused(f"{what}: the checkpoint's results are unreadable ({err})") from None
    if not isinstance(saved["round"], int) or not recorded or saved["round"] != recorded[-1]:
        raise CheckpointRefused(
            f"{what}: the checkpoint says round {saved['round']!r}, its results end at round "
            f"{recorded[-1] if recorded else None}"
        )
    committed = saved["committed"]  # client -> its last committed session (fl_app.records.session_id)
    if not isinstance(committed, dict) or not all(
        isinstance(c, int) and isinstance(s, str) and SESSION_ID.fullmatch(s) and s for c, s in committed.items()
    ):
        raise CheckpointRefused(f"{what}: the checkpoint's committed sessions are not client -> session id")


def mark_failed(folder: Path, error: str) -> None:
    """Set an existing results.json's status to failed with ``error``, keeping everything else in it."""
    path = folder / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(results, dict):
        write_json_atomic(path, {**results, "status": "failed", "error": error})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain Python values only;
    ``bytes`` is allowed by name, since pickle writes an empty one as a call to it)."""
    with torch.serialization.safe_globals([bytes]):
        return torch.load(path, map_location="cpu", weights_only=True)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only (mode 0600, whatever an old file had), atomically."""
    write_atomic(path, lambda fh: fh.write(data), private=True)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON via a temporary file and rename, so a crash never leaves a truncated file."""
    data = json.dumps(payload, indent=2, default=float).encode()
    write_atomic(path, lambda fh: fh.write(data))


def run_folder(out_dir: str, config: Mapping[str, Any], root: Path = Path("runs")) -> Path:
    """The folder a run writes to: the run folder ``resume`` names, else ``out_dir`` if given, else a
    new ``runs/<time>-<mode>-<task>`` (a run never overwrites another's results unless told to)."""
    resume = str(config.get("resume", ""))
    if resume and resume.lower() != "true":
        return Path(resume).expanduser().resolve()
    if out_dir:
        return Path(out_dir).expanduser().resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root.resolve() / f"{stamp}-{config['mode']}-{config['task']}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


class RunFolderBusy(ValueError):
    """Another run holds the run folder."""


class RunFolderLock:
    """An exclusive lock on a run folder for the life of the run (``<folder>/.run.lock``, holding the
    owner's pid); the operating system releases it when the process ends, however it ends."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ".run.lock"
        self.handle = open(path, "a+")  # noqa: SIM115 - held open for the run: the lock lives with it
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise RunFolderBusy(
                f"out-dir {str(folder)!r} is in use by another run (pid {owner}); give another out-dir, or wait"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
