"""The ZO-bottom study (benchmarks.zo_bottom) in miniature on the tiny encoder: every phase runs,
picks go by dev cross-entropy with grid edges said, finished runs are read back from the ledger."""

import json
import subprocess
import sys

import pytest

import benchmarks.zo_bottom as study
from benchmarks.ledger import Ledger


def _miniature(monkeypatch):
    """Every run on the tiny encoder, 16 dev and test examples, 2 rounds of 2 steps."""
    monkeypatch.setattr(
        study, "BASE", {**study.BASE, "model": "tiny-bert", "n-dev": 16, "eval-examples": 16, "n-test": 16}
    )
    monkeypatch.setattr(
        study, "budget", lambda steps, every, batch=16: {"num-rounds": 2, "local-steps": 2, "n-train": 32}
    )


def _summary(dev_loss, correct):
    return {"dev_loss": [1.0, dev_loss], "test_correct": correct}


def test_pick_goes_by_late_dev_cross_entropy_and_says_when_it_is_at_an_edge():
    runs = {1e-4: _summary(0.5, []), 3e-4: _summary(0.4, []), 1e-3: _summary(0.45, [])}
    assert study.pick(runs) == (3e-4, "")
    assert study.pick({**runs, 1e-3: _summary(0.3, [])}) == (1e-3, "at the edge of its grid")
    assert study.pick({**runs, 1e-3: None}) is None  # a run not finished yet: no pick
    assert study.pick({1e-4: _summary(float("nan"), []), 3e-4: _summary(0.9, [])}) == (3e-4, "of a two-point grid")
    lucky = {"dev_loss": [0.9, 0.9, 0.2]}  # lowest last evaluation, high before it
    steady = {"dev_loss": [0.4, 0.4, 0.4]}
    assert study.pick({"lucky": lucky, "steady": steady})[0] == "steady"
    assert study.late_loss({"dev_loss": [5.0, 0.3, 0.4, 0.5]}) == pytest.approx(0.4)  # the last three only


def test_the_cut_is_the_largest_headroom_that_clears_two_standard_errors(monkeypatch):
    monkeypatch.setattr(study, "CUTS", (1, 2, 4))
    h = lambda points, se: {"headroom": {"points": points, "se": se}}  # noqa: E731
    assert study.chosen_cut({"cut1": h(3.0, 1.0), "cut2": h(5.0, 3.0), "cut4": h(4.0, 1.5)})[0] == 4
    cut, why = study.chosen_cut({"cut1": h(1.0, 1.0), "cut2": h(2.0, 3.0), "cut4": h(0.5, 1.5)})
    assert cut == 2 and why.startswith("no cut")
    assert study.chosen_cut({"cut1": h(1.0, 1.0)}) is None


def _curve(losses, drift):
    return {
        "dev_loss": losses,
        "drift": [{"activations": d, "params": d} for d in drift],
        "swaps": [None] * len(losses),
    }


def test_stability_needs_every_seed_within_the_spread_a_drift_slower_than_the_steps_and_no_flag():
    steady = [0.5, 0.45, 0.42, 0.40, 0.40, 0.39]
    runs = {  # the spread is the frozen bottom's: 0.0141
        "long/frozen/s0": _curve([0.5, 0.4, 0.4, 0.4, 0.4, 0.4], [0.0] * 6),
        "long/frozen/s1": _curve([0.5, 0.4, 0.4, 0.42, 0.42, 0.42], [0.0] * 6),
        "long/hosl-full/s0": _curve(steady, [0.1, 0.14, 0.17, 0.19, 0.21, 0.22]),
        "long/hosl-full/s1": _curve([x + 0.02 for x in steady], [0.1, 0.14, 0.17, 0.19, 0.21, 0.23]),
    }
    got = study.stability(runs, "long", "hosl-full", (0, 1, 2))  # seed 2 not finished: judged on two
    assert got["stable"] and len(got["rises"]) == 2 and got["rises"][0] == pytest.approx((1.19 - 1.37) / 3)
    assert got["drifts"][0] == (0.17, 0.22) and got["flagged"] == {}
    rising = {**runs, "long/hosl-full/s1": _curve([0.5, 0.45, 0.42, 0.5, 0.55, 0.6], [0.1, 0.14, 0.17, 0.19, 0.2, 0.2])}
    assert not study.stability(rising, "long", "hosl-full", (0, 1))["stable"]  # rose by more than the spread
    walking = {**runs, "long/hosl-full/s1": _curve(steady, [0.01, 0.02, 0.05, 0.08, 0.1, 0.11])}
    assert not study.stability(walking, "long", "hosl-full", (0, 1))["stable"]  # drift more than doubled
    blown = {**runs, "long/hosl-full/s1": _curve([0.3, 0.3, 0.3, 0.6, 0.6, 0.6], [0.1, 0.1, 0.1, 0.5, 0.55, 0.55])}
    got = study.stability(blown, "long", "hosl-full", (0, 1))
    assert not got["stable"] and list(got["flagged"]) == [1] and 4 in got["flagged"][1]
    assert "**not stable**" in study._stability_line(blown, "long", "hosl-full", (0, 1))[0]
    assert got["spread"] == pytest.approx(0.02 / 2**0.5)
    assert study.stability({**runs, "long/hosl-full/s1": None}, "long", "hosl-full", (0, 1)) is None
    assert study.stability({**runs, "long/frozen/s1": None}, "long", "hosl-full", (0, 1)) is None


