"""benchmarks.estimator_cost on the tiny model: per step, a one-sided estimate costs Q + 1 client
forwards and Q server scorings against two-point's 2Q + 1 and 2Q, and at most 0.6x its bytes up."""

import json

import pytest

import benchmarks.estimator_cost as cost

SMOKE = "sim_configs/smoke_tiny.toml"


@pytest.mark.slow
def test_one_sided_costs_q_plus_one_forwards_q_scorings_and_under_0_6x_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "VARIANTS", {name: {"zo-estimator": name} for name in ("two-point", "one-sided")})
    out = tmp_path / "estimator_cost"
    cost.main(["--scenario", SMOKE, "--queries", "4", "--steps", "1", "--repeats", "1", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.with_suffix(".json").read_text())["data"]}
    two, one = rows["two-point"], rows["one-sided"]
    assert (two["client_forwards"], two["server_scorings"]) == (9, 8)
    assert (one["client_forwards"], one["server_scorings"]) == (5, 4)
    assert one["bytes_up"] <= 0.6 * two["bytes_up"]
    assert "| one-sided | 5 | 4 |" in out.with_suffix(".md").read_text()
