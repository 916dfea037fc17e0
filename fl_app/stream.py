"""Direct step transport between a client session and the server: one gRPC bidirectional stream.

Each request frame is a serialised :class:`~fl_app.protocol.StepRequest`, each response a
:class:`~fl_app.protocol.StepReply`, both sealed with a step counter and a MAC
(:mod:`fl_app.frame_auth`). A stream must present the session's token and a proof that it holds
the session key; an unknown or closed token, a wrong proof, and a second stream on a token that
already has one (a session has exactly one stream, once) are refused with UNAUTHENTICATED. A frame
with a bad MAC or an unexpected counter (replayed, reordered) fails its session (rolled back) and is
refused the same way. Every refusal is logged with its reason and counted (:meth:`SessionTable.refusals`).
Frames above the size limit are refused by gRPC itself; malformed frames end that session with
INVALID_ARGUMENT while the server keeps serving the others. At most ``max_workers`` streams are
served at once; more are refused with RESOURCE_EXHAUSTED rather than queued. TLS is used when a
certificate and key are given.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from fl_app.frame_auth import FROM_CLIENT, FROM_SERVER, FrameOpener, FrameRefused, FrameSealer, open_proof, session_key
from fl_app.protocol import ProtocolError

log = logging.getLogger(__name__)

METHOD = "/hosl.SplitStep/Session"
TOKEN_KEY = "x-hosl-session"
PROOF_KEY = "x-hosl-proof"  # open_proof(session key): the stream holds the key, not just the token
CLOSE_FRAME = b""  # the client ends its session on purpose; a stream that ends without it was cut off
Handler = Callable[[str, bytes], "bytes | None"]  # None: the frame needs no reply


@dataclass
class Session:
    """Server-side record of one client session."""

    client_id: str
    token: str
    key: bytes = b""  # the session's MAC key (from the token and the node's key, if any)
    status: str = "open"  # open -> done | failing -> failed
    reason: str = ""
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_activity: float | None = None  # set when the stream connects; queued clients do not time out
    context: grpc.ServicerContext | None = None


def _grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class SessionTable:
    """Sessions by secret token: open, fail (rolling back through ``on_failure``), close, expire.

    The in-process federation (the local runner) uses it alone; :class:`StepStreamServer` serves
    the same sessions over gRPC."""

    def __init__(self, on_failure: Callable[[Session], None] | None = None):
        self.on_failure = on_failure
        self.sessions: dict[str, Session] = {}
        self.refused: Counter[str] = Counter()  # refused streams and frames, by kind
        self._lock = threading.Lock()

    def open_session(self, client_id: str, node_key: bytes | None = None) -> Session:
        """A new session with a fresh secret token; its stream must present the token and prove it
        holds the session key (derived from the token and ``node_key``, the client node's key)."""
        token = secrets.token_hex(16)
        session = Session(client_id=client_id, token=token, key=session_key(token, node_key))
        with self._lock:
            self.sessions[session.token] = session
        return session

    def refuse(self, kind: str, reason: str, peer: str) -> None:
        """Log and count one refused stream or frame."""
        with self._lock:
            self.refused[kind] += 1
        log.warning("refused %s from %s: %s", kind, peer, reason)

    def refusals(self) -> dict[str, int]:
        """How many streams and frames were refused, by kind (for results.json)."""
        with self._lock:
            return dict(self.refused)

    def fail(self, session: Session, reason: str, cancel: bool = True) -> None:
        """Fail ``session`` once: run the failure callback (e.g. roll back), then mark it failed and
        cancel its stream unless told not to. A session reads "failed" only once rolled back."""
        with self._lock:
            if session.status != "open":
                return
            session.status = "failing"
        log.warning("session of client %s dropped: %s", session.client_id, reason)
        if self.on_failure is not None:
            self.on_failure(session)
        session.reason, session.status = reason, "failed"
        if cancel and session.context is not None:
            session.context.cancel()

    def close_session(self, session: Session) -> Session:
        """End a session: it can no longer be used; returns its final record."""
        with self._lock:
            if session.status == "open":
                session.status = "done"
            self.sessions.pop(session.token, None)
        return session

    def expire_idle(self, timeout: float) -> list[Session]:
        """Fail connected sessions with no frame for ``timeout`` seconds (a stalled or vanished client).

        Sessions whose client has not connected yet (e.g. queued for a worker) are bounded by the
        round timeout instead.
        """
        now = time.monotonic()
        with self._lock:
            stale = [
                s
                for s in self.sessions.values()
                if s.status == "open" and s.last_activity is not None and now - s.last_activity > timeout
            ]
        for session in stale:
            self.fail(session, f"no step for {timeout:.0f} s (step timeout)")
        return stale

    def stop(self) -> None:
        """Nothing to stop in process; the gRPC server overrides this."""


class StepStreamServer(SessionTable):
    """Serves sessions over gRPC; ``handler(token, request_bytes) -> reply_bytes`` does the model work."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 8,
        max_message_bytes: int = 256 * 1024 * 1024,
        tls_cert: bytes | None = None,
        tls_key: bytes | None = None,
        on_failure: Callable[[Session], None] | None = None,
    ):
        super().__init__(on_failure)
        self.handler = handler
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="step-stream"),
            options=_grpc_options(max_message_bytes),
            maximum_concurrent_rpcs=max_workers,  # surplus streams are refused at once, not queued
        )
        rpc = grpc.stream_stream_rpc_method_handler(self._serve)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("hosl.SplitStep", {"Session": rpc}),)
        )
        address = f"{host}:{port}"
        if tls_cert is not None and tls_key is not None:
            self.port = self._server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
        else:
            self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind the step stream to {address}")
        self.host = host
        self._server.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _serve(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One session's stream, on a worker thread: check the token, then hand each frame to the
        handler and yield its reply (perturbed parts get none).

        How a stream ends decides the session: the client's close frame ends it cleanly (the
        coordinator then commits or rolls back on the client's report); anything else (a cut
        connection, a half-close without the close frame, a cancelled RPC) fails it at once; a frame
        with a bad MAC or counter fails it and aborts the stream with UNAUTHENTICATED, a malformed
        one with INVALID_ARGUMENT, so its partial server updates are rolled back while other
        sessions go on.
        """
        metadata = dict(context.invocation_metadata())
        token, proof = metadata.get(TOKEN_KEY, ""), metadata.get(PROOF_KEY, "")
        with self._lock:  # a session has one stream, once: a second or later stream on its token is refused
            session = self.sessions.get(token)
            if session is None or session.status != "open":
                why = "unknown or closed session token"
            elif not secrets.compare_digest(proof, open_proof(session.key)):
                why = "wrong session key (the node's stream-key-file is missing or not this node's)"
            elif session.context is not None:
                why = "session token already has its stream"
            else:
                why, session.context = "", context
        if why:
            self.refuse("stream", why, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        opener, sealer = FrameOpener(session.key, FROM_CLIENT), FrameSealer(session.key, FROM_SERVER)
        session.last_activity = time.monotonic()
        ended_cleanly = False

        def on_termination() -> None:  # runs when the RPC ends for any reason
            if not ended_cleanly and session.status == "open":
                self.fail(session, "client disconnected", cancel=False)

        context.add_callback(on_termination)
        try:
            for frame in requests:
                session.last_activity = time.monotonic()
                session.bytes_up += len(frame)
                payload = opener.open(frame)
                if payload == CLOSE_FRAME:
                    ended_cleanly = True
                    return
                answer = self.handler(token, payload)
                session.last_activity = time.monotonic()
                if answer is None:
                    continue
                sealed = sealer.seal(answer)
                session.bytes_down += len(sealed)
                session.steps += 1
                yield sealed
            # The request stream can end without an error when the connection is cut (gRPC may report
            # a vanished client as a half-close), so only the explicit close frame counts as clean.
            self.fail(session, "client disconnected (stream ended without closing the session)", cancel=False)
        except FrameRefused as err:
            self.refuse("frame", str(err), context.peer())
            self.fail(session, f"refused frame: {err}", cancel=False)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        except (ProtocolError, FloatingPointError) as err:
            self.fail(session, f"malformed frame: {err}", cancel=False)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


class StepStreamClient:
    """The client end of a session: ``exchange(request_bytes) -> reply_bytes`` over one stream.

    Frames are sealed and replies checked with the session key, from ``token`` and ``node_key``
    (the node's key when the server authenticates nodes)."""

    def __init__(
        self,
        address: str,
        token: str,
        root_certificate: bytes | None = None,
        max_message_bytes: int = 256 * 1024 * 1024,
        node_key: bytes | None = None,
    ):
        options = _grpc_options(max_message_bytes)
        if root_certificate:
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificate), options=options
            )
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        key = session_key(token, node_key)
        self._sealer, self._opener = FrameSealer(key, FROM_CLIENT), FrameOpener(key, FROM_SERVER)
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        call = self._channel.stream_stream(METHOD)
        metadata = ((TOKEN_KEY, token), (PROOF_KEY, open_proof(key)))
        self._responses = call(iter(self._outbox.get, None), metadata=metadata)
        self.bytes_up = 0
        self.bytes_down = 0

    def send(self, payload: bytes) -> None:
        """Send a frame that gets no reply (a perturbed-activation part)."""
        frame = self._sealer.seal(payload)
        self._outbox.put(frame)
        self.bytes_up += len(frame)

    def exchange(self, payload: bytes) -> bytes:
        self.send(payload)
        try:
            answer = next(self._responses)
        except grpc.RpcError as err:
            raise ConnectionError(f"step stream failed: {err.code().name}: {err.details()}") from err
        except StopIteration as err:
            raise ConnectionError("step stream closed by the server") from err
        self.bytes_down += len(answer)
        try:
            return self._opener.open(answer)
        except FrameRefused as err:
            raise ConnectionError(f"refused a reply of the server: {err}") from err

    def close(self) -> None:
        """End the session cleanly (close frame, half-close, wait for the server to finish the stream),
        then the channel."""
        self._outbox.put(self._sealer.seal(CLOSE_FRAME))
        self._outbox.put(None)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError:
            pass  # the stream had already failed; nothing more to wait for
        self._channel.close()
