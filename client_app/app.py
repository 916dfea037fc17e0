"""Flower ClientApp: holds a bottom (ZO in hosl) and its data partition, or serves several clients.

Each message is handled by :mod:`client_app.sessions`: here, or on the node's warm worker when the
node config names one (``worker-socket``, set by ``scripts/start_node.sh``). This module imports only
Flower, so a deployment's per-message ``flwr-clientapp`` process starts in well under a second when
a worker holds torch, transformers and the bottom (:mod:`client_app.warm`).
"""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client_app.replies import error_reply
from client_app.warm import WorkerUnavailable, forward

app = ClientApp()


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content for a ``kind`` message: from the node's worker if it has one, else from here."""
    path = str(context.node_config.get("worker-socket", ""))
    if path:
        return forward(path, kind, content, context)
    from client_app import sessions  # torch, transformers: only where no worker holds them

    return getattr(sessions, kind)(content, context)


def _session(kind: str, msg: Message, context: Context) -> Message:
    try:
        reply = handle(kind, msg.content, context)
    except WorkerUnavailable as err:  # the server learns why and rolls the session back
        reply = error_reply(msg.content, context, str(err))
    return Message(reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which clients this node serves (the ServerApp cannot read node configs)."""
    return Message(handle("query", msg.content, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run one training session over the step stream and report."""
    return _session("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this node's shard of the dev or test split through its bottom and the server's top."""
    return _session("evaluate", msg, context)
