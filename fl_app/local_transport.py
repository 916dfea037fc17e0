"""In-process transport: the server only ever sees bytes, as over the network."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

FrameHandler = Callable[[bytes], "bytes | None"]  # e.g. SplitServer.handle_bytes; None: no reply


class InProcessLink:
    """Carries client frames to a server's frame handler and replies back, counting bytes both ways.

    By default the server works on its own worker thread, so the client's memory tracker (per
    thread) does not count the server's allocations and the server scores streamed parts while
    the client computes the next ones; ``threaded=False`` calls it directly (for
    timing the server itself). With ``record=True`` every frame sent is kept in ``frames``.
    """

    def __init__(self, handle: FrameHandler, threaded: bool = True, record: bool = False):
        self.handle = handle
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-server") if threaded else None
        self.frames: list[bytes] | None = [] if record else None
        self.bytes_up = 0
        self.bytes_down = 0
        self._sent: list[Future] = []

    def _deliver(self, payload: bytes):
        self.bytes_up += len(payload)
        if self.frames is not None:
            self.frames.append(payload)
        if self._pool is None:
            return self.handle(payload)
        return self._pool.submit(self.handle, payload)

    def _settle(self) -> None:
        """Raise the first error of frames sent without a reply (they run in order on the server thread)."""
        pending, self._sent = self._sent, []
        for future in pending:
            future.result()

    def send(self, payload: bytes) -> None:
        """A frame that gets no reply (a perturbed-activation part). On the server thread it is handled
        while the client goes on computing; an error it raises surfaces at the next :meth:`exchange`."""
        result = self._deliver(payload)
        if self._pool is not None:
            self._sent.append(result)

    def exchange(self, payload: bytes) -> bytes:
        result = self._deliver(payload)
        if self._pool is not None:
            self._settle()
            result = result.result()
        self.bytes_down += len(result)
        return result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._settle()
