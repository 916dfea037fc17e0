"""Experiment tracking (config ``tracker``): TensorBoard events and an MLflow run beside results.json
hold the same per-step losses, per-round dev values and test values as results.json (read back with
each tool's own reader); a missing package is refused before the run, naming the field."""

import json
import warnings
from pathlib import Path

import pytest

from fl_app import preflight
from fl_app.config import make_config, read_scenario
from fl_app.train import run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = read_scenario(ROOT / "sim_configs" / "smoke_tiny.toml")


def _run(tmp_path: Path, **overrides) -> tuple[Path, dict]:
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run(make_config({**SMOKE, **overrides, "out-dir": str(out)}), out)
    return out, json.loads(json.dumps(results, default=float))


def _expected(results: dict) -> dict[str, list[tuple[int, float]]]:
    dev = [e for e in results["eval"]["history"] if e["round"] > 0]
    last = results["rounds"][-1]["round"]
    return {
        "train/loss": [(i, h["train_loss"]) for i, h in enumerate(results["history"])],
        "dev/accuracy": [(e["round"], e["accuracy"]) for e in dev],
        "dev/loss": [(e["round"], e["loss"]) for e in dev],
        "round/bytes_up": [(r["round"], r["bytes_up"]) for r in results["rounds"]],
        "test/accuracy": [(last, results["eval"]["test"]["accuracy"])],
        "test/swap_gained": [(last, results["eval"]["test"]["swap"]["gained"])],
    }


def test_tensorboard_events_hold_what_results_json_holds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = _run(tmp_path, tracker="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for name, expected in _expected(results).items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in got] == [step for step, _ in expected], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), name  # float32 events
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_an_mlflow_run_holds_what_results_json_holds_and_the_config(tmp_path):
    import mlflow

    out, results = _run(tmp_path, tracker="mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("hosl").experiment_id])
    for name, expected in _expected(results).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id, name))
        assert [step for step, _ in history] == [step for step, _ in expected], name
        assert [v for _, v in history] == pytest.approx([v for _, v in expected]), name
    assert found.data.params["mode"] == "hosl" and found.data.params["tracker"] == "mlflow"
    assert found.info.status == "FINISHED"


@pytest.mark.slow
def test_a_tuning_run_logs_each_trial_under_its_own_prefix(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, results = _run(
        tmp_path, tracker="tensorboard", **{"tune-trials": 2, "tune-rounds": 1, "num-rounds": 1, "eval-test": False}
    )
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"trial1/dev/accuracy", "trial2/dev/accuracy", "dev/accuracy"} <= tags
    trial_one = results["tuning"]["trials"][0]["rounds"][0]["accuracy"]
    assert events.Scalars("trial1/dev/accuracy")[0].value == pytest.approx(trial_one)


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(monkeypatch):
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"tracker = mlflow needs the package 'mlflow': pip install -e '.\[track\]'"):
        preflight.check_tracker(make_config({**SMOKE, "tracker": "mlflow"}))
    preflight.check_tracker(make_config({**SMOKE, "tracker": "none"}))  # nothing to check
    with pytest.raises(ValueError, match="tracker"):
        make_config({**SMOKE, "tracker": "wandb"})


@pytest.mark.slow
def test_the_mlflow_store_stays_in_a_run_folder_whose_path_has_uri_characters_and_home_stays_clean(tmp_path):
    """Issue 44 item 8: ``?``, ``#`` and ``%`` in out-dir cannot move or break the store, and MLflow's
    telemetry writes nothing under the user's home (off unless MLFLOW_DISABLE_TELEMETRY says otherwise)."""
    import os
    import sqlite3
    import subprocess
    import sys

    out, home = tmp_path / "runs?x#y%20z" / "run", tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"HOME": str(home)}
    cmd = [sys.executable, "-m", "fl_app.train", str(ROOT / "sim_configs" / "smoke_tiny.toml"), "--out", str(out)]
    done = subprocess.run([*cmd, "--set", "tracker=mlflow"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    with sqlite3.connect(out / "mlflow.db") as db:
        (steps,) = db.execute("select count(*) from metrics where key = 'train/loss'").fetchone()
    assert steps == len(results["history"]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "runs?x#y%20z"]  # nothing written beside
    assert [p for p in home.rglob("*") if p.name in ("mlflow", "telemetry.json")] == []  # was ~/.config/mlflow/...
