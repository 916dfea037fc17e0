"""The estimator study (benchmarks.zo_estimators): the gate picks its setting, the pre-registered rule
judges the main table, and the whole study runs in miniature and reads back from its ledger."""

import random

import pytest

import benchmarks.zo_bottom as bottom_study
import benchmarks.zo_estimators as study
from benchmarks.ledger import Ledger


def _verdict(points, cleared, frozen="gate/minilm/cut1/frozen/s-lr0.0002"):
    return {"headroom": {"points": points, "se": 1.0}, "cleared": cleared, "frozen": frozen}


def test_the_setting_is_the_largest_cleared_headroom_else_the_fallback():
    gate = {"minilm/cut5": {"verdict": _verdict(3.5, True)}, "minilm/cut6": {"verdict": _verdict(6.0, True)}}
    gate["smollm2/cut15"] = {"verdict": _verdict(9.0, False)}
    assert study.chosen_setting(gate)[0] == "minilm/cut6"
    none = {k: {"verdict": {**v["verdict"], "cleared": False}} for k, v in gate.items()}
    assert study.chosen_setting(none)[0] == study.FALLBACK
    assert study.chosen_setting({**gate, "smollm2/cut20": {"verdict": None}}) is None  # the gate is running
    assert study.server_rate("minilm/cut6", gate) == 2e-4
    tie = {
        "smollm2/cut15": {"verdict": _verdict(7.2, True)},
        "minilm/cut6": {"verdict": _verdict(7.199999999999999, True)},
    }
    assert study.chosen_setting(tie)[0] == "minilm/cut6"  # equal headrooms: the cheaper model


def _run(correct, drift=0.1, dev_loss=0.4):
    return {
        "test_correct": correct,
        "dev_loss": [dev_loss] * 6,
        "drift": [{"activations": drift, "params": drift}] * 6,
        "swaps": [None] * 6,
        "seconds": 600.0,
    }


def _main_runs(hosl_right: int, n: int = 400, diverge_seed: int | None = None):
    """Per seed: frozen right on 300 of n, fo-fo on 320 (+5 points), hosl on ``hosl_right``."""
    rng = random.Random(0)
    runs = {}
    for seed in study.SEEDS:
        order = list(range(n))
        rng.shuffle(order)

        def right(k, order=order):
            chosen = set(order[:k])
            return [int(i in chosen) for i in range(n)]

        runs[f"main/frozen/s{seed}"] = _run(right(300))
        runs[f"main/fo-fo/s{seed}"] = _run(right(320))
        drift = 0.9 if seed == diverge_seed else 0.1
        runs[f"main/hosl-x/s{seed}"] = _run(right(hosl_right + seed % 2), drift=drift)
        if seed == diverge_seed:  # drift more than doubling after half-way: not stable
            runs[f"main/hosl-x/s{seed}"]["drift"] = [{"activations": 0.1, "params": 0.1}] * 3 + [
                {"activations": 0.9, "params": 0.9}
            ] * 3
    return runs


def test_the_pre_registered_rule_needs_both_tests_half_the_headroom_and_stability():
    won = study.verdict(_main_runs(315), "hosl-x")
    assert won["success"] and won["share"][0] >= 0.5 and len(won["seeds"]) == 5
    assert won["over_seeds"]["p"] < 0.05 and won["pooled"]["points"] > 2 * won["pooled"]["se"]
    assert not study.verdict(_main_runs(305), "hosl-x")["success"]  # a quarter of the headroom
    assert not study.verdict(_main_runs(315, diverge_seed=3), "hosl-x")["success"]
    partial = {k: v for k, v in _main_runs(315).items() if not k.endswith("s4")}
    assert not study.verdict(partial, "hosl-x")["success"]  # 4 of 5 seeds: not yet


@pytest.mark.slow
def test_the_study_runs_in_miniature_and_reads_back_from_its_ledger(tmp_path, monkeypatch):
    monkeypatch.setattr(
        bottom_study,
        "BASE",
        {**bottom_study.BASE, "model": "tiny-bert", "n-dev": 16, "eval-examples": 16, "n-test": 16},
    )
    tiny_budget = lambda steps, every, batch=16: {"num-rounds": 2, "local-steps": 2, "n-train": 32}  # noqa: E731
    monkeypatch.setattr(study, "budget", tiny_budget)
    monkeypatch.setattr(study.zo_gate, "measure", lambda *a: {"minilm/cut1": {"verdict": _verdict(4.0, True)}})
    monkeypatch.setattr(
        study, "ESTIMATOR_RATES", {"minilm": {"two-point": (1e-3,), "one-sided": (1e-3,), "sparse": (1e-2,)}}
    )
    monkeypatch.setattr(study, "FOFO_RATES", {"minilm": (1e-3,)})
    monkeypatch.setattr(study, "SMALL_PARTS", {"norms": (1e-2,)})
    monkeypatch.setattr(study, "SMALL_DIFFERENCES", ("one-sided",))
    monkeypatch.setattr(study, "SEEDS", (0, 1))
    monkeypatch.setattr(study, "SERVER_FACTORS", (1.0, 4.0))
    ledger, gate = Ledger(tmp_path / "ledger.json"), Ledger(tmp_path / "gate.json")
    data = study.measure("main", tmp_path / "runs", 1, ledger, gate)
    assert data["setting"]["setting"] == "minilm/cut1" and data["setting"]["server_lr"] == 2e-4
    assert data["pilot"]["pilot/one-sided/lr0.001"] is not None
    assert data["pilot"]["pilot/one-sided-norms/lr0.01"] is not None  # ZO on the norms alone
    picked = data["picked"]
    assert set(picked) == {
        "frozen",
        "fo-fo",
        *(f"hosl-{k}" for k in study.ranked_estimators(data["pilot"], study.picks(data["pilot"]))[:2]),
    }
    assert all(keys["zo-estimator"] for kind, keys in picked.items() if kind.startswith("hosl-"))
    assert len(data["main"]) == 4 * 2 and all(r is not None for r in data["main"].values())
    text = study.report(data)
    assert text.index(study.SUCCESS_RULE) < text.index("## Main phase")
    assert text.count("| hosl-") == 2
    again = study.measure("main", tmp_path / "elsewhere", 0, Ledger(tmp_path / "ledger.json"), gate)
    assert again["main"] == data["main"]  # read back from the ledger: nothing ran
