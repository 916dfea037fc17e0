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
