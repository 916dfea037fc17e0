"""Flower ServerApp: holds the top (FO in hosl) and runs the round loop of :mod:`fl_app.rounds`
with sessions carried as Flower messages.

The loop selects clients per round, sends each a session message with at most
``max-concurrent-clients`` in flight, serves their steps on the direct step stream, collects reports
(dropping clients that fail or time out, with their partial server updates rolled back), runs
federated evaluation, checkpoints and writes ``results.json``; with ``tune-trials > 0`` it tunes
first. This module only discovers the nodes and turns sessions into messages and back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fl_app import rounds
from fl_app.checkpoint import CheckpointRefused, RunFolderBusy, WriteFailed, run_folder
from fl_app.config import MOST as MAX_CLIENTS
from fl_app.config import make_config
from fl_app.coordinator import Coordinator, stream_credentials
from fl_app.metrics import log_to_stderr
from fl_app.preflight import check_out_dir, check_scenario
from fl_app.records import EvalReport, SessionReply, SessionRequest, TrainReport, history_to_record
from fl_app.rounds import NO_REPLY
from fl_app.virtual_clients import PartitionSet, least_loaded

log = logging.getLogger("hosl.server")
app = ServerApp()
POLL_SECONDS = 0.2  # longest wait between polls for replies
FIRST_POLL_SECONDS = 0.005  # the wait after a reply came (more are likely soon)
QUERY_TIMEOUT = 60.0  # seconds a node has to tell its partition id
QUERY_WINDOW = 64  # partition queries awaiting replies at once


def record_bytes(content: RecordDict) -> int:
    """Approximate payload bytes of a message's records (arrays by size, scalars at 8 bytes)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in items)
    return total


def flow(
    grid: Grid,
    messages: Iterable[tuple[Any, Message]],
    window: int,
    timeout: float,
    tick: Callable[[], Any],
    given_up: Callable[[Any], bool] = lambda key: False,
) -> Iterator[tuple[Any, Message | None]]:
    """Push the ``(key, message)`` pairs with at most ``window`` awaiting replies, drawing the next
    pair only when a slot frees; yield ``(key, reply)`` as each reply arrives, or ``(key, None)``
    once ``timeout`` has passed since its push or ``given_up(key)`` says its reply no longer matters.
    ``tick`` runs at every poll; polls follow each other fast while replies come and back off to
    POLL_SECONDS when they do not."""
    messages = iter(messages)
    pending: dict[str, tuple[Any, float]] = {}  # message id -> (key, deadline)
    more, poll = True, FIRST_POLL_SECONDS
    while more or pending:
        while more and len(pending) < window:
            item = next(messages, None)
            if item is None:
                more = False
                break
            (mid,) = grid.push_messages([item[1]])
            pending[mid] = (item[0], time.monotonic() + timeout)
        ended = [(r.metadata.reply_to_message_id, r) for r in grid.pull_messages(list(pending))]
        ended += [
            (mid, None) for mid, (key, deadline) in pending.items() if time.monotonic() > deadline or given_up(key)
        ]
        for mid, reply in ended:
            if mid in pending:
                yield pending.pop(mid)[0], reply
        tick()
        if pending and not ended:
            time.sleep(poll)
        poll = FIRST_POLL_SECONDS if ended else min(2 * poll, POLL_SECONDS)


def ask_partitions(
    grid: Grid, node_ids: list[int], timeout: float, max_clients: int = MAX_CLIENTS
) -> dict[int, tuple[PartitionSet, int]]:
    """node id -> (the clients it serves, the partition count it was given; 0 if none), asked of
    ``node_ids`` (nodes that do not answer, or answer with a claim :func:`node_claim` refuses, are left
    out with one logged line), QUERY_WINDOW at a time (10,000 queries at once would stall Flower's
    simulation engine). A node that names no ``partitions`` (an older ClientApp) serves its
    ``partition-id``."""
    messages = ((n, Message(RecordDict(), dst_node_id=n, message_type="query")) for n in node_ids)
    claims = {}
    for node_id, reply in flow(grid, messages, QUERY_WINDOW, timeout, lambda: None):
        if reply is None or reply.has_error():
            reason = reply.error.reason if reply else f"no reply within {timeout:.0f} s"
            log.warning("node %s did not answer the query: %s", node_id, reason)
            continue
        try:
            claims[node_id] = node_claim(reply.content.config_records["node"], node_id, max_clients)
        except (ValueError, KeyError, TypeError) as err:  # every field of a reply is untrusted: drop the node
            log.warning("node %s answered the query with no usable client set: %s", node_id, err)
    return claims


