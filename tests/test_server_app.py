"""The ServerApp's node discovery, against a stand-in Grid: nodes are asked again every round."""

import time
from types import SimpleNamespace

import pytest

from fl_app.records import EvalReport, SessionSettings
from server_app import app as server_app
from server_app.app import FlowerFederation


@pytest.fixture(autouse=True)
def plain_messages(monkeypatch):
    """Messages outside a running ServerApp (Flower's need the run's identity): just their address."""
    monkeypatch.setattr(
        server_app,
        "Message",
        lambda content, dst_node_id, message_type: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst_node_id)),
    )


class FakeGrid:
    """Online nodes and the partition id each claims (or, as a string, the clients it serves: node config
    partitions); answers query messages like a ClientApp."""

    def __init__(self, claims: dict[int, int], counts: dict[int, int] | None = None):
        self.claims, self.asked, self._replies = dict(claims), [], {}
        self.counts = counts or {}  # node id -> its num-partitions (absent: the node config has none)
        self.awaited, self.most_awaited = 0, 0  # queries pushed and not yet pulled

    def get_node_ids(self):
        return list(self.claims)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            mid = f"m{len(self._replies)}"
            claim = self.claims[node]
            record = {"node": {"partition-id": claim} if isinstance(claim, int) else {"partitions": claim}}
            if node in self.counts:
                record["node"]["num-partitions"] = self.counts[node]
            self._replies[mid] = SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=mid),
                has_error=lambda: False,
                content=SimpleNamespace(config_records=record),
            )
            ids.append(mid)
        self.awaited += len(ids)
        self.most_awaited = max(self.most_awaited, self.awaited)
        return ids

    def pull_messages(self, ids):
        self.awaited -= len(ids)
        return [self._replies[i] for i in ids]


def test_two_nodes_claiming_one_partition_at_the_start_is_an_error():
    with pytest.raises(RuntimeError, match="nodes 11 and 12 both hold partition-id 0"):
        FlowerFederation(FakeGrid({11: 0, 12: 0, 13: 1}), query_timeout=5, wait=0)


def test_a_restarted_node_rejoins_and_only_new_nodes_are_asked(capsys):
    grid = FakeGrid({11: 0, 12: 1})
    fed = FlowerFederation(grid, query_timeout=5, wait=0)
    assert fed.partitions() == [0, 1] and sorted(grid.asked) == [11, 12]  # known nodes are not asked again
    del grid.claims[12]  # node of partition 1 dies
    assert fed.partitions() == [0]
    grid.claims[21] = 1  # ... and comes back under a new node id
    assert fed.partitions() == [0, 1] and fed.nodes == {0: 11, 1: 21} and grid.asked[-1] == 21
    grid.claims[31] = 0  # a node that joins cannot take over a partition whose node is online
    assert fed.partitions() == [0, 1] and fed.nodes == {0: 11, 1: 21}
    del grid.claims[11]  # ... until that node is gone
    assert fed.partitions() == [0, 1] and fed.nodes == {0: 31, 1: 21}
    assert "partitions [1] gone" in capsys.readouterr().out


def test_partition_queries_go_out_a_window_at_a_time(monkeypatch):
    """10,000 simulated nodes asked at once would stall Flower's simulation engine (it scans every
    node's queue for every pending message): at most QUERY_WINDOW queries await replies."""
    monkeypatch.setattr(server_app, "QUERY_WINDOW", 3)
    grid = FakeGrid({100 + pid: pid for pid in range(10)})
    fed = FlowerFederation(grid, query_timeout=5, wait=0)
    assert fed.nodes == {pid: 100 + pid for pid in range(10)} and sorted(grid.asked) == list(range(100, 110))
    assert grid.most_awaited == 3


class SessionGrid(FakeGrid):
    """Also answers evaluate messages, each only after it was polled ``delay[node]`` times; a node
    with no delay never answers. Records how many messages were in flight at each push."""

    def __init__(self, claims: dict[int, int], delay: dict[int, int]):
        super().__init__(claims)
        self.delay, self.in_flight, self.polls = delay, [], {}

    def push_messages(self, messages):
        if any(m.metadata.message_type == "query" for m in messages):
            return super().push_messages(messages)
        ids = []
        for m in messages:
            mid = f"s{len(self.polls)}"
            self.polls[mid] = [m.metadata.dst_node_id, 0]
            self.in_flight.append(sum(1 for node, n in self.polls.values() if n >= 0))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        if not all(i in self.polls for i in ids):
            return super().pull_messages(ids)
        out = []
        for mid in ids:
            entry = self.polls[mid]
            entry[1] += 1
            if entry[1] == self.delay.get(entry[0]):
                entry[1] = -1  # answered
                out.append(
                    SimpleNamespace(
                        metadata=SimpleNamespace(reply_to_message_id=mid),
                        has_error=lambda: False,
                        content=SimpleNamespace(
                            config_records={"report": {"ok": True}},
                            metric_records={"metrics": {"partition-id": entry[0] - 10, "accuracy": float(entry[0])}},
                        ),
                    )
                )
        return out


