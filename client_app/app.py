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

from fl_app.client_session import EVAL_METRICS, NodeSettings, run_eval_session, run_session
from fl_app.config import make_config
from fl_app.records import (
    ClientState,
    history_from_record,
    metric_value,
    report_to_record,
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


def _session_inputs(msg: Message, context: Context):
    """(config with the trial's overrides, session settings, partition id, partition count, synced
    history, averaged bottom)."""
    records, arrays = msg.content.config_records, msg.content.array_records
    overrides = dict(records["overrides"]) if "overrides" in records else {}
    config = make_config({**context.run_config, **overrides})
    session = dict(records["session"])
    partition_id, num_partitions = _partition(context)
    history = history_from_record(records["history"]) if "history" in records else None
    average = arrays["average"].to_torch_state_dict() if "average" in arrays else None
    return config, session, partition_id, num_partitions, history, average


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
        config, session, partition_id, num_partitions, history, average = _session_inputs(msg, context)
        own_data = str(context.node_config.get("data-dir", ""))  # a node's own data instead of a partition
        report, state = run_session(
            config,
            partition_id,
            num_partitions,
            _load_state(context),
            session,
            history,
            average,
            train_data_dir=own_data,
            node=NodeSettings.from_node_config(context.node_config),
        )
    except Exception as err:  # the server must learn why; state stays as it was (nothing half-saved)
        log.debug(traceback.format_exc())
        return _error_reply(msg, context, err)
    _save_state(context, state)
    weights = report.pop("weights", None)  # synced FO clients: their bottom, for the server's average
    content = RecordDict({"report": ConfigRecord({"ok": True, **report_to_record(report)})})
    if weights is not None:
        content["weights"] = ArrayRecord({k: v.contiguous() for k, v in weights.items()})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this node's shard of the dev or test split through its bottom and the server's top."""
    try:
        config, session, partition_id, num_partitions, history, average = _session_inputs(msg, context)
        node = NodeSettings.from_node_config(context.node_config)
        state = _load_state(context)
        result = run_eval_session(config, partition_id, num_partitions, state, session, history, average, node=node)
    except Exception as err:
        return _error_reply(msg, context, err)
    metrics = {k: metric_value(v) for k, v in result.items() if k in EVAL_METRICS and v is not None}
    return Message(
        RecordDict(
            {"report": ConfigRecord({"ok": True, "partition-id": partition_id}), "metrics": MetricRecord(metrics)}
        ),
        reply_to=msg,
    )
