"""What sealing step-stream frames (counter + HMAC-SHA256, :mod:`fl_app.frame_auth`) costs, side by
side with what carrying the same frames over the stream costs, in one run.

    python -m benchmarks.frame_auth [--out docs/results/frame_auth] [--repeats 20]

Frame sizes are a step's activations at the cut (rows x seq x hidden, wire dtype): the tiny
smoke model, MiniLM at its default scenario, OPT-125m in float16, and a large frame.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks.report import write_report
from fl_app.frame_auth import FROM_CLIENT, FrameOpener, FrameSealer, session_key
from fl_app.stream import StepStreamClient, StepStreamServer

SIZES = {
    "8 x 32 x 32 float32 (tiny smoke)": 8 * 32 * 32 * 4,
    "16 x 64 x 384 float32 (MiniLM default)": 16 * 64 * 384 * 4,
    "16 x 128 x 768 float16 (OPT-125m)": 16 * 128 * 768 * 2,
    "16 x 512 x 768 float16": 16 * 512 * 768 * 2,
}


def seconds_per_frame(fn, payload: bytes, repeats: int) -> float:
    """Median seconds of ``fn(payload)`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(payload)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def seal_and_check(payload: bytes) -> bytes:
    """One frame through a fresh sealer and opener (the first counter each time)."""
    key = session_key("benchmark")
    return FrameOpener(key, FROM_CLIENT).open(FrameSealer(key, FROM_CLIENT).seal(payload))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/results/frame_auth")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    server = StepStreamServer(lambda token, payload: b"ok", port=0)
    rows = []
    try:
        for name, size in SIZES.items():
            payload = os.urandom(size)
            auth = seconds_per_frame(seal_and_check, payload, args.repeats)
            session = server.open_session("bench")
            client = StepStreamClient(server.address, session.token)
            carry = seconds_per_frame(client.exchange, payload, args.repeats)  # includes its own sealing
            client.close()
            server.close_session(session)
            rows.append({"frame": name, "bytes": size, "auth_s": auth, "exchange_s": carry})
    finally:
        server.stop()
    lines = [
        "| frame (rows x seq x hidden) | MiB | seal + check s | loopback exchange s (sealed) | share of the exchange |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frame']} | {r['bytes'] / 2**20:.2f} | {r['auth_s']:.5f} | {r['exchange_s']:.5f} | "
            f"{r['auth_s'] / r['exchange_s']:.0%} |"
        )
    text = "\n".join(lines)
    print(text)
    write_report(args.out, text, rows)


if __name__ == "__main__":
    main()