def node_claim(node: Any, node_id: int, max_clients: int) -> tuple[PartitionSet, int]:
    """(the clients a node's query reply says it serves, its partition count; 0 if none), checked before
    anything is built from it: the count in [0, ``max_clients``], every client id in [0, the count) (or
    [0, ``max_clients``) without one), judged on the ranges' ends (a claim is never expanded here)."""
    count = int(node.get("num-partitions", 0))
    if not 0 <= count <= max_clients:
        raise ValueError(f"num-partitions = {count} is outside [0, {max_clients}]")
    served = (
        PartitionSet.parse(str(node["partitions"]), f"node {node_id}'s partitions")
        if "partitions" in node
        else PartitionSet.single(int(node["partition-id"]))
    )
    bound = count or max_clients
    if any(r.start < 0 or r[-1] >= bound for r in served.ranges):
        raise ValueError(f"client set {served.text!r} names clients outside [0, {bound})")
    return served, count


def num_clients_mismatch(scenario: int, federation: int) -> str:
    """What to tell a user whose scenario's ``num-clients`` is not the federation's client count."""
    return (
        f"the scenario says num-clients = {scenario}, but the federation has {federation} clients (its nodes' "
        f"num-partitions): {federation} clients train, each on 1/{federation} of the data. Under flwr run the "
        f'federation decides: --federation-config "num-supernodes={scenario}" runs {scenario}'
    )


