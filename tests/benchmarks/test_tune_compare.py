"""The tuning study over seeds (benchmarks.tune_compare) on the tiny model, with the local runner in
place of `flwr run`: every (task, seed, row) runs once and is read back after, the speed-ups are
per seed, the paired gradmatch - random verdict follows the numbers, the report and plot are written."""

import json
import shutil
from pathlib import Path

import pytest

import benchmarks.tune_compare as tune_compare
from benchmarks.ledger import Ledger
from fl_app.config import make_config, read_scenario, scenario_config
from fl_app.scenario import majority_test_accuracy, sample_and_partition
from fl_app.train import run

SCENARIO = Path(__file__).resolve().parents[2] / "sim_configs" / "tune_tiny.toml"
SMALL = ["tune-trials=1", "tune-rounds=2", "num-rounds=1", "n-train=64", "n-dev=16", "n-test=16", "eval-examples=16"]


def local_simulation(scenario: Path, overrides: list[str], supernodes: int) -> dict:
    """What `flwr run` would return, from the local runner (the same training loop)."""
    keys = read_scenario(scenario)
    keys.update(dict(o.split("=", 1) for o in overrides))
    out = Path(keys.pop("out-dir"))
    return run(make_config(keys), out)


@pytest.mark.slow
def test_study_over_seeds_runs_each_row_once_and_reports_spread(tmp_path, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[1])
        return local_simulation(*args)

    monkeypatch.setattr(tune_compare, "run_simulation", counted)
    rows = tune_compare.rows_of([0.5], ["random", "gradmatch"])
    args = (SCENARIO, ["sst2"], [0, 1], rows, tmp_path / "runs", 2, SMALL)
    study = tune_compare.measure(*args)
    assert len(calls) == 2 * 3 and {f"seed={s}" for s in (0, 1)} <= {o for c in calls for o in c}
    for seed, found in study["sst2"].items():
        assert [r["run"] for r in found] == ["full", "random 50%", "gradmatch 50%"]
        assert found[0]["speed_up"] == 1.0 and found[0]["test_vs_full"] == 0.0
        saved = json.loads((tmp_path / "runs" / "sst2" / f"s{seed}" / "gradmatch_50pct" / "results.json").read_text())
        assert saved["config"]["seed"] == seed and saved["config"]["subset-selector"] == "gradmatch"
        assert found[2]["test"] == saved["tuning"]["final"]["test_accuracy"]
        assert found[2]["gradmatch_error"] is not None and found[1]["gradmatch_error"] is None

    shutil.rmtree(tmp_path / "runs" / "sst2")  # the run folders are lost (a new machine): the ledger is enough
    assert tune_compare.measure(*args) == study and len(calls) == 6  # read back, not rerun
    tune_compare.measure(SCENARIO, ["sst2"], [0], rows[:1], tmp_path / "runs", 2, [*SMALL, "tune-trials=2"])
    assert len(calls) == 7  # another request in the same folder runs again

    agg = tune_compare.aggregate(study)
    assert [r["test"] for r in agg["sst2"] if r["run"] == "random 50%"][0] == [
        study["sst2"][s][1]["test"] for s in (0, 1)
    ]
    md = tune_compare.report(study, tmp_path / "docs", "--seeds 0 1")
    text = md.read_text()
    assert "| sst2 | gradmatch 50% |" in text and "±" in text and "Measured at commit" in text
    assert "± +" not in text and "± -" not in text  # a standard deviation has no sign
    assert "`python -m benchmarks.tune_compare --seeds 0 1`" in text
    recorded = json.loads(md.with_suffix(".json").read_text())["command"]  # results.md's "Reproduce"
    assert recorded == "python -m benchmarks.tune_compare --out runs/tune --seeds 0 1 --docs docs/results"
    assert (tmp_path / "docs" / "tuning.png").stat().st_size > 1000


def _study(tests: dict[str, list[float]]) -> dict:
    """A study of one task whose rows have the given final test accuracy per seed."""
    by_seed = {}
    for seed in range(len(tests["full"])):
        by_seed[seed] = [
            {"run": name, "test": acc[seed], "speed_up": 1.0, "tuning_seconds": 1.0, "steps": 1, "best_dev": 0.5,
             "pruned": 0, "test_vs_full": 0.0, "gradmatch_error": None, "random_error": None}
            for name, acc in tests.items()
        ]  # fmt: skip
    return {"sst2": by_seed}


def test_verdict_says_gradmatch_wins_only_where_the_paired_difference_clears_two_standard_errors():
    clear = _study({"full": [0.8] * 3, "random 10%": [0.70, 0.72, 0.71], "gradmatch 10%": [0.75, 0.78, 0.76]})
    diffs = tune_compare.paired_differences(clear, "gradmatch", "random")
    assert diffs["sst2 10%"]["diffs"] == pytest.approx([0.05, 0.06, 0.05])
    assert tune_compare.verdict(diffs).startswith("gradmatch beats random on final test at sst2 10%")
    noisy = _study({"full": [0.8] * 3, "random 10%": [0.70, 0.80, 0.71], "gradmatch 10%": [0.75, 0.72, 0.74]})
    assert "does not beat" in tune_compare.verdict(tune_compare.paired_differences(noisy, "gradmatch", "random"))
    one_seed = _study({"full": [0.8], "random 10%": [0.70], "gradmatch 10%": [0.90]})
    assert "does not beat" in tune_compare.verdict(tune_compare.paired_differences(one_seed, "gradmatch", "random"))