def _session_messages(monkeypatch):
    """Messages that say their type (SessionGrid answers sessions, FakeGrid queries) and fast polls."""
    monkeypatch.setattr(
        server_app,
        "Message",
        lambda content, dst_node_id, message_type: SimpleNamespace(
            metadata=SimpleNamespace(dst_node_id=dst_node_id, message_type=message_type)
        ),
    )
    monkeypatch.setattr(server_app, "POLL_SECONDS", 0.001)
    monkeypatch.setattr(server_app, "FIRST_POLL_SECONDS", 0.001)


def test_sessions_run_in_a_sliding_window_and_replies_come_as_they_arrive(monkeypatch):
    """At most ``window`` sessions in flight; the next request is drawn (its session opened) only
    when one ends, not when the whole group ends; a silent node is missing after the timeout."""
    _session_messages(monkeypatch)
    nodes = {10 + pid: pid for pid in range(5)}
    grid = SessionGrid(nodes, delay={10: 6, 11: 1, 12: 1, 13: 1})  # node 14 never answers
    fed = FlowerFederation(grid, query_timeout=5, wait=0)
    drawn = []

    def requests():
        for pid in range(5):
            drawn.append(len(grid.polls))  # sessions pushed before this one was drawn (opened)
            yield server_app.SessionRequest(
                SessionSettings(client=pid, round=1, token="t", address="a:1", local_steps=1)
            )

    replies = list(fed.run_sessions("evaluate", requests(), window=2, timeout=1.0, tick=lambda: None))
    assert drawn == [0, 1, 2, 3, 4]  # each drawn only when the one before it was pushed: none opened early
    assert max(grid.in_flight) == 2
    order = [pid for pid, _ in replies]
    # 1 ends first and 2, 3 take its place one after another while 0 (slow) is still running
    assert order[:3] == [1, 2, 3] and set(order) == {0, 1, 2, 3, 4}
    got = dict(replies)
    assert got[0].report == EvalReport(0, accuracy=10.0) and got[3].report == EvalReport(3, accuracy=13.0)
    assert got[4].report is None and got[4].reason == server_app.NO_REPLY


def test_the_number_of_clients_is_the_federations_and_a_disagreeing_scenario_is_told():
    """Under flwr run the nodes' num-partitions (the SuperNode count) decides how many clients train,
    whatever the scenario's num-clients says (a scenario saying 1 trained 2 clients, silently)."""
    assert FlowerFederation(FakeGrid({11: 0, 12: 1}, {11: 2, 12: 2}), query_timeout=5, wait=0).num_clients() == 2
    assert FlowerFederation(FakeGrid({11: 0}, {11: 4}), query_timeout=5, wait=0).num_clients() == 4  # 3 not up yet
    assert FlowerFederation(FakeGrid({11: 0, 12: 1}), query_timeout=5, wait=0).num_clients() == 2  # none declared
    text = server_app.num_clients_mismatch(1, 2)
    assert "num-clients = 1" in text and "2 clients train" in text and "num-supernodes=1" in text


def test_a_malformed_training_report_drops_its_client_not_the_run(train_report):
    """A reply whose report lacks fields, or has no report record at all, is a dropped session with
    the reason, never an exception in the round loop."""
    from flwr.app import ConfigRecord, RecordDict

    good = train_report(queries=2).to_record()
    lacking = {k: v for k, v in good.items() if k != "losses"}
    for content, reason in (
        (RecordDict({"report": ConfigRecord({"ok": True, **lacking})}), "lacks fields ['losses']"),
        (RecordDict({}), "KeyError"),
    ):
        reply = SimpleNamespace(has_error=lambda: False, content=content)
        got = server_app._session_reply("train", RecordDict({}), reply)
        assert got.report is None and got.reason.startswith("malformed report: ") and reason in got.reason
    content = RecordDict({"report": ConfigRecord({"ok": True, **good})})
    reply = SimpleNamespace(has_error=lambda: False, content=content)
    assert server_app._session_reply("train", RecordDict({}), reply).report.losses == [0.7, 0.7]