@pytest.mark.slow
def test_every_phase_runs_in_miniature_and_reads_back_from_its_ledger(tmp_path, monkeypatch):
    _miniature(monkeypatch)
    monkeypatch.setattr(study, "CUTS", (1, 2))
    monkeypatch.setattr(study, "SEEDS", (0, 1))
    first = {kind: (keys, dict(list(grid.items())[:1])) for kind, (keys, grid) in study.PILOT.items()}
    monkeypatch.setattr(study, "PILOT", first)  # one run per kind: every kind still picks and runs long
    ledger = Ledger(tmp_path / "ledger.json")
    data = study.measure("long", tmp_path / "runs", 1, ledger)
    assert set(data["headroom"]) == {"cut1", "cut2"} and data["cut"]["cut"] in (1, 2)
    assert set(data["pilot"]["picks"]) == set(study.PILOT)
    assert len(data["pilot"]["runs"]) == sum(len(grid) for _, grid in study.PILOT.values())
    picked = data["pilot"]["picks"]["hosl-lora"]
    assert picked["keys"] == study.PILOT["hosl-lora"][1][picked["run"]]
    assert len(data["long"]) == 2 * (2 + len(study.LONG_KINDS)) and all(r is not None for r in data["long"].values())
    bitfit = data["pilot"]["runs"]["pilot/hosl-bitfit/lr0.001/cosine"]
    assert bitfit["drift"][-1]["params"] > 0 and not any("bitfit" in name for name in data["long"])
    hosl = data["long"]["long/hosl-full/s0"]
    assert len(hosl["test_correct"]) == 16 and hosl["test_swap"]["count"] == 16 and hosl["drift"][-1]["params"] > 0
    assert data["long"]["long/frozen/s0"]["drift"][-1]["params"] == 0.0
    again = study.measure("long", tmp_path / "runs", 0, Ledger(tmp_path / "ledger.json"))  # nothing runs
    assert again["long"] == data["long"] and again["cut"] == data["cut"]
    text = study.report(again)
    assert "## 3. Long budget" in text and "hosl-full over 2 seeds" in text and "share of the headroom" in text
    assert "The study's cut" in text
    lines = study.headline(again)
    assert lines[0].startswith("headroom fo-fo - frozen bottom") and any("hosl-lora over 2 seeds" in x for x in lines)
    figure = study.plot(again, tmp_path / "zo_bottom.png")
    assert figure.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_smollm2_phase_runs_alone_in_miniature(tmp_path, monkeypatch):
    _miniature(monkeypatch)
    monkeypatch.setattr(study, "SMOL", {**study.SMOL, "model": "tiny-llama", "cut-layer": 2})
    ledger = Ledger(tmp_path / "ledger.json")
    data = study.measure("smollm2", tmp_path / "runs", 1, ledger)
    assert all(r is None for e in data["headroom"].values() for r in e["runs"].values())  # MiniLM: not run
    found = data["smollm2"]
    assert set(found["pilot"]["picks"]) == {"fo-fo", "hosl"}
    assert len(found["long"]) == 4 * len(study.SMOL_SEEDS) + 1 and all(r is not None for r in found["long"].values())
    assert "smollm2/long/fo-fo-constant/s0" in found["long"]  # the pilot's pick at a constant rate, beside
    assert found["long"]["smollm2/long/frozen/s0"]["drift"][-1]["params"] == 0.0
    assert found["long"]["smollm2/long/hosl/s0"]["drift"][-1]["params"] > 0
    again = study.measure("long", tmp_path / "runs", 0, Ledger(tmp_path / "ledger.json"))  # read back, not run
    assert again["smollm2"]["long"] == found["long"]
    assert "## 5. SmolLM2" in study.report(again)
    assert any(line.startswith(f"SmolLM2: hosl over {len(study.SMOL_SEEDS)} seeds") for line in study.headline(again))


def test_the_report_judges_every_run_again_with_the_current_divergence_rule():
    from benchmarks.zo_bottom import diverging_rounds

    run = {  # its cut activations ran away as dev loss rose
        "dev_loss": [0.35, 0.30, 0.45, 0.60],
        "drift": [{"params": 1.0, "activations": 0.10}, {"params": 2.0, "activations": 0.12},
                  {"params": 3.0, "activations": 0.50}, {"params": 4.0, "activations": 1.00}],
        "swaps": [None] * 4,
    }  # fmt: skip
    assert diverging_rounds(run) == [3, 4]
    steady = {**run, "dev_loss": [0.35, 0.30, 0.29, 0.28]}
    assert diverging_rounds(steady) == []


