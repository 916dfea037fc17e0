"""Checks a scenario needs beyond its own keys, run before anything trains: the model exists and has
the cut layer, the task's data files read and hold enough examples for the clients, the output
folder can be written. Each failure is one ValueError naming the field and the value.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from fl_app.config import SETTINGS, Config
from fl_app.model_catalog import model_layers
from fl_app.scenario import sample_and_partition
from fl_app.split import check_cut

# Settings a resumed run may change: where and how it is served, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {"resume", "out-dir", "probe-messages", "round-timeout", "step-timeout", "server-device", "client-device"}
    | ({key for key, (group, _) in SETTINGS.items() if group == "stream"} - {"wire-dtype"})
)


def check_model(config: Config) -> None:
    """The model resolves (tiny, packaged, local directory or hub) and ``cut-layer`` fits its layers."""
    check_cut(config.model.cut_layer, model_layers(config.model.name))


def check_data(config: Config) -> None:
    """The task's data reads and can be split among ``num-clients`` as the run will split it."""
    sample_and_partition(config)


def check_out_dir(out_dir: Path, field: str = "out-dir", resume: Config | None = None) -> None:
    """``out_dir`` is (or can be made) a writable folder. When resuming (``resume``: the config to
    resume with) it holds a run trained with the same settings; otherwise it holds no unfinished run
    (whose checkpoint a new run would overwrite)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{field} {str(out_dir)!r} is an existing file, not a folder")
    parent = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise ValueError(f"{field} {str(out_dir)!r} cannot be written (no write permission on {parent})")
    if (out_dir / "results.json").is_dir():
        raise ValueError(f"{field} {str(out_dir)!r} holds a folder named results.json")
    checkpoint, saved = out_dir / "checkpoint.pt", _results(out_dir / "results.json")
    if resume is not None:
        if not checkpoint.is_file() or "config" not in saved:
            raise ValueError(f"resume: {str(out_dir)!r} holds no checkpoint.pt and results.json to continue")
        differ = {
            k: (saved["config"].get(k), v)
            for k, v in resume.items()
            if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v
        }
        if differ:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(differ.items()))
            raise ValueError(f"resume: the run in {str(out_dir)!r} was trained with other settings ({shown})")
        if not resume.run.client_checkpoints:
            raise ValueError("resume needs client-checkpoints = true: the clients' bottoms are only on their disks")
    elif checkpoint.is_file() and saved.get("status") != "finished":
        how = "set resume = true to continue it" if not saved.get("tuning") else "a tuning study cannot be resumed"
        raise ValueError(
            f"{field} {str(out_dir)!r} holds an unfinished run (status {saved.get('status')!r}): {how}, "
            "or choose another folder"
        )


def _results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_tracker(config: Config) -> None:
    """The package ``tracker`` logs with is installed (the server's; clients never track)."""
    needs = {"tensorboard": "tensorboard", "mlflow": "mlflow"}.get(config.run.tracker)
    if needs and importlib.util.find_spec(needs) is None:
        raise ValueError(f"tracker = {config.run.tracker} needs the package '{needs}': pip install -e '.[track]'")


def check_scenario(config: Config, data: bool = True) -> None:
    """The model, the tracker's package and, unless ``data=False`` (a server whose clients hold the
    data), the data (the task itself was checked by make_config)."""
    check_model(config)
    check_tracker(config)
    if data:
        check_data(config)
