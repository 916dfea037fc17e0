"""The flat forms of the synced history, client state and training report round-trip exactly."""

import dataclasses

import pytest
import torch

from fl_app.records import (
    ClientState,
    History,
    TrainReport,
    history_from_record,
    history_to_record,
    state_from_records,
    state_to_records,
)


def history() -> History:
    h = History()
    h.extend(1, 0, 1e-3, [[11, 12, 13], [14, 15, 16]], [[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]], [b"\x01\x02", b""])
    h.extend(2, 3, 5e-4, [[21, 22, 23]], [[1.5, 2.5, -3.5]])
    return h


def test_history_round_trips_and_keeps_rows_and_order():
    original = history()
    record = history_to_record(original)
    assert all(isinstance(v, (int, list)) for v in record.values())  # Flower ConfigRecord values: no nesting
    assert record["h-queries"] == 3 and len(record["h-seeds"]) == 9
    assert history_from_record(record) == original
    assert history_from_record(history_to_record(History())) == History()
    assert history_from_record(history_to_record(original.since(1, exclude_client=None))).clients == [3]


def test_history_refuses_ragged_or_truncated_steps():
    ragged = History(
        rounds=[1, 1], clients=[0, 0], lrs=[0.1, 0.1], seeds=[[1, 2], [3]], grads=[[0.1, 0.2], [0.3]], rows=[b"", b""]
    )
    with pytest.raises(ValueError, match="differ in length"):
        history_to_record(ragged)
    record = history_to_record(history())
    record["h-grads"] = record["h-grads"][:-1]
    with pytest.raises(ValueError, match="expected 3 steps of 3 entries, got 8"):
        history_from_record(record)


def test_report_round_trips_zo_and_fo(train_report):
    zo = train_report(
        partition_id=1,
        losses=[0.7, 0.6],
        seeds=[[1, 2], [3, 4]],
        grads=[[0.5, -0.5], [0.25, 0.75]],
        rows=[b"\x07", b""],
        step_lrs=[5e-4, 1e-3],
        truncated={"train": 3, "test": 0},
    )
    fo = dataclasses.replace(zo, seeds=[[], []], grads=[[], []], rows=[b"", b""])
    for report in (zo, fo):
        record = report.to_record()
        assert not any(isinstance(v, (list, dict)) and v and isinstance(v[0], list) for v in record.values())
        assert all(not isinstance(v, dict) for v in record.values()) and record["truncated-train"] == 3
        assert TrainReport.from_record({"ok": True, **record}) == report
        assert report.steps == 2 and report.train_loss == pytest.approx(0.65)
    record = zo.to_record()
    del record["step-lrs"]
    with pytest.raises(ValueError, match=r"training report lacks fields \['step-lrs'\]"):
        TrainReport.from_record(record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_client_state_round_trips_exactly(dtype):
    weights = {"embed.weight": torch.randn(5, 3).to(dtype), "layer.bias": torch.randn(3).to(dtype)}
    state = ClientState(weights=weights, steps=7, synced_round=2, trial=1, subset_ids=[0, 3], subset_weights=[0.5, 1.5])
    stored, counters = state_to_records(state)
    assert all(v.dtype != torch.bfloat16 for v in stored.values())  # numpy (Flower's arrays) has no bfloat16
    back = state_from_records(stored, counters)
    assert (back.steps, back.synced_round, back.trial, back.subset_ids, back.subset_weights) == (
        7,
        2,
        1,
        [0, 3],
        [0.5, 1.5],
    )
    assert all(torch.equal(back.weights[k].to(dtype), v) for k, v in weights.items())


def test_a_session_travels_as_a_flat_record_and_a_bad_one_is_refused_naming_its_field():
    from fl_app.records import SessionSettings

    session = SessionSettings(client=1, round=2, token="t", address="h:1", local_steps=4, split="dev", num_shards=2)
    record = session.to_record()
    assert record["num-shards"] == 2 and record["local-steps"] == 4 and "num_shards" not in record
    assert SessionSettings.from_record(record) == session
    with pytest.raises(ValueError, match="field 'round' of the session is '2'"):
        SessionSettings.from_record({**record, "round": "2"})
    with pytest.raises(ValueError, match=r"unknown fields \['rounds'\]"):
        SessionSettings.from_record({**record, "rounds": 2})
    with pytest.raises(ValueError, match="incomplete"):
        SessionSettings.from_record({k: v for k, v in record.items() if k != "token"})
    with pytest.raises(ValueError, match="field 'subset' of the session is 'most'"):
        SessionSettings.from_record({**record, "subset": "most"})
    with pytest.raises(ValueError, match="0 <= shard < num-shards"):
        SessionSettings.from_record({**record, "shard": 2})


def test_a_session_for_another_client_is_refused(coordinators):
    from fl_app.client_session import ClientSide, run_session
    from fl_app.config import make_config, read_scenario
    from fl_app.records import SessionRequest

    c = coordinators(make_config(read_scenario("sim_configs/smoke_tiny.toml")))
    _, session = c.open(1, 1)
    with pytest.raises(ValueError, match="the session is for client 1, but this node holds partition-id 0"):
        run_session(SessionRequest(session), ClientSide(c.config, 0, 2))