@pytest.mark.slow
def test_the_six_task_phase_runs_each_task_at_the_long_phases_settings(tmp_path, monkeypatch):
    _miniature(monkeypatch)
    monkeypatch.setattr(study, "CUTS", (1,))
    monkeypatch.setattr(study, "SERVER_LRS", (2e-4,))
    monkeypatch.setattr(study, "FOFO_LRS", (0.01,))
    monkeypatch.setattr(study, "SEEDS", (0,))
    monkeypatch.setattr(study, "TASKS", ("cb",))
    kinds = ("hosl-full", "zo-zo")  # the kinds the tasks phase runs, one pilot run each
    monkeypatch.setattr(
        study, "PILOT", {k: (study.PILOT[k][0], dict(list(study.PILOT[k][1].items())[:1])) for k in kinds}
    )
    ledger = Ledger(tmp_path / "ledger.json")
    assert "tasks" not in study.measure("long", tmp_path / "runs", 1, ledger)  # the tasks phase is asked for
    data = study.measure("tasks", tmp_path / "runs", 1, ledger)
    assert set(data["tasks"]) == {f"tasks/cb/{k}/s0" for k in study.TASK_KINDS}
    cut, server_lr = data["cut"]["cut"], data["cut"]["server_lr"]
    hosl = ledger.entries["tasks/cb/hosl-full/s0"]["request"]
    pick = data["pilot"]["picks"]["hosl-full"]["keys"]
    assert hosl["task"] == "cb" and hosl["max-length"] == 128 and hosl["cut-layer"] == cut
    assert hosl["server-lr"] == server_lr and hosl["client-lr"] == pick["client-lr"] and hosl["seed"] == 0
    zozo = ledger.entries["tasks/cb/zo-zo/s0"]["request"]
    assert zozo["mode"] == "zo-zo" and zozo["server-lr"] == zozo["client-lr"]
    assert set(data["tasks_majority"]) == {"cb"} and all(0 < m < 1 for m in data["tasks_majority"].values())
    again = study.measure("long", tmp_path / "runs", 0, Ledger(tmp_path / "ledger.json"))  # read back, not run
    assert again["tasks"] == data["tasks"]
    text = study.report(again)
    assert "## 4. Six tasks" in text and "| cb |" in text and "Dev cross-entropy at each evaluation" in text
    assert any(line.startswith("six tasks at") for line in study.headline(again))
    r = data["tasks"]["tasks/cb/fo-fo/s0"]
    assert study.learned_task({**r, "test": 1.0, "test_correct": [1] * 16}, 0.5)
    assert not study.learned_task({**r, "test": 0.51, "test_correct": [1] * 8 + [0] * 8}, 0.5)


TINY_RUN = {
    "model": "tiny-bert",
    "n-dev": 16,
    "eval-examples": 16,
    "n-test": 16,
    "num-rounds": 3,
    "local-steps": 2,
    "n-train": 96,
    "mode": "hosl",
}
DIE_AT_SECOND_CHECKPOINT = """
import os, sys; from pathlib import Path; import fl_app.coordinator as c; save = c.save_checkpoint; saved = []
def save_then_die(*a, **k):
    save(*a, **k); saved.append(1)
    if len(saved) == 2: os._exit(9)
c.save_checkpoint = save_then_die
import benchmarks.zo_bottom as study; study._run(Path(sys.argv[1]), "cut", study.TINY)
"""


@pytest.mark.slow
def test_a_run_cut_off_mid_way_continues_from_its_last_round_to_the_uninterrupted_result(tmp_path):
    """A study run killed after round 2's checkpoint (as a session's end kills it) continues from there
    when the study runs it again, and ends where a run never cut off ends."""
    whole = study._run(tmp_path, "whole", TINY_RUN)
    code = DIE_AT_SECOND_CHECKPOINT.replace("study.TINY", repr(TINY_RUN))
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=study.ROOT, capture_output=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert cut["status"] == "running" and len(cut["rounds"]) < 3
    again = study._run(tmp_path, "cut", TINY_RUN)
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"][0]["after_round"] == 2
    for key in ("dev_loss", "drift", "test_correct", "test_swap", "zo_grad_abs"):
        assert again[key] == whole[key], key
    fresh = study._run(tmp_path, "cut", {**TINY_RUN, "seed": 1})  # other settings: starts afresh
    assert "resumed" not in json.loads((tmp_path / "cut" / "results.json").read_text()) and fresh["dev_loss"]


def test_the_shipped_long_scenario_is_the_studys_hosl_run_that_stayed_stable(tmp_path):
    """sim_configs/sst2_minilm_long.toml is the run the committed ledger holds as long/hosl-full (client
    states on disk aside), and the study judges that kind stable on every seed."""
    from fl_app.config import make_config, read_scenario

    ledger = Ledger(study.ROOT / "docs/results/ledgers/zo_bottom.json")
    scenario = read_scenario(study.ROOT / "sim_configs/sst2_minilm_long.toml")
    for seed in study.SEEDS:
        wanted = dict(make_config({**scenario, "seed": seed, "client-checkpoints": False}))
        assert ledger.get(f"long/hosl-full/s{seed}", wanted) is not None, seed
    data = study.measure("long", tmp_path, 0, ledger)  # read back, nothing runs
    assert study.stability(data["long"], "long", "hosl-full", study.SEEDS)["stable"]
