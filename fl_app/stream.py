"""Direct step transport between a client session and the server: one gRPC bidirectional stream.

Each request frame is a serialised :class:`~fl_app.protocol.StepRequest`, each response a
:class:`~fl_app.protocol.StepReply`, both sealed with a step counter and a MAC
(:mod:`fl_app.frame_auth`). A stream must present the session's token and a proof that it holds
the session key; an unknown or closed token, a wrong proof, and a second stream on a token that
already has one (a session has exactly one stream, once) are refused before the stream takes a worker
slot (gRPC answers UNIMPLEMENTED, the server's log says why), so streams that prove nothing cannot
crowd out sessions. An admitted stream is answered first with an empty accept frame. A frame with a
bad MAC or an unexpected counter (replayed, reordered) fails its session (rolled back) and is refused
with UNAUTHENTICATED. Every refusal is counted (:meth:`SessionTable.refusals`) and logged at most once
per interval per peer (or, for streams refused before they have one, per reason). Frames above the
size limit are refused by gRPC itself; malformed frames end that session with INVALID_ARGUMENT while
the server keeps serving the others. At most ``max_workers`` streams are served at once; a client
refused for that (RESOURCE_EXHAUSTED) retries with back-off until its admission deadline. TLS is used
when a certificate and key are given.
"""

from __future__ import annotations

import logging
import queue
import random
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
ACCEPT_FRAME = b""  # the server's first frame on an admitted stream
Handler = Callable[[str, bytes], "bytes | None"]  # None: the frame needs no reply
LOG_INTERVAL_S = 10.0  # refusals of one peer (or reason) are logged at most once per interval
RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED,)  # worth a retry at admission (no worker slot free)