def test_each_gradmatch_variant_gets_its_own_verdict_against_random():
    study = _study(
        {
            "full": [0.8] * 3,
            "random 10%": [0.70, 0.72, 0.71],
            "gradmatch 10%": [0.70, 0.72, 0.71],
            "gradmatch-pc 10%": [0.75, 0.78, 0.76],
        }
    )
    assert tune_compare.selectors_in(study) == ["random", "gradmatch", "gradmatch-pc"]
    lines = tune_compare.verdicts(study)
    assert lines[0].startswith("gradmatch does not beat random") and lines[1].startswith("gradmatch-pc beats random")


def test_rows_that_chose_the_same_configuration_give_the_noise_floor():
    study = _study({"full": [0.80, 0.70], "random 10%": [0.77, 0.72], "gradmatch 10%": [0.79, 0.71]})
    for seed, runs in study["sst2"].items():
        for i, r in enumerate(runs):
            r["best_params"] = {"client-lr": 1e-4 if i < 2 or seed else 3e-4, "zo-queries": 2}
    gaps = tune_compare.same_choice_gaps(study)
    assert [(g["seed"], g["runs"]) for g in gaps] == [
        (0, ["full", "random 10%"]),
        (1, ["full", "random 10%", "gradmatch 10%"]),
    ]
    assert gaps[0]["gap"] == pytest.approx(0.03) and gaps[1]["gap"] == pytest.approx(0.02)
    assert "differ in final test by up to 3.0 points" in tune_compare.noise_line(study)
    for runs in study["sst2"].values():
        for i, r in enumerate(runs):
            r["best_params"] = {"client-lr": float(i)}
    assert tune_compare.same_choice_gaps(study) == [] and tune_compare.noise_line(study) == ""


def test_a_task_can_run_its_own_selectors_and_finished_rows_come_from_the_ledger(tmp_path, monkeypatch):
    """``--task-selectors rte:random`` runs rte's full and random rows only, sst2 every selector's; a
    row in the ledger with the same request is read from it (nothing here may run)."""
    monkeypatch.setattr(tune_compare, "run_simulation", lambda *_: pytest.fail("a recorded row was run again"))
    seen, real_measure = {}, tune_compare.measure

    def measure(*args):
        seen["study"] = real_measure(*args)
        return seen["study"]

    monkeypatch.setattr(tune_compare, "measure", measure)
    monkeypatch.setattr(
        tune_compare,
        "report",
        lambda study, docs, flags, settings, floors: seen.update(flags=flags, settings=settings, floors=floors),
    )
    ledger = Ledger(tmp_path / "tuning.json")
    for task, selectors in (("sst2", ["random", "gradmatch"]), ("rte", ["random"])):
        for name, selector, fraction in tune_compare.rows_of([0.1], selectors):
            overrides = [f"task={task}", "seed=0", f"subset-selector={selector}", f"subset-fraction={fraction}"]
            key = f"{task}/s0/" + name.replace(" ", "_").replace("%", "pct")
            summary = {**_study({"full": [0.7]})["sst2"][0][0], "run": name, "tuning_seconds": 2.0 - fraction}
            ledger.put(key, {"scenario": SCENARIO.read_text(), "overrides": overrides, "supernodes": 4}, summary)
    common = ["--out", str(tmp_path), "--scenario", str(SCENARIO), "--ledger", str(ledger.path), "--fractions", "0.1"]
    tune_compare.main([*common, "--tasks", "sst2", "rte", "--task-selectors", "rte:random"])
    assert {task: [r["run"] for r in by_seed[0]] for task, by_seed in seen["study"].items()} == {
        "sst2": ["full", "random 10%", "gradmatch 10%"],
        "rte": ["full", "random 10%"],
    }
    assert seen["study"]["rte"][0][1]["speed_up"] == pytest.approx(1.0 / 1.9)  # full / random tuning seconds
    assert "--task-selectors rte:random" in seen["flags"]
    assert seen["settings"] == {"subset-reselect-every": 1, "subset-warm-start": 0.0}  # tune_tiny's, for suggestions
    for task in ("sst2", "rte"):  # each task's floor on its own seed's sample
        config = scenario_config(SCENARIO, [f"task={task}", "seed=0"])[0]
        assert seen["floors"][task] == [majority_test_accuracy(config, best_constant=True)]
    monkeypatch.setattr(tune_compare, "measure", lambda *_: seen["study"])  # tasks that disagree on a setting:
    tune_compare.main([*common, "--tasks", "sst2", "rte", "--task-set", "rte:subset-warm-start=0.2"])
    assert seen["settings"] == {"subset-reselect-every": 1}  # the suggestions quote only what every task shares
    bad_args = (
        ["--task-selectors", "rte:randm"],
        ["--set", "subset-fraction=2"],
        ["--set", "bogus=1"],
        ["--task-set", "rte:max-length=abc"],
        ["--task-set", "cb:max-length=128"],  # cb is not one of --tasks
        ["--tasks", "rte", "nosuchtask"],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):  # a selector or setting that cannot be fails before anything runs
            tune_compare.main([*common, "--tasks", "rte", *bad])


