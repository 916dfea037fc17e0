"""Virtual clients: a client is a data partition with its own state, and a node serves the clients it
may serve, so a study can run far more clients than it runs nodes.

A node's ``partitions`` (node config) says which clients it may serve: comma-separated ids and
inclusive ranges, each range optionally with a stride, e.g. ``"0-999"``, ``"3,7,11"`` or
``"0-99999/20"`` (0, 20, 40, ...). :func:`assign` sends each of a round's sampled clients to a node
that may serve it, spreading them evenly and deterministically.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

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

    def __contains__(self, client: object) -> bool:
        return any(client in r for r in self.ranges)

    def __len__(self) -> int:
        return len(set(self))

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
        able = [node for node in load if client in nodes[node]]
        if not able:
            raise ValueError(f"no node may serve client {client} (node config 'partitions' of the online nodes)")
        least = min(able, key=lambda node: len(load[node]))
        load[least].append(client)
    return {node: served for node, served in load.items() if served}