@dataclass
class Session:
    """Server-side record of one client session."""

    client_id: str
    token: str
    key: bytes = b""  # the session's MAC key (from the token and the node's key, if any)
    status: str = "open"  # open -> done | failing -> failed
    reason: str = ""
    base: str = ""  # a training session's starting state: the id of its client's last committed session
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
        self._unlogged: Counter[tuple[str, str]] = Counter()  # refusals since the last line, by (kind, source)
        self._logged_at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def open_session(self, client_id: str, node_key: bytes | None = None) -> Session:
        """A new session with a fresh secret token; its stream must present the token and prove it
        holds the session key (derived from the token and ``node_key``, the client node's key)."""
        token = secrets.token_hex(16)
        session = Session(client_id=client_id, token=token, key=session_key(token, node_key))
        with self._lock:
            self.sessions[session.token] = session
        return session

    def refuse(self, kind: str, reason: str, peer: str | None) -> None:
        """Count one refused stream or frame; log it unless this peer's (``None``: this reason's)
        refusals were logged less than LOG_INTERVAL_S ago (the next line gives how many were not)."""
        source = peer if peer is not None else f"unidentified peers ({reason})"
        now = time.monotonic()
        with self._lock:
            self.refused[kind] += 1
            self._unlogged[(kind, source)] += 1
            if now - self._logged_at.get((kind, source), -LOG_INTERVAL_S) < LOG_INTERVAL_S:
                return
            if len(self._logged_at) > 1024:  # peers include their ephemeral ports: forget the quiet ones
                self._logged_at = {k: t for k, t in self._logged_at.items() if now - t < LOG_INTERVAL_S}
            self._logged_at[(kind, source)] = now
            count = self._unlogged.pop((kind, source))
        more = f" ({count} refusals since the last line)" if count > 1 else ""
        log.warning("refused %s from %s: %s%s", kind, source, reason, more)

    def admission(self, token: str, proof: str) -> tuple[Session | None, str]:
        """The open session a stream with ``token`` and ``proof`` may serve, or why not."""
        with self._lock:
            session = self.sessions.get(token)
        if session is None or session.status != "open":
            return None, "unknown or closed session token"
        if not secrets.compare_digest(proof, open_proof(session.key)):
            return None, "wrong session key (the node's stream-key-file is missing or not this node's)"
        if session.context is not None:
            return None, "session token already has its stream"
        return session, ""

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
        try:
            if self.on_failure is not None:
                self.on_failure(session)
        finally:  # a rollback that raised still leaves the session failed and its stream cancelled
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
        self._server.add_generic_rpc_handlers((_Admission(self, grpc.stream_stream_rpc_method_handler(self._serve)),))
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
        token = metadata.get(TOKEN_KEY, "")
        session, why = self.admission(token, metadata.get(PROOF_KEY, ""))
        with self._lock:  # a session has one stream, once (two streams admitted at once: the second stops here)
            if session is not None and session.context is not None:
                why = "session token already has its stream"
            elif session is not None:
                session.context = context
        if why:
            self.refuse("stream", why, context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        opener, sealer = FrameOpener(session.key, FROM_CLIENT), FrameSealer(session.key, FROM_SERVER)
        session.last_activity = time.monotonic()
        ended_cleanly = False

        def on_termination() -> None:  # runs when the RPC ends for any reason, on gRPC's polling thread:
            if not ended_cleanly and session.status == "open":  # the rollback runs on a thread of its own
                threading.Thread(
                    target=self.fail, args=(session, "client disconnected"), kwargs={"cancel": False}, daemon=True
                ).start()

        context.add_callback(on_termination)
        accept = sealer.seal(ACCEPT_FRAME)
        session.bytes_down += len(accept)
        yield accept
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
        except grpc.RpcError:  # the client's side of the stream broke: its termination callback fails the session
            raise
        except Exception as err:  # a frame no check caught: this session fails, the run goes on
            log.exception("frame of client %s could not be handled", session.client_id)
            self.fail(session, f"frame could not be handled: {type(err).__name__}: {err}", cancel=False)
            context.abort(grpc.StatusCode.INTERNAL, f"frame could not be handled: {type(err).__name__}")

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


class _Admission(grpc.GenericRpcHandler):
    """Serves the session method to streams whose metadata proves an open session, and to no other.

    gRPC asks for a stream's handler before it counts the stream against the server's concurrency
    limit or gives it a worker thread, so a refused stream (answered UNIMPLEMENTED, as if the method
    did not exist) costs a table lookup and a MAC comparison, never a worker slot."""

    def __init__(self, table: SessionTable, rpc: grpc.RpcMethodHandler):
        self.table, self.rpc = table, rpc

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != METHOD:
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        session, why = self.table.admission(metadata.get(TOKEN_KEY, ""), metadata.get(PROOF_KEY, ""))
        if session is None:
            self.table.refuse("stream", why, None)  # no peer address is known before a stream is served
            return None
        return self.rpc


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
        admission_s: float = 60.0,
    ):
        """Opens the stream and waits for the server to admit it: refused for lack of a worker slot, it
        retries with back-off for up to ``admission_s`` seconds (the session was opened, so the server
        is up: an unreachable one or a failed TLS handshake is not retried)."""
        options = _grpc_options(max_message_bytes)
        if root_certificate:
            self._channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificate), options=options
            )
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        key = session_key(token, node_key)
        self._sealer, self._opener = FrameSealer(key, FROM_CLIENT), FrameOpener(key, FROM_SERVER)
        self.bytes_up = 0
        self.bytes_down = 0
        try:
            self._admit(((TOKEN_KEY, token), (PROOF_KEY, open_proof(key))), admission_s)
        except BaseException:  # no object reaches the caller: end the stream and close the channel here
            self._outbox.put(None)
            self._channel.close()
            raise

    def _admit(self, metadata: tuple[tuple[str, str], ...], admission_s: float) -> None:
        """Open the stream until the server's accept frame arrives (see the class's ``__init__``)."""
        deadline, wait = time.monotonic() + admission_s, 0.05
        while True:
            self._outbox: queue.Queue[bytes | None] = queue.Queue()
            self._responses = self._channel.stream_stream(METHOD)(iter(self._outbox.get, None), metadata=metadata)
            try:
                accept = next(self._responses)
            except grpc.RpcError as err:
                self._outbox.put(None)
                if err.code() in RETRY_CODES and time.monotonic() + wait < deadline:
                    time.sleep(wait * (0.5 + random.random()))
                    wait = min(2 * wait, 5.0)
                    continue
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise ConnectionError(
                        "step stream refused: unknown or closed session token, a second stream for it, or a "
                        "wrong node key (the node's stream-key-file); the server's log says which"
                    ) from err
                raise ConnectionError(f"step stream failed: {err.code().name}: {err.details()}") from err
            except StopIteration as err:
                raise ConnectionError("step stream closed by the server before admitting the session") from err
            self.bytes_down += len(accept)
            try:
                if self._opener.open(accept) != ACCEPT_FRAME:
                    raise ConnectionError("the server's first frame is not the accept frame")
            except FrameRefused as err:
                raise ConnectionError(f"refused the server's accept frame: {err}") from err
            return

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