def probe_message_rtt(grid: Grid, node_id: int, count: int) -> list[float]:
    """Seconds per sequential query round trip to one node: what a per-step Flower message would cost."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        list(flow(grid, [(node_id, Message(RecordDict(), dst_node_id=node_id, message_type="query"))], 1, 600, int))
        times.append(time.perf_counter() - started)
    return times


def _reply_report(reply: Message | None) -> tuple[dict[str, Any] | None, str]:
    if reply is None:
        return None, NO_REPLY
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    report = dict(reply.content.config_records["report"])
    if not report.get("ok"):
        return None, str(report.get("error", "client reported failure"))
    return report, ""


def session_content(request: SessionRequest) -> RecordDict:
    """A session message: settings, plus the synced history (ZO) or averaged bottom (FO) if any."""
    content = RecordDict({"session": ConfigRecord(request.session.to_record())})
    if request.overrides:
        content["overrides"] = ConfigRecord(request.overrides)
    if request.history is not None:
        content["history"] = ConfigRecord(history_to_record(request.history))
    if request.average is not None:
        content["average"] = ArrayRecord(request.average)
    return content


class FlowerFederation:
    """Sessions as Flower messages to the ClientApps: to the node bound to the client's partition, or
    else to one of the nodes that serve several clients (virtual clients, :mod:`fl_app.virtual_clients`).

    Nodes are discovered again every round: a node that went away is skipped, a new or restarted
    node is asked which clients it serves and used from then on. A partition keeps the node bound
    to it while that node is online: a second node claiming it waits (logged) until the first is
    gone, so a node that joins cannot take over another's partition. Two nodes claiming one
    partition id at the start is an error (a mistyped node config would otherwise merge them
    silently). Nodes serving several clients may overlap: each session goes to the one of them that
    may serve its client and has been sent the fewest sessions of the round so far (ties: the
    lowest node id), an even and deterministic spread."""

    def __init__(
        self,
        grid: Grid,
        query_timeout: float,
        min_nodes: int = 1,
        wait: float = 3600.0,
        max_clients: int = MAX_CLIENTS,
    ):
        self.grid, self.query_timeout = grid, query_timeout
        self.max_clients = max_clients  # no node may claim a client id at or beyond this
        self.claims: dict[int, int] = {}  # node id -> partition id of a one-client node, in the order first seen
        self.served: dict[int, PartitionSet] = {}  # node id -> the clients of a node serving several
        self.counts: dict[int, int] = {}  # node id -> the partition count its node config gives (num-partitions)
        self.nodes: dict[int, int] = {}  # partition id -> node id of one-client nodes, as of the last discovery
        self.shared: dict[int, PartitionSet] = {}  # node id -> clients, of the several-client nodes online
        self._reachable: tuple[tuple[int, ...], frozenset[int]] = ((), frozenset())  # (shared nodes, their clients)
        deadline = time.monotonic() + wait
        while len(self.grid.get_node_ids()) < min_nodes and time.monotonic() < deadline:
            time.sleep(1.0)
        self.partitions(first=True)
        if not self.nodes and not self.shared:
            raise RuntimeError("no client node answered; check that SuperNodes are connected")

    def partitions(self, first: bool = False) -> list[int]:
        """The clients the nodes online now serve (asks new nodes which)."""
        online = [int(n) for n in self.grid.get_node_ids()]
        new = [n for n in online if n not in self.claims and n not in self.served]
        if new:
            for node_id, (served, count) in sorted(
                ask_partitions(self.grid, new, self.query_timeout, self.max_clients).items()
            ):
                self.counts[node_id] = count
                if served.single_client is None:
                    self.served[node_id] = served
                else:
                    self.claims[node_id] = served.single_client
        nodes = {pid: node for pid, node in self.nodes.items() if node in online}  # holders stay while online
        for node_id, pid in self.claims.items():  # then the oldest claim of each free partition
            if node_id not in online or nodes.get(pid) == node_id:
                continue
            if pid not in nodes:
                nodes[pid] = node_id
            elif first:
                raise RuntimeError(
                    f"nodes {nodes[pid]} and {node_id} both hold partition-id {pid}: give each SuperNode "
                    "its own (--node-config 'partition-id=...')"
                )
            else:
                log.warning("node %s also claims partition-id %s, held by node %s: ignored", node_id, pid, nodes[pid])
        gone, joined = sorted(set(self.nodes) - set(nodes)), sorted(set(nodes) - set(self.nodes))
        if not first and (gone or joined):
            print(f"[hosl] nodes changed: partitions {gone} gone, {joined} joined", flush=True)
        shared = {node: self.served[node] for node in online if node in self.served}
        if not first and set(shared) != set(self.shared):
            print(
                f"[hosl] nodes serving several clients changed: {sorted(set(self.shared) - set(shared))} gone, "
                f"{sorted(set(shared) - set(self.shared))} joined",
                flush=True,
            )
        self.nodes, self.shared = nodes, shared
        return sorted(set(nodes) | self.shared_clients())

    def probe_node(self) -> int:
        """A node to time Flower round trips with: the lowest-numbered partition's, else a several-client node."""
        return self.nodes[min(self.nodes)] if self.nodes else min(self.shared)

    def shared_clients(self) -> frozenset[int]:
        """The clients the several-client nodes online serve (worked out again only when they change)."""
        key = tuple(sorted(self.shared))
        if key != self._reachable[0]:
            self._reachable = (
                key,
                frozenset(itertools.chain.from_iterable(r for n in key for r in self.shared[n].ranges)),
            )
        return self._reachable[1]

    def num_clients(self) -> int:
        """How many clients the federation has: the partition count its online nodes were given (under
        ``flwr run``, the number of SuperNodes), the most common one if they disagree; else the number
        of partitions online."""
        nodes = [*self.nodes.values(), *self.shared]
        counts = Counter(self.counts[node] for node in nodes if self.counts.get(node))
        return counts.most_common(1)[0][0] if counts else len(self.nodes) + len(self.shared_clients())

    def run_sessions(
        self,
        kind: str,
        requests: Iterable[SessionRequest],
        window: int,
        timeout: float,
        tick: Callable[[], Any],
        failed: Callable[[int], bool] = lambda pid: False,
    ) -> Iterator[tuple[int, SessionReply]]:
        """Each session as a message, pushed as soon as a slot of ``window`` is free (see :func:`flow`),
        to the node bound to its client, or else to the several-client node that may serve it and has
        been sent the fewest of these sessions (ties: the lowest node id)."""
        sent: Counter[int] = Counter()

        def messages() -> Iterator[tuple[tuple[int, RecordDict], Message]]:
            for request in requests:
                content = session_content(request)
                node = self.node_for(request.partition_id, sent)
                sent[node] += 1
                yield (request.partition_id, content), Message(content, dst_node_id=node, message_type=kind)

        given_up = lambda key: failed(key[0])  # noqa: E731 - the session already failed on the step stream
        for (pid, content), reply in flow(self.grid, messages(), window, timeout, tick, given_up):
            yield pid, SessionReply(None) if reply is None and failed(pid) else _session_reply(kind, content, reply)

    def node_for(self, client: int, sent: Counter[int]) -> int:
        """The node a session of ``client`` goes to, given the sessions ``sent`` to each node so far."""
        if client in self.nodes:
            return self.nodes[client]
        node = least_loaded(client, self.shared, sent)
        if node is None:
            raise ValueError(f"no online node serves client {client}")
        return node


