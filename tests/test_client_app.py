"""The ClientApp's side of virtual clients: which clients a node serves, and where their states live."""

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client_app.sessions import _save_state, _session_inputs, query
from fl_app.records import ClientState, SessionSettings


def _message(client: int, state_dir: str = "", node_auth: bool = False) -> RecordDict:
    session = SessionSettings(client=client, round=2, token="t", address="a:1", local_steps=1, run_id="r1")
    session = SessionSettings(**{**session.__dict__, "state_dir": state_dir, "node_auth": node_auth})
    return RecordDict({"session": ConfigRecord(session.to_record())})


def _context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def test_a_node_serves_only_the_clients_its_config_allows_and_keeps_none_of_their_states_in_memory(tmp_path):
    store = str(tmp_path / "run" / "clients" / "r1")
    node = _context({"partitions": "0-99/2", "num-partitions": 100})
    _, side, in_memory = _session_inputs(_message(42, store), node)
    assert (side.partition_id, side.num_partitions, side.state, in_memory) == (42, 100, None, False)
    with pytest.raises(ValueError, match="session is for client 43, but this node serves clients '0-98/2'"):
        _session_inputs(_message(43, store), node)
    with pytest.raises(ValueError, match=r"keeps no client states \(client-checkpoints = false\)"):
        _session_inputs(_message(42), node)  # the run keeps no client store: this node could not keep states
    with pytest.raises(ValueError, match="a node key proves one client, but this node serves clients '0-98/2'"):
        _session_inputs(_message(42, store, node_auth=True), node)


def test_virtual_clients_let_a_simulated_node_serve_any_client_and_a_bound_node_only_its_own(tmp_path):
    store = str(tmp_path / "run" / "clients" / "r1")
    simulated = {"partition-id": 0, "num-partitions": 2}  # what Flower's simulation gives every node
    virtual = _context(simulated, {"virtual-clients": True, "num-clients": 1000})
    _, side, in_memory = _session_inputs(_message(999, store), virtual)
    assert (side.partition_id, side.num_partitions, in_memory) == (999, 1000, False)
    bound = _context(simulated)
    _save_state(bound, ClientState(steps=5))
    _, side, in_memory = _session_inputs(_message(0, store), bound)
    assert (side.partition_id, side.num_partitions, side.state.steps, in_memory) == (0, 2, 5, True)
    with pytest.raises(ValueError, match="serves clients '0'"):
        _session_inputs(_message(1, store), bound)


def test_the_query_reply_names_the_clients_the_node_serves():
    shared = query(None, _context({"partitions": "0-99999/20", "num-partitions": 100000}))
    assert dict(shared["node"]) == {"partition-id": -1, "num-partitions": 100000, "partitions": "0-99980/20"}
    bound = query(None, _context({"partition-id": 3, "num-partitions": 4}))
    assert dict(bound["node"]) == {"partition-id": 3, "num-partitions": 4, "partitions": "3"}
