"""The ServerApp's node discovery, against a stand-in Grid: nodes are asked again every round."""

from types import SimpleNamespace

import pytest

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
    """Online nodes and the partition id each claims; answers query messages like a ClientApp."""

    def __init__(self, claims: dict[int, int]):
        self.claims, self.asked, self._replies = dict(claims), [], {}

    def get_node_ids(self):
        return list(self.claims)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            mid = f"m{len(self._replies)}"
            record = {"node": {"partition-id": self.claims[node]}}
            self._replies[mid] = SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=mid),
                has_error=lambda: False,
                content=SimpleNamespace(config_records=record),
            )
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
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
