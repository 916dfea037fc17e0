"""A node's warm worker: runs the ClientApp's messages in one long-lived process.

    python -m client_app.worker --socket DIR/worker.sock --node-config "partition-id=0 ..."

Started with the SuperNode by ``scripts/start_node.sh`` (which restarts it if it exits), with the
same ``--node-config`` as the SuperNode. It imports torch, transformers and the sessions before it
listens, keeps the bottom and the data between messages (:mod:`fl_app.client_session` caches
them), and serves one message at a time on a Unix socket in a folder only its user can open. It is
bound to its node: a message whose node config (the node's key file, state folder, partitions...)
differs from the worker's, whose code differs from the worker's, or whose peer is another user, is
refused with the reason, which the ClientApp reports to the server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.config import parse_config_args

from client_app.warm import (
    KINDS,
    PROTOCOL,
    code_fingerprint,
    pack_reply,
    peer_uid,
    recv_frames,
    send_frames,
    socket_dir_problem,
    unpack_request,
)
from fl_app.allocator import active_allocator
from fl_app.metrics import release_freed_memory

log = logging.getLogger("hosl.worker")
REQUEST_SECONDS = 30.0  # to read a request or write a reply; the session itself may take the run's time


def config_mismatch(bound: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """How the message's node config differs from the worker's ('' when it does not)."""
    keys = sorted(set(bound) | set(given))
    diffs = [f"{k}: worker {bound.get(k)!r}, message {given.get(k)!r}" for k in keys if bound.get(k) != given.get(k)]
    return "; ".join(diffs)


class Worker:
    """Serves messages for one node: ``serve`` forever, ``handle_connection`` one at a time."""

    def __init__(self, path: str, node_config: Mapping[str, Any]):
        if node_config.get("worker-socket") != path:
            raise ValueError(
                f"--node-config must name this worker's socket (worker-socket = {path!r}), as the SuperNode's does; "
                f"it names {node_config.get('worker-socket')!r}"
            )
        self.path, self.node_config = path, dict(node_config)
        self.code = code_fingerprint()
        self.sessions: Any = None

    def refusal(self, header: Any, node_config: Mapping[str, Any]) -> str:
        """Why this worker will not run the message ('' when it will)."""
        if not isinstance(header, dict) or header.get("protocol") != PROTOCOL or header.get("kind") not in KINDS:
            return f"unknown request header {str(header)[:200]}"
        if header.get("code") != self.code:
            return (
                "the worker runs other code than this run's app (client_app / fl_app differ): install the run's "
                "version on the node and restart it (scripts/start_node.sh)"
            )
        mismatch = config_mismatch(self.node_config, node_config)
        return f"the worker is bound to another node config ({mismatch})" if mismatch else ""

    def handle_connection(self, conn: socket.socket) -> None:
        """Read one request, run it (unless refused), and reply."""
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("refused a connection from uid %d", uid)
            return
        parts = recv_frames(conn, 3, within=REQUEST_SECONDS)  # the whole request, not each read
        header = json.loads(parts[0])
        content, context = unpack_request(parts[1:])
        why = self.refusal(header, context.node_config)
        if why:
            log.warning("refused a message: %s", why)
            return _answer(conn, {"ok": False, "error": why})
        started = time.perf_counter()
        conn.settimeout(None)  # the session takes what the run allows; the ClientApp side times it out
        try:
            reply = getattr(self.sessions, header["kind"])(content, context)
        except Exception as err:  # e.g. a query on a bad config: the ClientApp reports it
            log.exception("%s message failed", header["kind"])
            return _answer(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
        _answer(conn, {"ok": True}, reply, context.state)
        release_freed_memory(force=True)  # hold no step's memory until the next message
        log.info("%s message done in %.2f s", header["kind"], time.perf_counter() - started)

    def serve(self) -> None:
        """Check the socket's place, load the sessions, then listen until stopped (SIGTERM / SIGINT),
        one message at a time."""
        problem = socket_dir_problem(self.path)
        if problem:
            raise SystemExit(f"worker socket {self.path}: {problem}")
        _claim(self.path)
        from client_app import sessions  # the imports the worker exists to keep warm

        self.sessions = sessions
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(4)
        signal.signal(signal.SIGTERM, _stop)
        log.info("warm worker ready on %s (code %s, allocator %s)", self.path, self.code[:12], active_allocator())
        try:
            while True:
                conn, _ = listener.accept()
                with conn:
                    try:
                        self.handle_connection(conn)
                    except Exception as err:  # a ClientApp that went away or sent garbage; the next one is served
                        log.warning("message dropped: %s: %s", type(err).__name__, err)
        finally:
            listener.close()
            Path(self.path).unlink(missing_ok=True)


def _answer(
    conn: socket.socket, header: dict[str, Any], reply: RecordDict | None = None, state: RecordDict | None = None
) -> None:
    """Send the reply (a refusal or failure carries neither content nor state)."""
    conn.settimeout(REQUEST_SECONDS)
    send_frames(conn, pack_reply(header, reply or RecordDict(), state or RecordDict()))


def _stop(*_: object) -> None:
    """SIGTERM: leave (once; start_node.sh may send it twice) through the ``finally`` that removes the socket."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def _claim(path: str) -> None:
    """Remove a dead worker's socket file; refuse if a live worker still answers on it, or if the
    path is something other than a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"{path} exists and is not a socket: not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a dead worker's
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SystemExit(f"another worker already serves {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on (in a folder of mode 700)")
    parser.add_argument("--node-config", required=True, help="the SuperNode's --node-config, worker-socket included")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Worker(args.socket, parse_config_args([args.node_config])).serve()


if __name__ == "__main__":
    main()
