"""The reply to a session that failed (light: the ClientApp sends it without its worker)."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, RecordDict

log = logging.getLogger(__name__)


def error_reply(content: RecordDict, context: Context, error: str) -> RecordDict:
    """Why the session failed, and for which client (the server rolls its steps back)."""
    log.error("client session failed: %s", error)
    session = content.config_records.get("session", {})
    partition_id = int(session.get("client", context.node_config.get("partition-id", -1)))
    return RecordDict({"report": ConfigRecord({"ok": False, "error": error[:2000], "partition-id": partition_id})})
