"""A ZO client's personal bottom kept as its own (seed, projected gradient) steps (client-state = seeds):
kilobytes per client, rebuilt exactly by replay wherever the client is served next."""

import pytest
import torch

from fl_app.client_session import ClientSide, NodeSettings, _prepare, make_client, trainable_state
from fl_app.client_store import load_client_state
from fl_app.config import make_config, read_scenario
from fl_app.records import ClientState, SessionRequest, SessionSettings, state_from_records, state_to_records
from fl_app.train import run
from fl_app.zo import unpack_rows

SETTINGS = {**read_scenario("sim_configs/smoke_tiny.toml"), "eval-test": False, "num-rounds": 3}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The smoke scenario with each representation: (results, run folder) per representation."""
    runs = {}
    for kept in ("weights", "seeds"):
        out = tmp_path_factory.mktemp(kept)
        runs[kept] = (run(make_config({**SETTINGS, "client-state": kept}), out), out)
    return runs


def _store(out):
    (folder,) = out.glob("clients/*")
    return folder


def _round_4_session(store, base: str) -> SessionSettings:
    """Client 0's session of round 4, its states in ``store``, starting from session ``base``'s state."""
    return SessionSettings(
        client=0, round=4, token="t", address="a:1", local_steps=1, run_id=store.name, state_dir=str(store), base=base
    )


def test_a_bottom_kept_as_seeds_is_replayed_bit_identically_wherever_it_is_loaded(both):
    results, out = both["seeds"]
    config = make_config({**SETTINGS, "client-state": "seeds"})
    kept = load_client_state(_store(out), 0, 3)
    assert kept.weights == {} and len(kept.updates) == kept.steps == 3 * SETTINGS["local-steps"]
    store = _store(out)
    # the server names the client's last committed session: its state is loaded
    session = _round_4_session(store, kept.session)
    in_memory = ClientSide(config, 0, SETTINGS["num-clients"], kept)  # a node bound to the client
    from_memory = trainable_state(_prepare(SessionRequest(session), in_memory, 3).client)
    anywhere = ClientSide(config, 0, SETTINGS["num-clients"], None, NodeSettings())  # any node: the store
    ready = _prepare(SessionRequest(session), anywhere, 3)
    assert ready.restored_round == 3
    from_disk = trainable_state(ready.client)
    # by hand: the starting bottom, then each of the client's own updates in order
    client, _ = make_client(config, 0, None)
    for lr, seeds, grads, rows in zip(kept.updates.lrs, kept.updates.seeds, kept.updates.grads, kept.updates.rows):
        client.zo.update(seeds, grads, lr=lr, rows=unpack_rows(rows, len(client.zo.params)))
    by_hand = trainable_state(client)
    start = trainable_state(make_client(config, 0, None)[0])
    for name, value in from_memory.items():
        assert torch.equal(value, from_disk[name]) and torch.equal(value, by_hand[name])
    assert any(not torch.equal(v, start[n]) for n, v in from_memory.items())  # it did move
    # the weights the same run kept as weights differ by float rounding only (the walk's perturbations)
    weights = load_client_state(_store(both["weights"][1]), 0, 3).weights
    assert all(torch.allclose(from_memory[n], w, rtol=0, atol=1e-5) for n, w in weights.items())
    assert all(r["state_seconds"] > 0 for r in results["rounds"])  # timed: the replay, per session
    other = [h["train_loss"] for h in both["weights"][0]["history"]]
    assert [h["train_loss"] for h in results["history"]] == pytest.approx(other, abs=1e-4)


def test_a_state_kept_as_seeds_is_kilobytes_on_disk_and_in_node_memory(both):
    sizes = {kept: sum(p.stat().st_size for p in _store(out).rglob("*.pt")) for kept, (_, out) in both.items()}
    assert sizes["seeds"] * 50 < sizes["weights"]
    kept = load_client_state(_store(both["seeds"][1]), 1, 3)
    weights, counters = state_to_records(kept)  # what a one-client node keeps in context.state
    assert weights == {}
    back = state_from_records(weights, counters)
    assert back.updates == kept.updates and back.steps == kept.steps
    assert state_from_records(*state_to_records(ClientState(steps=2))).updates is None


@pytest.mark.parametrize(
    "wrong", [{"mode": "fo-fo"}, {"bottoms": "synced"}, {"client-params": "frozen"}], ids=["fo", "synced", "frozen"]
)
def test_seeds_are_refused_where_a_bottom_is_not_a_personal_zo_one(wrong):
    with pytest.raises(ValueError, match="client-state' = 'seeds'"):
        make_config({**SETTINGS, "client-state": "seeds", **wrong})


@pytest.mark.parametrize("tamper", ["too-many", "nan", "counter"])
def test_a_seeds_state_that_cannot_be_this_runs_is_refused_naming_it_before_any_replay(both, tmp_path, tamper):
    """Issue 44 item 5: replay is bounded by the steps the run can have taken, and a state with a
    non-finite rate or gradient, or a step counter that disagrees, is refused naming its file."""
    import math

    from fl_app.checkpoint import CheckpointRefused, load_checkpoint, save_checkpoint
    from fl_app.records import history_from_record, history_to_record

    _, out = both["seeds"]
    source = _store(out) / "client-0"
    (newest,) = sorted(source.glob("round-*.pt"))[-1:]
    payload = load_checkpoint(newest)
    updates = history_from_record(payload["updates"])
    if tamper == "too-many":  # ten times the steps 3 rounds of 3 can take
        for _ in range(9):
            updates.extend(1, 0, updates.lrs[:9], updates.seeds[:9], updates.grads[:9], updates.rows[:9])
        payload["steps"] = len(updates)
    elif tamper == "nan":
        updates.grads[4] = [math.nan] * len(updates.grads[4])
    else:
        payload["steps"] += 1
    payload["updates"] = history_to_record(updates)
    store = tmp_path / "run" / "clients" / "store"
    payload["run_id"] = store.name  # a state of the run it is read in: only the tampering is wrong
    save_checkpoint(store / "client-0" / newest.name, payload)
    config = make_config({**SETTINGS, "client-state": "seeds"})
    session = _round_4_session(store, payload["session"])
    side = ClientSide(config, 0, SETTINGS["num-clients"], None, NodeSettings())
    expected = {"too-many": "more than the run can have taken", "nan": "step 4 has a rate", "counter": "step counter"}
    with pytest.raises(CheckpointRefused, match=expected[tamper]) as refused:
        _prepare(SessionRequest(session), side, 3)
    assert tamper == "too-many" or newest.name in str(refused.value)  # the file is named


def test_a_state_another_run_wrote_is_refused_naming_its_file(both, tmp_path):
    """Issue 44 item 5: a client state copied into another run's folder is not replayed silently."""
    import shutil

    from fl_app.checkpoint import CheckpointRefused

    _, out = both["seeds"]
    (newest,) = sorted((_store(out) / "client-0").glob("round-*.pt"))[-1:]
    store = tmp_path / "run" / "clients" / "otherrun1234"
    (store / "client-0").mkdir(parents=True)
    shutil.copy(newest, store / "client-0" / newest.name)
    config = make_config({**SETTINGS, "client-state": "seeds"})
    session = _round_4_session(store, newest.name.removesuffix(".pt").split("-")[-1])
    side = ClientSide(config, 0, SETTINGS["num-clients"], None, NodeSettings())
    with pytest.raises(CheckpointRefused, match=f"{newest.name} is a client state of run '{_store(out).name}'"):
        _prepare(SessionRequest(session), side, 3)