def test_when_gradmatch_does_not_win_the_report_says_what_the_measurements_suggest():
    study = _study({"full": [0.80, 0.70], "random 10%": [0.77, 0.72], "gradmatch 10%": [0.79, 0.66]})
    for seed, runs in study["sst2"].items():
        for i, r in enumerate(runs):
            gm, alike = r["run"].startswith("gradmatch"), seed == 0 and i < 2  # only these two chose alike
            r.update(best_params={"client-lr": 1e-4 if alike else i + 10 * seed}, tuning_seconds=100.0)
            r.update(selection_seconds=25.0 if gm else 0.0)
            r.update(gradmatch_error=0.5 if gm else None, random_error=2.0 if gm else None, speed_up=4.0 if gm else 5.0)
    line = tune_compare.suggestions(study, {"subset-reselect-every": 1, "subset-warm-start": 0.0})
    assert "4.0x closer to the full sum" in line and "selection takes 25% of a GradMatch study's tuning time" in line
    # paired gaps +2 and -6 points against a noise floor of 3 (seed 0: full and random chose alike, 0.80 vs 0.77)
    assert (
        "1 of 2 paired gaps to random (seed by seed) are within the noise floor (3.0 points); of the 1 beyond" in line
    )
    assert "it, 1 favour random (largest 6.0 points)" in line
    assert "(4.0x) is below random's (5.0x) on the same task" in line and "subset-reselect-every = 1 here" in line
    assert "subset-warm-start = 0 here" in line
    assert "warm-start" not in tune_compare.suggestions(study, {"subset-reselect-every": 3, "subset-warm-start": 0.2})
    assert "warm-start" not in tune_compare.suggestions(study, {"subset-reselect-every": 1})  # tasks disagreed
    for runs in study["sst2"].values():
        runs[2]["speed_up"] = 6.0
    assert "(6.0x) is not below random's (5.0x)" in tune_compare.suggestions(study)
    study["sst2"][0][2]["gradmatch_error"] = study["sst2"][1][2]["gradmatch_error"] = 4.0
    assert "better than chance: a GradMatch subset's weighted proxy sum is 2.0x farther from the full sum" in (
        tune_compare.suggestions(study)
    )
    for seed, runs in study["sst2"].items():
        runs[2]["test"] = runs[1]["test"] + 0.05 + 0.01 * seed  # gradmatch now wins on both seeds, clearly
    assert tune_compare.suggestions(study) == ""


def test_the_floor_is_the_best_constant_answer_on_the_seeds_test_split():
    """RTE at 256 training examples, seed 0: the training sample's majority label is the test split's
    minority one, so the best constant answer (the floor the tuning report uses) scores more."""
    config = scenario_config(tune_compare.SCENARIO, ["task=rte", "n-train=256", "seed=0"])[0]
    splits, _ = sample_and_partition(config)
    test = [ex.label for ex in splits["test"]]
    shares = {label: test.count(label) / len(test) for label in set(test)}
    best, majority = majority_test_accuracy(config, best_constant=True), majority_test_accuracy(config)
    assert best == max(shares.values()) and majority in shares.values() and majority < best


def test_the_floor_line_says_where_no_row_learned_the_task():
    def agg(tests: dict[str, list[float]]) -> dict:
        return tune_compare.aggregate(_study(tests))

    floors = {"sst2": [0.5, 0.5, 0.5]}
    learned = agg({"full": [0.80, 0.82, 0.81], "random 10%": [0.75, 0.77, 0.76], "gradmatch 10%": [0.7, 0.72, 0.71]})
    line = tune_compare.floor_line(learned, floors)
    assert "no model) on test: sst2 50.0 (seed mean)" in line and "Every row beats it on sst2." in line
    some = agg({"full": [0.80, 0.82, 0.81], "random 10%": [0.51, 0.50, 0.52], "gradmatch 10%": [0.7, 0.45, 0.6]})
    assert "On sst2, random 10%, gradmatch 10% do not beat it." in tune_compare.floor_line(some, floors)
    none = agg({"full": [0.50, 0.52, 0.51], "random 10%": [0.51, 0.50, 0.52], "gradmatch 10%": [0.5, 0.53, 0.51]})
    assert "No row beats it on sst2" in tune_compare.floor_line(none, floors)
    assert "sst2's selector comparison says nothing about selection" in tune_compare.floor_line(none, floors)
