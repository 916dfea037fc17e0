"""Flower ClientApp: holds a bottom (ZO in hosl) and its data partition.

On a session message it opens the step stream named in the message, runs its steps, and
replies with its report. Trainable weights, the step counter and the sync position persist in
``context.state`` (the only per-node state Flower keeps between messages).
"""
from __future__ import annotations

import logging
import traceback

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app.client_session import ClientState, History, client_order, run_eval_session, run_session
from fl_app.config import make_config

log = logging.getLogger(__name__)
app = ClientApp()

SCALAR_REPORT_KEYS = ("steps", "train-loss", "bytes-up", "bytes-down", "peak-memory-bytes", "step-seconds",
                      "session-seconds", "caught-up-updates", "lr", "partition-id", "subset-plan", "subset-batches",
                      "selection-seconds", "selection-bytes-up", "selection-bytes-down")

def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node config is missing {err} (set --node-config 'partition-id=0 num-partitions=2')") from err

def _load_state(context: Context) -> ClientState | None:
    if "client" not in context.state.config_records:
        return None
    meta = context.state.config_records["client"]
    weights = context.state.array_records["bottom"].to_torch_state_dict() if "bottom" in context.state.array_records else {}
    return ClientState(weights=weights, steps=int(meta["steps"]), synced_round=int(meta["synced-round"]),
                       trial=int(meta["trial"]), subset_ids=[int(i) for i in meta["subset-ids"]],
                       subset_weights=[float(w) for w in meta["subset-weights"]])

def _save_state(context: Context, state: ClientState) -> None:
    """The client's weights (bfloat16 ones as float32: numpy, under ArrayRecord, has no bfloat16; the
    values are exact and restoring copies them back into the bfloat16 bottom) and counters."""
    context.state.array_records["bottom"] = ArrayRecord(
        {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.weights.items()})
    context.state.config_records["client"] = ConfigRecord({
        "steps": state.steps, "synced-round": state.synced_round, "trial": state.trial,
        "subset-ids": list(state.subset_ids), "subset-weights": list(state.subset_weights)})

def _history(record: ConfigRecord) -> History | None:
    if "h-rounds" not in record:
        return None
    q = int(record["h-queries"])
    if q == 0:  # nothing to replay yet (first round)
        return History()
    seeds, grads = list(record["h-seeds"]), list(record["h-grads"])
    return History(rounds=list(record["h-rounds"]), clients=list(record["h-clients"]), lrs=list(record["h-lrs"]),
                   seeds=[seeds[i : i + q] for i in range(0, len(seeds), q)],
                   grads=[grads[i : i + q] for i in range(0, len(grads), q)],
                   rows=[bytes(r) for r in record["h-rows"]] if "h-rows" in record else [])

def _session_inputs(msg: Message, context: Context):
    """(config with the trial's overrides, session settings, partition id, partition count, synced
    history, averaged bottom)."""
    records, arrays = msg.content.config_records, msg.content.array_records
    overrides = dict(records["overrides"]) if "overrides" in records else {}
    config = make_config({**context.run_config, **overrides})
    session = dict(records["session"])
    partition_id, num_partitions = _partition(context)
    history = _history(records["history"]) if "history" in records else None
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
    return Message(RecordDict({"node": ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one training session over the step stream and report."""
    try:
        config, session, partition_id, num_partitions, history, average = _session_inputs(msg, context)
        own_data = str(context.node_config.get("data-dir", ""))  # a node's own data instead of a partition
        report, state = run_session(config, partition_id, num_partitions, _load_state(context), session, history,
                                    average, train_data_dir=own_data)
    except Exception as err:  # the server must learn why; state stays as it was (nothing half-saved)
        log.debug(traceback.format_exc())
        return _error_reply(msg, context, err)
    _save_state(context, state)
    content = RecordDict({
        "report": ConfigRecord({"ok": True, **{k: report[k] for k in SCALAR_REPORT_KEYS},
                                "losses": [float(x) for x in report["losses"]],
                                "seeds": [int(s) for step in report["seeds"] for s in step],
                                "grads": [float(g) for step in report["grads"] for g in step],
                                "rows": [bytes(r) for r in report["rows"]]}),
    })
    if config["bottoms"] == "synced" and client_order(config) == "fo":  # FO clients sync by FedAvg of weights
        content["weights"] = ArrayRecord({k: v.contiguous() for k, v in state.weights.items()})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this node's shard of the dev or test split through its bottom and the server's top."""
    try:
        config, session, partition_id, num_partitions, history, average = _session_inputs(msg, context)
        state = _load_state(context)
        if average:
            state = ClientState(weights=average, steps=state.steps if state else 0,  # the average is this trial's
                                synced_round=state.synced_round if state else 0, trial=int(session.get("trial", 0)))
        result = run_eval_session(config, partition_id, num_partitions, state, session, history)
    except Exception as err:
        return _error_reply(msg, context, err)
    metrics = {k: float(v) for k, v in result.items() if k in ("accuracy", "loss", "count", "bytes-up", "bytes-down")
               and v is not None}
    return Message(RecordDict({"report": ConfigRecord({"ok": True, "partition-id": partition_id}),
                               "metrics": MetricRecord(metrics)}), reply_to=msg)
