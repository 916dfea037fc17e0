"""Flower ClientApp: holds a bottom (ZO in hosl) and its data partition.

On a session message it opens the step stream named in the message, runs its steps, and
replies with its report. Trainable weights, the step counter and the sync position persist in
``context.state`` (the only per-node state Flower keeps between messages).
"""

from __future__ import annotations

import logging
import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.client_session import ClientSide, NodeSettings, run_eval_session, run_session
from fl_app.config import make_config
from fl_app.records import (
    ClientState,
    SessionRequest,
    SessionSettings,
    history_from_record,
    state_from_records,
    state_to_records,
)

log = logging.getLogger(__name__)
app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node config is missing {err} (set --node-config 'partition-id=0 num-partitions=2')") from err


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


def _session_inputs(msg: Message, context: Context) -> tuple[SessionRequest, ClientSide]:
    """The session the message asks for and what this node brings to it (its config, partition,
    saved state and node settings)."""
    records, arrays = msg.content.config_records, msg.content.array_records
    request = SessionRequest(
        SessionSettings.from_record(records["session"]),
        dict(records["overrides"]) if "overrides" in records else {},
        history_from_record(records["history"]) if "history" in records else None,
        arrays["average"].to_torch_state_dict() if "average" in arrays else None,
    )
    partition_id, num_partitions = _partition(context)
    node = NodeSettings.from_node_config(context.node_config)
    return request, ClientSide(
        make_config(context.run_config), partition_id, num_partitions, _load_state(context), node
    )


def _error_reply(msg: Message, context: Context, err: Exception) -> Message:
    log.error("client session failed: %s", err)
    partition_id = int(context.node_config.get("partition-id", -1))
    record = ConfigRecord({"ok": False, "error": f"{type(err).__name__}: {err}"[:2000], "partition-id": partition_id})
    return Message(RecordDict({"report": record}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition (the ServerApp cannot read node configs)."""
    partition_id, num_partitions = _partition(context)
    return Message(
        RecordDict({"node": ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})}),
        reply_to=msg,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one training session over the step stream and report."""
    try:
        report, state = run_session(*_session_inputs(msg, context))
    except Exception as err:  # the server must learn why; state stays as it was (nothing half-saved)
        log.debug(traceback.format_exc())
        return _error_reply(msg, context, err)
    _save_state(context, state)
    content = RecordDict({"report": ConfigRecord({"ok": True, **report.to_record()})})
    if report.weights is not None:  # synced FO clients: their bottom, for the server's average
        content["weights"] = ArrayRecord({k: v.contiguous() for k, v in report.weights.items()})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this node's shard of the dev or test split through its bottom and the server's top."""
    try:
        request, side = _session_inputs(msg, context)
        result = run_eval_session(request, side)
    except Exception as err:
        return _error_reply(msg, context, err)
    return Message(
        RecordDict(
            {
                "report": ConfigRecord({"ok": True, "partition-id": side.partition_id}),
                "metrics": MetricRecord(result.to_record()),
            }
        ),
        reply_to=msg,
    )
