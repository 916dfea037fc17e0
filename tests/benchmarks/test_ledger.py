"""The ledger of a study's finished runs (benchmarks.ledger): read back only for the same request,
kept across processes in its file, never handing out its own entries to be changed."""

from benchmarks.ledger import Ledger


def test_a_run_is_read_back_only_with_the_request_that_produced_it(tmp_path):
    path = tmp_path / "ledgers" / "study.json"
    Ledger(path).put("sst2/s0/full", {"overrides": ("seed=0",), "lr": 1e-4}, {"test": 0.75})
    again = Ledger(path)  # another session: the file is all there is
    assert again.get("sst2/s0/full", {"overrides": ["seed=0"], "lr": 1e-4}) == {"test": 0.75}
    assert again.get("sst2/s0/full", {"overrides": ["seed=1"], "lr": 1e-4}) is None
    assert again.get("sst2/s1/full", {"overrides": ["seed=0"], "lr": 1e-4}) is None
    assert again.entries["sst2/s0/full"]["ran_at"]["commit"]
    found = again.get("sst2/s0/full", {"overrides": ["seed=0"], "lr": 1e-4})
    found["test"] = 0.0  # a caller adding its own fields (speed-ups) does not change the ledger
    assert Ledger(path).get("sst2/s0/full", {"overrides": ["seed=0"], "lr": 1e-4}) == {"test": 0.75}
    Ledger(path).put("sst2/s1/full", {"overrides": ["seed=1"]}, {"test": 0.7})  # another process, meanwhile
    again.put("sst2/s2/full", {"overrides": ["seed=2"]}, {"test": 0.8})
    assert sorted(Ledger(path).entries) == ["sst2/s0/full", "sst2/s1/full", "sst2/s2/full"]  # none lost
    assert not list(path.parent.glob("*.tmp"))  # written whole: no partial file left
    again.put("sst2/s0/full", {"overrides": ["seed=0"], "lr": 3e-4}, {"test": 0.6})  # another request, same name
    kept = Ledger(path)
    assert kept.get("sst2/s0/full", {"overrides": ["seed=0"], "lr": 3e-4}) == {"test": 0.6}
    earlier = [e for name, e in kept.entries.items() if name.startswith("sst2/s0/full@")]
    assert [e["summary"] for e in earlier] == [{"test": 0.75}]  # the earlier run is kept, not overwritten


def test_a_run_recorded_before_a_setting_existed_is_read_back_while_that_setting_is_at_its_default(tmp_path):
    from fl_app.config import make_config

    ledger = Ledger(tmp_path / "ledger.json")
    now = dict(make_config({"seed": 3}))
    then = {k: v for k, v in now.items() if k not in ("eval-swap", "zo-grad-clip")}  # the run predates two keys
    ledger.put("run", then, {"test": 0.8})
    assert Ledger(tmp_path / "ledger.json").get("run", now) == {"test": 0.8}
    assert ledger.get("run", {**now, "zo-grad-clip": 1.0}) is None  # the new setting changes the run
    assert ledger.get("run", {**now, "seed": 4}) is None
    assert ledger.get("run", {k: v for k, v in now.items() if k != "seed"}) is None  # a setting the run had is gone


def test_a_run_is_found_by_its_request_under_any_name(tmp_path):
    path = tmp_path / "study.json"
    Ledger(path).put("headroom/cut4/frozen", {"seed": 0, "lr": 2e-4}, {"test": 0.84})
    again = Ledger(path)
    assert again.find({"seed": 0, "lr": 2e-4}) == {"test": 0.84}  # another phase's name, the same run
    assert again.find({"seed": 1, "lr": 2e-4}) is None
    again.find({"seed": 0, "lr": 2e-4})["test"] = 0.0
    assert again.find({"seed": 0, "lr": 2e-4}) == {"test": 0.84}  # a copy, as get gives
