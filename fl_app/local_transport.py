"""In-process transport: the server runs on its own worker thread and only sees bytes."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fl_app.server_party import SplitServer


class InProcessLink:
    """Carries request bytes to a :class:`SplitServer` and reply bytes back, counting both.

    The server works on a separate thread, so the client's memory tracker (per thread) does not
    count the server's allocations.
    """

    def __init__(self, server: SplitServer):
        self.server = server
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-server")
        self.bytes_up = 0
        self.bytes_down = 0

    def exchange(self, payload: bytes) -> bytes:
        self.bytes_up += len(payload)
        answer = self._pool.submit(self.server.handle_bytes, payload).result()
        self.bytes_down += len(answer)
        return answer

    def close(self) -> None:
        self._pool.shutdown(wait=True)
