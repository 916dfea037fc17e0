"""Which clients a node may serve, and how a round's clients are spread over the nodes."""

import pytest

from fl_app.virtual_clients import PartitionSet, assign, node_clients


def test_partition_sets_parse_ids_ranges_and_strides():
    assert list(PartitionSet.parse("0-4")) == [0, 1, 2, 3, 4]
    assert list(PartitionSet.parse("3, 7,11")) == [3, 7, 11]
    every_20th = PartitionSet.parse("0-99999/20")
    assert len(every_20th) == 5000 and 99980 in every_20th and 20 in every_20th and 21 not in every_20th
    mixed = PartitionSet.parse("0-2,2,10-14/2")
    assert list(mixed) == [0, 1, 2, 10, 12, 14] and len(mixed) == 6
    assert list(PartitionSet.single(7)) == [7] and 8 not in PartitionSet.single(7)


@pytest.mark.parametrize("text", ["", "a-b", "5-3", "0-9/0", "1-2-3", "-1"])
def test_a_bad_partition_set_is_refused_naming_the_field_and_value(text):
    with pytest.raises(ValueError, match=f"partitions = {text!r}"):
        PartitionSet.parse(text)


def test_a_rounds_clients_are_spread_evenly_over_the_nodes_that_may_serve_them():
    nodes = {10: PartitionSet.parse("0-99"), 11: PartitionSet.parse("0-99"), 12: PartitionSet.parse("50-99")}
    clients = list(range(0, 100, 5))  # 20 clients, 10 of them in 50-99
    spread = assign(clients, nodes)
    assert sorted(c for served in spread.values() for c in served) == clients  # each once
    for node, served in spread.items():
        assert all(c in nodes[node] for c in served)  # a node serves only the clients its config allows
    assert sorted(len(s) for s in spread.values()) == [6, 7, 7] and assign(clients, nodes) == spread


def test_a_client_no_node_may_serve_is_named():
    with pytest.raises(ValueError, match="no node may serve client 7"):
        assign([1, 7], {1: PartitionSet.parse("0-5")})


def test_a_set_reads_back_from_its_text_and_knows_when_it_is_one_client():
    for text in ("0-999", "3,7,11", "0-99999/20", "5"):
        clients = PartitionSet.parse(text)
        assert PartitionSet.parse(clients.text) == clients
    assert PartitionSet.parse("0-9/3").text == "0-9/3" and list(PartitionSet.parse("0-9/3")) == [0, 3, 6, 9]
    assert PartitionSet.single(4).single_client == 4 and PartitionSet.parse("4,4").single_client == 4
    assert PartitionSet.parse("4-5").single_client is None and PartitionSet.parse("0-0").single_client == 0


def test_a_node_serves_its_partitions_or_every_client_when_virtual_or_else_its_partition_id():
    explicit, count = node_clients({"partitions": "0-99/2", "num-partitions": 100}, virtual=False, num_clients=4)
    assert (len(explicit), count) == (50, 100) and 98 in explicit and 99 not in explicit
    shared, count = node_clients({"partition-id": 1, "num-partitions": 2}, virtual=True, num_clients=1000)
    assert (len(shared), count) == (1000, 1000) and shared.text == "0-999"
    own, count = node_clients({"partition-id": 1, "num-partitions": 2}, virtual=False, num_clients=1000)
    assert (own.single_client, count) == (1, 2)
    with pytest.raises(ValueError, match="missing 'partition-id'"):
        node_clients({}, virtual=False, num_clients=2)
    with pytest.raises(ValueError, match="partitions = '0-10' names client 10, but the data is cut into 10"):
        node_clients({"partitions": "0-10", "num-partitions": 10}, virtual=False, num_clients=2)
    huge = {"partitions": "0-1000000000000", "num-partitions": 10**12 + 1}  # issue 44 item 1, on the node side
    with pytest.raises(ValueError, match="num-partitions = 1000000000001 is outside \\[1, 1000000\\]"):
        node_clients(huge, virtual=False, num_clients=2)
