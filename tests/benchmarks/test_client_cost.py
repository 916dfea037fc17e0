"""benchmarks.client_cost on the tiny model: a client step's time split by fl_app.step_timing's
sections (and the link's waits), per variant, in a report with every variant's row."""

import json
from pathlib import Path

import pytest

import benchmarks.client_cost as cost
from fl_app import step_timing

SMOKE = str(Path(__file__).resolve().parents[2] / "sim_configs" / "smoke_tiny.toml")


def test_sections_are_timed_only_inside_a_recording_and_recordings_nest():
    with step_timing.section("forward"):
        pass  # no recording open: nothing to record into, nothing fails
    with step_timing.recording() as outer:
        with step_timing.section("forward"):
            pass
        with step_timing.recording() as inner:
            with step_timing.section("passes"):
                pass
        with step_timing.section("forward"):
            pass
    assert set(outer) == {"forward"} and outer["forward"] > 0  # the inner recording took "passes"
    assert set(inner) == {"passes"}
    with step_timing.section("forward"):
        pass
    assert set(outer) == {"forward"}  # closed: no longer written to


def test_a_zo_step_is_split_into_generation_passes_forwards_and_waiting():
    got = cost.measure_variant(SMOKE, {"zo-directions": "rademacher"}, steps=2)
    full, alone = got["full"], got["client_only"]
    assert full["forward"] > 0 and full["passes"] > 0 and full["wait"] > 0
    assert 0 < full["generate"] <= full["passes"]  # one thread draws rademacher chunks, inside the passes
    assert full["forward"] + full["passes"] + full["wait"] <= full["mean_step"] * 1.01
    assert alone["forward"] > 0 and got["floor"] > 0 and got["server_floor"] > 0 and got["queries"] == 2


@pytest.mark.parametrize("overrides", [{"mode": "fo-fo"}, {"hosl-feedback": "gradient"}])
def test_steps_that_get_a_cut_gradient_back_are_timed_too(overrides):
    got = cost.measure_variant(SMOKE, overrides, steps=2)
    assert got["full"]["forward"] > 0 and got["client_only"]["wait"] > 0 and got["server_floor"] > 0
    if overrides.get("mode") == "fo-fo":
        assert got["floor"] is None and got["queries"] is None and got["full"]["passes"] == 0


@pytest.mark.slow
def test_the_report_has_a_row_per_variant_each_timed_in_its_own_process(tmp_path, monkeypatch):
    keep = [cost.MEZO_ROW, "rademacher, batch rows (default)", "fo-fo (client SGD)"]
    monkeypatch.setattr(cost, "VARIANTS", {name: cost.VARIANTS[name] for name in keep})
    cost.main(["--scenario", SMOKE, "--steps", "1", "--repeats", "1", "--out", str(tmp_path / "client_cost")])
    rows = json.loads((tmp_path / "client_cost.json").read_text())["data"]
    assert [r["variant"] for r in rows] == keep
    text = (tmp_path / "client_cost.md").read_text()
    assert all(f"| {name} |" in text for name in keep) and "| 1.00x |" in text  # MeZO's row against itself
    assert (tmp_path / "client_cost.png").read_bytes()[:4] == b"\x89PNG"
