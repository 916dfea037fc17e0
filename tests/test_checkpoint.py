"""Checkpoints and results are replaced atomically: a crash mid-write never leaves a corrupt file."""

import json

import pytest
import torch

from fl_app.checkpoint import load_checkpoint, save_checkpoint, write_json_atomic


def test_checkpoint_round_trip_and_crash_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "server": {"w": torch.ones(3)}})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"round": 2, "server": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["round"] == 1 and torch.equal(loaded["server"]["w"], torch.ones(3))


def test_results_json_is_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"round": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError):
        write_json_atomic(path, {"round": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"round": 1}
