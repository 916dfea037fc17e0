"""Per-frame authentication of the step stream (a step counter and a MAC on every frame), and the
key and certificate files it relies on.

Each frame travels as ``counter (8 bytes) | payload | tag (32 bytes)`` where ``tag`` is
HMAC-SHA256 over the direction, the counter and the payload, keyed by the session key. The receiver
expects counters 0, 1, 2, ... in order, so a replayed, reordered, dropped or altered frame is refused.

The session key is derived from the session token and, when the operator set one up, the node's
key: ``HMAC(node key, token)``. The token travels in the session message; the node key never
travels (the ServerApp derives it from its secret file, the SuperNode reads it from its own node
config), so on a link without TLS a token read off the wire is useless without the node key.
Without node keys the session key follows from the token alone and the MAC only guards against
replay and corruption (see docs/deployment.md for what an insecure link still exposes).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

TAG_BYTES = 32
COUNTER_BYTES = 8
OVERHEAD = COUNTER_BYTES + TAG_BYTES  # bytes a sealed frame adds to its payload
NO_NODE_KEY = b"hosl-step-stream-without-node-key"
FROM_CLIENT, FROM_SERVER = b"C", b"S"


class FrameRefused(Exception):
    """A frame that fails its MAC or arrives out of order."""


def node_key(secret: bytes, partition_id: int) -> bytes:
    """The key of the node holding ``partition_id``: what its ``stream-key-file`` holds (hex)."""
    return hmac.digest(secret, f"hosl-node-{partition_id}".encode(), "sha256")


MIN_DISTINCT_BYTES = 8  # a random 16-byte key has fewer with probability ~1e-9; zeros or a pattern have 1-4


def read_key_file(path: str, field: str) -> bytes:
    """A key or secret stored as hex in a file only its owner can read; a clear error naming ``field``
    otherwise (unreadable, not hex, shorter than 16 bytes, readable by others, or not random)."""
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
        mode = os.stat(path).st_mode & 0o777
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read a hex key from {field} '{path}': {err}") from err
    if len(key) < 16:
        raise ValueError(f"{field} '{path}' holds {len(key)} bytes; a key needs at least 16")
    if os.name == "posix" and mode & 0o077:
        raise ValueError(f"{field} '{path}' is readable by others (mode {mode:o}); make it private: chmod 600 '{path}'")
    if len(set(key)) < MIN_DISTINCT_BYTES:
        raise ValueError(
            f"{field} '{path}' holds {len(set(key))} distinct byte values in {len(key)} bytes: not a random key "
            "(write one with python -m fl_app.frame_auth secret FILE)"
        )
    return key


def read_pem(path: str, field: str) -> bytes:
    """A PEM file (certificate, key or CA); a clear error naming ``field`` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {field} '{path}': {err}") from err
    if b"-----BEGIN" not in data:
        raise ValueError(f"{field} '{path}' is not a PEM file")
    return data


def session_key(token: str, node: bytes | None = None) -> bytes:
    """The MAC key of one session."""
    return hmac.digest(node or NO_NODE_KEY, token.encode(), "sha256")


def open_proof(key: bytes) -> str:
    """What a stream presents when it opens: proves it holds the session key without revealing it."""
    return hmac.digest(key, b"open", "sha256").hex()


def _tag(key: bytes, direction: bytes, counter: bytes, payload: bytes) -> bytes:
    mac = hmac.new(key, direction, hashlib.sha256)
    mac.update(counter)
    mac.update(payload)
    return mac.digest()


class FrameSealer:
    """Seals the frames one side sends: counter, payload, tag."""

    def __init__(self, key: bytes, direction: bytes):
        self.key, self.direction, self.counter = key, direction, 0

    def seal(self, payload: bytes) -> bytes:
        counter = self.counter.to_bytes(COUNTER_BYTES, "big")
        self.counter += 1
        return b"".join((counter, payload, _tag(self.key, self.direction, counter, payload)))


class FrameOpener:
    """Checks the frames one side receives and returns their payloads."""

    def __init__(self, key: bytes, direction: bytes):
        self.key, self.direction, self.expected = key, direction, 0

    def open(self, frame: bytes) -> bytes:
        if len(frame) < COUNTER_BYTES + TAG_BYTES:
            raise FrameRefused(f"frame of {len(frame)} bytes is shorter than its counter and tag")
        counter, payload, tag = frame[:COUNTER_BYTES], frame[COUNTER_BYTES:-TAG_BYTES], frame[-TAG_BYTES:]
        if not hmac.compare_digest(tag, _tag(self.key, self.direction, counter, payload)):
            raise FrameRefused(f"frame {self.expected}: bad MAC (altered, or sealed with another session's key)")
        number = int.from_bytes(counter, "big")
        if number != self.expected:
            kind = "replayed" if number < self.expected else "out-of-order"
            raise FrameRefused(f"{kind} frame: counter {number}, expected {self.expected}")
        self.expected += 1
        return payload


def main(argv: list[str] | None = None) -> None:
    """``python -m fl_app.frame_auth secret FILE`` writes a new server secret;
    ``python -m fl_app.frame_auth node-key SECRET_FILE PARTITION_ID FILE`` writes that node's key."""
    import argparse
    import secrets

    from fl_app.checkpoint import write_private_file

    parser = argparse.ArgumentParser(prog="python -m fl_app.frame_auth", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make_secret = commands.add_parser("secret", help="a new server secret (for run config stream-secret-file)")
    make_secret.add_argument("file")
    make_node = commands.add_parser("node-key", help="a node's key (for node config stream-key-file)")
    make_node.add_argument("secret_file")
    make_node.add_argument("partition_id", type=int)
    make_node.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "secret":
        key = secrets.token_bytes(32)
    else:
        key = node_key(read_key_file(args.secret_file, "stream-secret-file"), args.partition_id)
    write_private_file(Path(args.file), (key.hex() + "\n").encode())


if __name__ == "__main__":
    main()
