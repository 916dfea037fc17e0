"""The client-state benchmark (benchmarks.client_state) in miniature, on the tiny model."""

from benchmarks.client_state import MULTIPLES, measure, report
from fl_app.config import read_scenario


def test_load_and_replay_are_measured_side_by_side_with_the_states_bytes():
    found = measure(read_scenario("sim_configs/smoke_tiny.toml"), steps=2, repeats=1)
    assert set(found["seconds"]) == {"load weights", *(f"replay {2 * m} steps" for m in MULTIPLES)}
    assert all(s > 0 for s in found["seconds"].values()) and found["ratio_to_load"]["load weights"] == 1.0
    assert found["bytes"]["seeds"] * 20 < found["bytes"]["weights"]
    text = report(found, "sim_configs/smoke_tiny.toml")
    assert "| load weights |" in text and "KiB as seeds" in text
