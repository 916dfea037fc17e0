"""Checks a scenario needs beyond its own keys, run before anything trains: the model exists and has
the cut layer, the task's data files read and hold enough examples for the clients, the output
folder can be written. Each failure is one ValueError naming the field and the value.
"""

from __future__ import annotations

import os
from pathlib import Path

from fl_app.config import Config
from fl_app.models import check_cut, model_layers
from fl_app.scenario import sample_and_partition


def check_model(config: Config) -> None:
    """The model resolves (tiny, packaged, local directory or hub) and ``cut-layer`` fits its layers."""
    check_cut(config.model.cut_layer, model_layers(config.model.name))


def check_data(config: Config) -> None:
    """The task's data reads and can be split among ``num-clients`` as the run will split it."""
    sample_and_partition(config)


def check_out_dir(out_dir: Path, field: str = "out-dir") -> None:
    """``out_dir`` is (or can be made) a writable folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{field} {str(out_dir)!r} is an existing file, not a folder")
    parent = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise ValueError(f"{field} {str(out_dir)!r} cannot be written (no write permission on {parent})")
    if (out_dir / "results.json").is_dir():
        raise ValueError(f"{field} {str(out_dir)!r} holds a folder named results.json")


def check_scenario(config: Config, data: bool = True) -> None:
    """The model and, unless ``data=False`` (a server whose clients hold the data), the data (the
    task itself was checked by make_config)."""
    check_model(config)
    if data:
        check_data(config)