def test_nodes_serving_several_clients_share_them_evenly_and_a_bound_node_keeps_its_own(capsys):
    """Virtual clients: a round's sessions go to the nodes whose partitions allow them, the least sent
    first (ties: the lowest id); a node bound to one partition still gets that client's sessions."""
    grid = FakeGrid({11: "0-9", 12: "0-9", 13: "5-19/2", 14: 3}, {11: 20, 12: 20, 13: 20, 14: 20})
    fed = FlowerFederation(grid, query_timeout=5, wait=0)
    assert fed.partitions() == [*range(10), 11, 13, 15, 17, 19] and fed.num_clients() == 20
    assert fed.nodes == {3: 14} and sorted(fed.shared) == [11, 12, 13]
    sent = server_app.Counter()
    placed = {}
    for client in [*range(10), 11, 13, 15, 17, 19]:
        placed[client] = node = fed.node_for(client, sent)
        sent[node] += 1
    assert placed[3] == 14  # its own node, not a shared one
    assert all(client in fed.shared[node] for client, node in placed.items() if node != 14)
    assert [placed[c] for c in (0, 1, 2)] == [11, 12, 11] and placed[5] == 13  # 13 had sent none
    assert {node: sent[node] for node in (11, 12, 13)} == {11: 3, 12: 3, 13: 8}  # 11-19 only 13 may serve
    with pytest.raises(ValueError, match="no online node serves client 20"):
        fed.node_for(20, sent)
    del grid.claims[13]  # a several-client node goes: its clients beyond the others' go with it
    assert fed.partitions() == list(range(10))
    assert "nodes serving several clients changed: [13] gone, [] joined" in capsys.readouterr().out


def test_a_node_answering_with_an_unreadable_client_set_is_left_out(caplog):
    fed = FlowerFederation(FakeGrid({11: 0, 12: "0-x"}), query_timeout=5, wait=0)
    assert fed.partitions() == [0] and "node 12 answered the query with no usable client set" in caplog.text


def test_a_session_that_failed_on_the_step_stream_is_not_waited_for(monkeypatch):
    """A node that lost its network never replies; once its session has failed on the step stream
    (step timeout, disconnect) the round stops waiting for the reply, long before round-timeout, and
    the reply carries no reason of its own (the session's says why)."""
    _session_messages(monkeypatch)
    grid = SessionGrid({10: 0, 11: 1}, delay={10: 3})  # node 11 never answers
    fed = FlowerFederation(grid, query_timeout=5, wait=0)
    requests = (
        server_app.SessionRequest(SessionSettings(client=pid, round=1, token="t", address="a:1", local_steps=1))
        for pid in (0, 1)
    )
    polls = []
    started = time.monotonic()
    replies = dict(
        fed.run_sessions(
            "evaluate",
            requests,
            2,
            timeout=600,
            tick=lambda: polls.append(1),
            failed=lambda pid: pid == 1 and len(polls) > 5,
        )
    )
    assert time.monotonic() - started < 5  # not round-timeout's 600 s
    assert replies[0].report is not None and replies[1].report is None and replies[1].reason == ""


def test_a_node_claiming_clients_beyond_the_data_or_with_unreadable_fields_is_left_out_not_the_run(caplog):
    """Issue 44 items 1-3: a claim is checked on its ranges' ends against the node's num-partitions (or
    the run's bound) before anything is built from it: ten million or a trillion ids cost nothing; a
    malformed num-partitions, a negative id or clients beyond the data drop that node alone."""
    grid = FakeGrid({11: 0, 12: "0-1000000000000", 13: "0-99", 14: -1, 15: "0-9999999", 16: 1}, {11: 8, 13: 8, 16: 8})
    started = time.monotonic()
    fed = FlowerFederation(grid, query_timeout=5, wait=0, max_clients=8)
    assert time.monotonic() - started < 2
    assert fed.partitions() == [0, 1] and sorted(fed.nodes.values()) == [11, 16] and not fed.shared
    for node in (12, 13, 14, 15):
        assert f"node {node} answered the query with no usable client set" in caplog.text
    grid.claims[17], grid.counts[17] = 2, "x"  # joins at a later round with an unreadable count
    assert fed.partitions() == [0, 1] and "node 17 answered the query with no usable client set" in caplog.text


def test_flower_round_trips_are_timed_on_a_several_client_node_when_no_node_is_bound():
    fed = FlowerFederation(FakeGrid({11: "0-9", 12: "0-9"}, {11: 10, 12: 10}), query_timeout=5, wait=0)
    assert not fed.nodes and fed.probe_node() == 11
    assert FlowerFederation(FakeGrid({21: 1, 22: 0}), query_timeout=5, wait=0).probe_node() == 22