def _session_reply(kind: str, content: RecordDict, reply: Message | None) -> SessionReply:
    """A reply message as the round loop wants it (a training report with its message sizes, or
    evaluation metrics), or why there is none."""
    try:
        report, reason = _reply_report(reply)
        if report is not None and kind == "train":
            report = TrainReport.from_record(report)
            report.message_bytes_down = record_bytes(content)
            report.message_bytes_up = record_bytes(reply.content)
            if "weights" in reply.content.array_records:
                report.weights = reply.content.array_records["weights"].to_torch_state_dict()
        elif report is not None:
            report = EvalReport.from_record(reply.content.metric_records["metrics"])
    except (ValueError, KeyError, TypeError) as err:  # a malformed report drops its client, never the run
        return SessionReply(None, f"malformed report: {type(err).__name__}: {err}")
    return SessionReply(report, reason)


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Within: SIGTERM (how Flower stops a run) raises SystemExit, which unwinds through rounds.run
    (status "failed"); Flower's own handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario given by the run-config (tuning first when ``tune-trials > 0``)."""
    log_to_stderr("hosl", "fl_app")
    try:  # a bad run-config is one line first, before the traceback Flower prints
        config = make_config(context.run_config)
        out_dir = run_folder(config.run.out_dir, config)
        check_scenario(config, data=False)  # the clients hold the data and check it themselves
        check_out_dir(out_dir, resume=config if config.run.resume else None)
        credentials = stream_credentials(config)
    except ValueError as err:
        print(f"[hosl] error: {err}", flush=True)
        raise
    try:
        coord = Coordinator(config, out_dir, credentials)
    except RunFolderBusy as err:  # a second run into the folder: refused before training
        print(f"[hosl] error: {err}", flush=True)
        raise
    try:
        with _exit_on_sigterm():
            _run(grid, coord)
    except WriteFailed as err:  # e.g. a full disk: one line first (results.json says failed if it could be written)
        print(f"[hosl] error: {err}", flush=True)
        raise
    finally:
        coord.close()


def _run(grid: Grid, coord: Coordinator) -> None:
    """Resume if asked, find the nodes, optionally time Flower round trips, run the rounds."""
    config = coord.config
    if config.run.resume:
        try:
            coord.resume(coord.out_dir)
        except CheckpointRefused as err:  # one line first (resume marked the run it would continue failed)
            print(f"[hosl] error: {err}", flush=True)
            raise
    bound = config.federation.num_clients if config.federation.virtual_clients else MAX_CLIENTS
    fed = FlowerFederation(
        grid, QUERY_TIMEOUT, config.federation.min_clients, wait=config.federation.round_timeout, max_clients=bound
    )
    print(
        f"[hosl] {len(fed.nodes) + len(fed.shared)} client nodes"
        + (f" ({len(fed.shared)} serving {len(fed.shared_clients())} clients)" if fed.shared else "")
        + f"; step stream on {coord.advertised_address}; mode {config.run.mode}, "
        f"bottoms {config.federation.bottoms}",
        flush=True,
    )
    coord.record_federation(fed.num_clients())  # the federation decides, not the scenario
    if fed.num_clients() != config.federation.num_clients:
        print(f"[hosl] warning: {num_clients_mismatch(config.federation.num_clients, fed.num_clients())}", flush=True)
    if config.run.probe_messages:
        rtts = probe_message_rtt(grid, fed.probe_node(), config.run.probe_messages)
        coord.record_message_rtts(rtts)
        print(f"[hosl] Flower message round trip: mean {sum(rtts) / len(rtts):.3f} s over {len(rtts)}", flush=True)
    rounds.run(fed, coord)
