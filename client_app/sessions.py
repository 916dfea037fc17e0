"""What the ClientApp does with each message, on the node's own process or its warm worker.

On a session message it opens the step stream named in the message, runs its steps, and replies
with its report (each handler takes the message's content and the node's context and returns the
reply's content; :mod:`client_app.app` wraps them for Flower). A node bound to one partition keeps
its trainable weights, step counter and sync position in ``context.state`` (the only per-node state
Flower keeps between messages). A node serving several clients (node config ``partitions``, or the
run's ``virtual-clients``) keeps nothing per client in memory: each session loads its client's state
from the client store on disk and writes it back, so a client can move between nodes and the server
process (which holds every simulated node's ``context``) does not grow with the clients (see
:mod:`fl_app.virtual_clients`).
"""

from __future__ import annotations

import logging
import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client_app.replies import error_reply
from fl_app.client_session import ClientSide, NodeSettings, run_eval_session, run_session
from fl_app.config import Config, make_config
from fl_app.records import (
    ClientState,
    SessionRequest,
    SessionSettings,
    history_from_record,
    state_from_records,
    state_to_records,
)
from fl_app.virtual_clients import PartitionSet, node_clients

log = logging.getLogger(__name__)


def _clients(context: Context, config: Config) -> tuple[PartitionSet, int]:
    """The clients this node serves and the partition count the data is cut by."""
    return node_clients(context.node_config, config.federation.virtual_clients, config.federation.num_clients)


def _load_state(context: Context) -> ClientState | None:
    if "client" not in context.state.config_records:
        return None
    arrays = context.state.array_records
    weights = arrays["bottom"].to_torch_state_dict() if "bottom" in arrays else {}
    return state_from_records(weights, context.state.config_records["client"])


def _save_state(context: Context, state: ClientState) -> None:
    weights, counters = state_to_records(state)
    context.state.array_records["bottom"] = ArrayRecord(weights)
    context.state.config_records["client"] = ConfigRecord(counters)


def _session_inputs(content: RecordDict, context: Context) -> tuple[SessionRequest, ClientSide, bool]:
    """The session the message asks for, what this node brings to it (its config, the client's
    partition, saved state and node settings), and whether the node keeps that state in memory (it
    serves one client) rather than in the client store."""
    records, arrays = content.config_records, content.array_records
    request = SessionRequest(
        SessionSettings.from_record(records["session"]),
        dict(records["overrides"]) if "overrides" in records else {},
        history_from_record(records["history"]) if "history" in records else None,
        arrays["average"].to_torch_state_dict() if "average" in arrays else None,
    )
    config = make_config(context.run_config)
    clients, num_partitions = _clients(context, config)
    client = request.session.client
    if client not in clients:
        raise ValueError(f"the session is for client {client}, but this node serves clients {clients.text!r}")
    node = NodeSettings.from_node_config(context.node_config)
    if clients.single_client is not None:
        return request, ClientSide(config, client, num_partitions, _load_state(context), node), True
    if request.session.node_auth:
        raise ValueError(
            f"the server authenticates nodes (stream-secret-file), and a node key proves one client, but this node "
            f"serves clients {clients.text!r}: give each client its own SuperNode, or run without stream-secret-file"
        )
    if node.state_folder(request.session) is None:
        raise ValueError(
            f"this node serves clients {clients.text!r} and keeps their states in the client store on disk (the "
            "run folder's, or node config state-dir), but the run keeps no client states (client-checkpoints = false)"
        )
    return request, ClientSide(config, client, num_partitions, None, node), False


def query(content: RecordDict, context: Context) -> RecordDict:
    """Tell the server which clients this node serves (the ServerApp cannot read node configs)."""
    clients, num_partitions = _clients(context, make_config(context.run_config))
    single = clients.single_client
    node = {
        "partition-id": -1 if single is None else single,
        "num-partitions": num_partitions,
        "partitions": clients.text,
    }
    return RecordDict({"node": ConfigRecord(node)})


def train(content: RecordDict, context: Context) -> RecordDict:
    """Run one training session over the step stream and report."""
    try:
        request, side, in_memory = _session_inputs(content, context)
        report, state = run_session(request, side)
    except Exception as err:  # the server must learn why; state stays as it was (nothing half-saved)
        log.debug(traceback.format_exc())
        return error_reply(content, context, f"{type(err).__name__}: {err}")
    if in_memory:  # a node serving one client keeps it in memory too (run_session wrote the client store)
        _save_state(context, state)
    reply = RecordDict({"report": ConfigRecord({"ok": True, **report.to_record()})})
    if report.weights is not None:  # synced FO clients: their bottom, for the server's average
        reply["weights"] = ArrayRecord({k: v.contiguous() for k, v in report.weights.items()})
    return reply


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Score this node's shard of the dev or test split through its bottom and the server's top."""
    try:
        request, side, _ = _session_inputs(content, context)
        result = run_eval_session(request, side)
    except Exception as err:
        return error_reply(content, context, f"{type(err).__name__}: {err}")
    return RecordDict(
        {
            "report": ConfigRecord({"ok": True, "partition-id": side.partition_id}),
            "metrics": MetricRecord(result.to_record()),
        }
    )
