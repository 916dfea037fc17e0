"""Virtual clients: a client is a data partition with its own state, and a node serves the clients it
may serve, so a study can run far more clients than it runs nodes.

A node's ``partitions`` (node config) says which clients it may serve: comma-separated ids and
inclusive ranges, each range optionally with a stride, e.g. ``"0-999"``, ``"3,7,11"`` or
``"0-99999/20"`` (0, 20, 40, ...). Without it a node serves its ``partition-id`` alone (one client
per node, as a device in deployment), or, with the run config's ``virtual-clients``, any client below
``num-clients`` (a simulation's nodes share every client). :func:`node_clients` decides, and
:func:`assign` sends each of a round's sampled clients to a node that may serve it, spreading them
evenly and deterministically.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fl_app.config import MOST

_PART = re.compile(r"(\d+)(?:-(\d+)(?:/(\d+))?)?")


@dataclass(frozen=True)
class PartitionSet:
    """The client ids one node may serve, as ranges (each a Python ``range``: start, stop, step)."""

    ranges: tuple[range, ...]

    @classmethod
    def parse(cls, text: str, field: str = "partitions") -> PartitionSet:
        """``"0-999"``, ``"3,7,11"``, ``"0-99999/20"`` or a mix; a clear error naming ``field`` otherwise."""
        ranges = []
        for part in str(text).replace(" ", "").split(","):
            match = _PART.fullmatch(part)
            if match is None:
                raise ValueError(f"{field} = {text!r}: '{part}' is not an id, 'first-last' or 'first-last/stride'")
            first, last, stride = match.group(1), match.group(2), match.group(3)
            start, stop, step = int(first), int(last if last is not None else first), int(stride or 1)
            if stop < start or step < 1:
                raise ValueError(f"{field} = {text!r}: '{part}' is empty (last below first, or a stride below 1)")
            ranges.append(range(start, stop + 1, step))
        return cls(tuple(ranges))

    @classmethod
    def single(cls, client: int) -> PartitionSet:
        """The set a node with only ``partition-id`` serves: that one client (as every node did before)."""
        return cls((range(client, client + 1),))

    @property
    def text(self) -> str:
        """The set in the form :meth:`parse` reads (a query reply carries it to the server)."""
        parts = []
        for r in self.ranges:
            last = r[-1]
            parts.append(f"{r.start}" if len(r) == 1 else f"{r.start}-{last}" + (f"/{r.step}" if r.step > 1 else ""))
        return ",".join(parts)

    @property
    def single_client(self) -> int | None:
        """The one client of a set that holds exactly one (a node bound to its partition), else None."""
        members = {r.start for r in self.ranges}
        return members.pop() if all(len(r) == 1 for r in self.ranges) and len(members) == 1 else None

    def __contains__(self, client: object) -> bool:
        return any(client in r for r in self.ranges)

    def __len__(self) -> int:
        return len(set(itertools.chain.from_iterable(self.ranges)))

    def __iter__(self) -> Iterator[int]:
        seen: set[int] = set()
        for r in self.ranges:
            for client in r:
                if client not in seen:
                    seen.add(client)
                    yield client


def assign(clients: list[int], nodes: Mapping[int, PartitionSet]) -> dict[int, list[int]]:
    """Each client (in order) to the node, among those that may serve it, holding the fewest clients so
    far (ties: the lowest node id): an even, deterministic spread. A client no node may serve raises."""
    load: dict[int, list[int]] = {node: [] for node in sorted(nodes)}
    for client in clients:
        least = least_loaded(client, nodes, {node: len(served) for node, served in load.items()})
        if least is None:
            raise ValueError(f"no node may serve client {client} (node config 'partitions' of the online nodes)")
        load[least].append(client)
    return {node: served for node, served in load.items() if served}


def least_loaded(client: int, nodes: Mapping[int, PartitionSet], load: Mapping[int, int]) -> int | None:
    """Among the nodes that may serve ``client``, the one with the least ``load`` (ties: the lowest
    node id; a node missing from ``load`` has none); None when no node may serve it."""
    able = [node for node in sorted(nodes) if client in nodes[node]]
    return min(able, key=lambda node: load.get(node, 0)) if able else None


def node_clients(node_config: Mapping[str, Any], virtual: bool, num_clients: int) -> tuple[PartitionSet, int]:
    """The clients a node serves and the partition count the data is cut by: its node config
    ``partitions`` (with ``num-partitions``, or else ``num_clients``), or with ``virtual`` every
    client below ``num_clients``, or else its ``partition-id`` of ``num-partitions`` alone."""
    if "partitions" in node_config:
        clients = PartitionSet.parse(str(node_config["partitions"]), "node config partitions")
        count = int(node_config.get("num-partitions", num_clients))
    elif virtual:
        clients, count = PartitionSet((range(num_clients),)), num_clients
    else:
        try:
            clients, count = PartitionSet.single(int(node_config["partition-id"])), int(node_config["num-partitions"])
        except KeyError as err:
            raise ValueError(
                f"node config is missing {err} (set --node-config 'partition-id=0 num-partitions=2', or "
                "'partitions=0-99 num-partitions=1000' for a node serving several clients)"
            ) from err
    if not 1 <= count <= MOST:  # judged before anything is built from it
        raise ValueError(f"node config num-partitions = {count} is outside [1, {MOST}]")
    beyond = [r[-1] for r in clients.ranges if r[-1] >= count]
    if beyond:
        raise ValueError(
            f"node config partitions = {clients.text!r} names client {max(beyond)}, but the data is cut into "
            f"{count} partitions (num-partitions, or num-clients)"
        )
    return clients, count
