"""The ClientApp's side of a node's warm worker: hand a message to it over a private Unix socket.

Flower runs each message in a fresh ``flwr-clientapp`` process, which would import torch and
transformers and load the bottom every time (most of a deployment round). A node started with a
warm worker (``scripts/start_node.sh``: node config ``worker-socket``) keeps those in one process;
this module, which imports only Flower and the standard library, forwards the message's content and
the node's context to it and takes back the reply's content and the context's new state. The
worker checks that it serves this node (its node config) with this run's code (:func:`code_fingerprint`);
when it cannot be reached, the message fails with the reason (never run here instead), and
``start_node.sh`` restarts it.

Wire format, both ways: frames of an 8-byte big-endian length and that many bytes. A request is a
JSON header (``protocol``, ``kind``, ``code``), the content's and the context's protobufs; a reply is
a JSON header (``ok``, else ``error``), the reply content's and the new state's protobufs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

PROTOCOL = 1
KINDS = ("query", "train", "evaluate")
CONNECT_SECONDS = 60.0  # how long a message waits for a worker being restarted (imports take ~10 s)
REPLY_MARGIN = 60.0  # a worker's reply may take the run's round-timeout and this much more
MAX_SOCKET_PATH = 100  # bytes; Linux's sun_path holds 107 and a terminating zero
_LENGTH = struct.Struct(">Q")
_PEER = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SOURCES = ("client_app", "fl_app")  # the packages whose code a worker must share with the run


def code_fingerprint(root: Path | None = None) -> str:
    """SHA-256 of the node-side code (``client_app`` and ``fl_app`` sources, subpackages included)
    under ``root``; files a Flower FAB leaves out (``test_*.py``, ``*_test.py``) are left out here too."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in _SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            if path.name.startswith("test_") or path.name.endswith("_test.py") or "__pycache__" in path.parts:
                continue
            digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def send_frames(sock: socket.socket, parts: list[bytes]) -> None:
    """Write ``parts`` as length-prefixed frames."""
    sock.sendall(b"".join(_LENGTH.pack(len(p)) + p for p in parts))


def recv_frames(sock: socket.socket, count: int, within: float | None = None) -> list[bytes]:
    """Read ``count`` length-prefixed frames; ConnectionError if the peer goes first, TimeoutError if they
    have not all arrived ``within`` seconds (a whole-request deadline: a peer trickling a byte at a time
    cannot hold the reader longer)."""
    deadline = None if within is None else time.monotonic() + within
    return [
        _recv_exact(sock, _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))[0], deadline) for _ in range(count)
    ]


def _recv_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytes:
    chunks, left = [], size
    while left:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the request did not arrive whole in time ({size - left} of {size} bytes)")
            sock.settimeout(remaining)
        chunk = sock.recv(min(left, 1 << 22))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _records_bytes(records: RecordDict) -> bytes:
    return recorddict_to_proto(records).SerializeToString()


def _records(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def pack_request(kind: str, content: RecordDict, context: Context, code: str) -> list[bytes]:
    header = {"protocol": PROTOCOL, "kind": kind, "code": code}
    return [json.dumps(header).encode(), _records_bytes(content), context_to_proto(context).SerializeToString()]


def unpack_request(parts: list[bytes]) -> tuple[RecordDict, Context]:
    """The content and context of a request's last two frames (the header is read apart)."""
    context = ProtoContext()
    context.ParseFromString(parts[1])
    return _records(parts[0]), context_from_proto(context)


def pack_reply(header: dict[str, Any], content: RecordDict, state: RecordDict) -> list[bytes]:
    return [json.dumps(header).encode(), _records_bytes(content), _records_bytes(state)]


def _connect(path: str, wait: float) -> socket.socket:
    """A connection to the worker at ``path``, waiting up to ``wait`` s for one being (re)started."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.2, deadline - time.monotonic()))  # a full backlog must not block past the wait
        try:
            sock.connect(path)
            sock.settimeout(None)
            return sock
        except OSError as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(
                    f"this node's warm worker (node config worker-socket = {path!r}) did not answer for {wait:.0f} s "
                    f"({err.strerror or err}): is scripts/start_node.sh running? its log names the cause"
                ) from err
            time.sleep(0.2)


class WorkerUnavailable(RuntimeError):
    """The node's warm worker could not be reached, or failed mid-message."""


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    return _PEER.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))[1]


def forward(path: str, kind: str, content: RecordDict, context: Context, wait: float | None = None) -> RecordDict:
    """Run ``kind`` on the worker at ``path``; the context's state becomes the worker's reply state.
    The socket's folder must be private and the worker this user's. A worker that refuses (another
    node's config, other code), fails or outlasts the run's round-timeout raises WorkerUnavailable."""
    problem = socket_dir_problem(path)
    if problem:
        raise WorkerUnavailable(f"this node's worker-socket {path!r} is not private ({problem}); no session sent")
    with _connect(path, CONNECT_SECONDS if wait is None else wait) as sock:
        if peer_uid(sock) != os.getuid():
            raise WorkerUnavailable(f"the process at {path!r} belongs to another user; no session sent")
        sock.settimeout(float(context.run_config.get("round-timeout", 3600.0)) + REPLY_MARGIN)
        try:
            send_frames(sock, pack_request(kind, content, context, code_fingerprint()))
            header, reply, state = recv_frames(sock, 3)
        except OSError as err:  # ConnectionError included: the worker died with the message
            raise WorkerUnavailable(f"this node's warm worker at {path!r} stopped mid-message: {err}") from err
    meta = json.loads(header)
    if not meta.get("ok"):
        raise WorkerUnavailable(f"this node's warm worker at {path!r} refused the message: {meta.get('error')}")
    context.state = _records(state)
    return _records(reply)


def socket_dir_problem(path: str) -> str:
    """Why the worker socket cannot be used: too long a path, or a folder not private to this user
    ('' when it can)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return f"the path is {len(os.fsencode(path))} bytes; Unix sockets take at most {MAX_SOCKET_PATH}"
    folder = Path(path).parent
    try:
        info = folder.stat()
    except OSError as err:
        return f"{folder}: {err.strerror}"
    if info.st_uid != os.getuid():
        return f"{folder} belongs to uid {info.st_uid}, not this user ({os.getuid()})"
    if info.st_mode & 0o077:
        return f"{folder} is open to other users (mode {info.st_mode & 0o777:o}; it must be 700)"
    return ""
