"""Optional experiment tracking that needs no server (config ``tracker``): the run's per-step training
loss, per-round dev accuracy and loss, bytes, client memory, the bottom's drift and the swap
evaluation, with its config as parameters, written beside results.json:

* ``tensorboard``: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>/tensorboard``);
* ``mlflow``: a run in a local MLflow store, the SQLite file ``<run>/mlflow.db``
  (``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db``; MLflow 3 refuses its old
  ``mlruns`` folder store).

A tuning run logs each trial's rounds under ``trial<N>/`` and the final training without a prefix.
``pip install -e '.[track]'`` installs both.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

Point = tuple[str, float, int]  # (name, value, step)


class Tracker(Protocol):
    def log(self, points: list[Point]) -> None:
        """Log each (name, value, step)."""

    def close(self) -> None: ...


class NoTracker:
    """``tracker = none``: nothing is logged."""

    def log(self, points: list[Point]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars as TensorBoard events; the config as a text summary."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=float) + "\n```")

    def log(self, points: list[Point]) -> None:
        for name, value, step in points:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a run killed later keeps what it logged

    def close(self) -> None:
        self.writer.close()


SAFE_PATH = re.compile(r"[A-Za-z0-9/._+-]+")  # a path that means the same inside an sqlite:/// URI


class MlflowTracker:
    """Metrics and the config's keys as parameters in an MLflow run of the local file store."""

    def __init__(self, folder: Path, config: dict[str, Any], name: str) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no file under the user's home, no upload
        import mlflow

        self.folder_fd: int | None = None
        self.client = mlflow.MlflowClient(tracking_uri=self._store_uri(folder))
        experiment = self.client.get_experiment_by_name("hosl")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("hosl")
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [mlflow.entities.Param(k, str(v)) for k, v in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, points: list[Point]) -> None:
        import mlflow

        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(name, float(value), now, step) for name, value, step in points]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def _store_uri(self, folder: Path) -> str:
        """``sqlite:///<folder>/mlflow.db``, built so that no character of the path can change it: a path
        with anything but letters, digits and ``/._+-`` (``?`` and ``#`` end a URI's path, ``%`` escapes)
        is reached through a descriptor of the folder held open while the tracker lives (Linux)."""
        path = (folder / "mlflow.db").resolve()
        if SAFE_PATH.fullmatch(str(path)):
            return f"sqlite:///{path}"
        if not Path("/proc/self/fd").is_dir():
            raise ValueError(
                f"tracker = mlflow cannot keep its store in {folder}: the path has characters an SQLite URI "
                "cannot carry on this system (choose an out-dir of letters, digits and /._+-)"
            )
        self.folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        return f"sqlite:////proc/self/fd/{self.folder_fd}/mlflow.db"

    def close(self) -> None:
        try:
            self.client.set_terminated(self.run_id)
        finally:
            if self.folder_fd is not None:
                os.close(self.folder_fd)
                self.folder_fd = None


def open_tracker(kind: str, folder: Path, config: dict[str, Any], name: str) -> Tracker:
    """The tracker ``kind`` names, writing under the run ``folder``; an uninstalled one is an error
    naming the extra that installs it."""
    if kind == "none":
        return NoTracker()
    try:
        if kind == "tensorboard":
            return TensorBoardTracker(folder, config)
        if kind == "mlflow":
            return MlflowTracker(folder, config, name)
    except ImportError as err:
        raise ValueError(f"tracker = {kind} needs its package ({err.name}): pip install -e '.[track]'") from err
    raise ValueError(f"unknown tracker {kind!r} (field 'tracker'); known: none, tensorboard, mlflow")


def round_values(entry: dict[str, Any], evaluation: dict[str, Any] | None, peak_bytes: int) -> dict[str, float]:
    """A round's scalars: its training loss, bytes, time and clients' peak memory; its dev evaluation
    (accuracy, loss, the bottom's drift, a swap evaluation's flips) when it had one."""
    values = {
        "round/bytes_up": entry["bytes_up"],
        "round/bytes_down": entry["bytes_down"],
        "round/seconds": entry["seconds"],
        "round/client_peak_mib": peak_bytes / 2**20,
    }
    if entry.get("train_loss") is not None:
        values["round/train_loss"] = entry["train_loss"]
    if evaluation is not None:
        values.update(eval_values("dev", evaluation))
    return values


def eval_values(split: str, evaluation: dict[str, Any]) -> dict[str, float]:
    """An evaluation's scalars under ``split/``: accuracy, loss, drift and swap."""
    values = {f"{split}/accuracy": evaluation["accuracy"], f"{split}/loss": evaluation["loss"]}
    drift = evaluation.get("drift") or {}
    for key in ("params", "activations"):
        if key in drift:
            values[f"{split}/drift_{key}"] = drift[key]
    swap = evaluation.get("swap") or {}
    for key in ("initial_accuracy", "gained", "lost", "p_value"):
        if key in swap:
            values[f"{split}/swap_{key}"] = swap[key]
    return {k: float(v) for k, v in values.items() if v is not None}
