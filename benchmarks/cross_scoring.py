"""Server throughput with and without scoring several clients' perturbed activations in one forward
(``score-across-clients``), at 2, 4 and 8 concurrent MiniLM clients, side by side in one run.

    python -m benchmarks.cross_scoring [--clients 2 4 8] [--steps 3] [--out docs/results/cross_scoring]

Each client is its own process (as a ClientApp is) running a training session over the real step
stream against one in-process Coordinator; all clients start their steps together (a barrier, after
loading their bottoms). Throughput is client steps per second of that phase; the two settings
alternate for each client count.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_report
from fl_app.config import make_config, read_scenario
from fl_app.coordinator import Coordinator
from fl_app.records import SessionRequest, SessionSettings

SCENARIO = "sim_configs/quick_minilm.toml"


def _client(settings: dict[str, Any], pid: int, clients: int, message: SessionSettings, barrier, out) -> None:
    """One client process: load the bottom, wait for the others, run the session, report its steps."""
    from fl_app.client_session import ClientSide, make_client, run_session

    config = make_config(settings)
    make_client(config.updated({"num-clients": clients}), pid, None)  # load before the clock starts
    barrier.wait()
    report, _ = run_session(SessionRequest(message), ClientSide(config, pid, clients))
    out.put((pid, report.steps, report.step_seconds))


def measure(clients: int, across: bool, steps: int) -> dict[str, Any]:
    """Steps per second of ``clients`` concurrent sessions with ``score-across-clients = across``."""
    settings = {
        **read_scenario(SCENARIO),
        "num-clients": clients,
        "local-steps": steps,
        "max-concurrent-clients": clients,
        "score-across-clients": across,
    }
    config = make_config(settings)
    coord = Coordinator(config, Path(tempfile.mkdtemp(prefix="hosl-cross-")))
    context = mp.get_context("spawn")
    barrier, out = context.Barrier(clients + 1), context.Queue()
    try:
        opened = [coord.open(pid, 1) for pid in range(clients)]
        procs = [
            context.Process(target=_client, args=(settings, pid, clients, message, barrier, out))
            for pid, (_, message) in enumerate(opened)
        ]
        for proc in procs:
            proc.start()
        barrier.wait()
        started = time.perf_counter()
        done = [out.get(timeout=1800) for _ in procs]
        seconds = time.perf_counter() - started
        for proc in procs:
            proc.join(60)
        for (session, _), (pid, _, _) in zip(opened, sorted(done)):
            assert coord.finish_train(session, {"partition-id": pid}), f"client {pid}'s session failed"
        batches = coord.scorer.forwards if coord.scorer else []
    finally:
        coord.close()
        shutil.rmtree(coord.out_dir, ignore_errors=True)  # a temporary run folder
    total = sum(n for _, n, _ in done)
    return {
        "clients": clients,
        "across": across,
        "steps": total,
        "seconds": seconds,
        "steps_per_second": total / seconds,
        "jobs_per_forward": sum(batches) / len(batches) if batches else 1.0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="steps per client")
    parser.add_argument("--out", default="docs/results/cross_scoring")
    args = parser.parse_args(argv)
    rows = []
    for clients in args.clients:
        for across in (False, True):
            rows.append(measure(clients, across, args.steps))
            print(rows[-1], flush=True)
    lines = [
        "| clients | steps | one session at a time: steps/s | across clients: steps/s | jobs per forward | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for off, on in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {off['clients']} | {on['steps']} | {off['steps_per_second']:.2f} | {on['steps_per_second']:.2f} "
            f"| {on['jobs_per_forward']:.2f} | {on['steps_per_second'] / off['steps_per_second']:.2f}x |"
        )
    text = (
        "# Scoring perturbed activations across clients\n\n"
        f"`python -m benchmarks.cross_scoring --clients {' '.join(map(str, args.clients))} --steps {args.steps}` "
        f"({SCENARIO}: MiniLM, batch 16, 4 queries; every client its own process, all on this machine's "
        "cores with the server).\n\n" + "\n".join(lines)
    )
    print(text)
    write_report(args.out, text, rows)


if __name__ == "__main__":
    main()
