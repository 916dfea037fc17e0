"""Local runner: the scenario's whole run (tuning, subsets, rounds, evaluation) in this process.

    python -m fl_app.train sim_configs/smoke_tiny.toml --set mode=fo-fo --out runs/smoke

The same round loop (:mod:`fl_app.rounds`), coordinator and client sessions as ``flwr run``; only
the carrier differs: sessions are direct calls, one client after another, their states kept in
memory, and step frames go to the server through an in-process link instead of gRPC.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fl_app import rounds
from fl_app.checkpoint import CheckpointRefused, RunFolderBusy, WriteFailed, run_folder
from fl_app.client_session import ClientSide, run_eval_session, run_session
from fl_app.config import Config, exit_with_error, scenario_config
from fl_app.coordinator import Coordinator
from fl_app.local_transport import InProcessLink
from fl_app.preflight import check_out_dir, check_scenario
from fl_app.records import ClientState, SessionReply, SessionRequest

log = logging.getLogger("fl_app.train")


class InProcessFederation:
    """Clients of this process, run one after another on its one working bottom (as a Flower
    simulation with one actor does). A session that raises is dropped, as a ClientApp's error
    reply drops it under Flower: the round goes on and the coordinator rolls back its server
    updates; the traceback is logged."""

    def __init__(self, coord: Coordinator, num_clients: int):
        self.coord, self.num_clients = coord, num_clients
        self.states: dict[int, ClientState] = {}

    def partitions(self) -> list[int]:
        return list(range(self.num_clients))

    def run_sessions(
        self,
        kind: str,
        requests: Iterable[SessionRequest],
        window: int,
        timeout: float,
        tick: Callable[[], Any],
        failed: Callable[[int], bool] = lambda pid: False,
    ) -> Iterator[tuple[int, SessionReply]]:
        for request in requests:  # one at a time: this process has one working bottom
            pid = request.partition_id
            link = InProcessLink(functools.partial(self.coord.handle, request.session.token))
            side = ClientSide(self.coord.base_config, pid, self.num_clients, self.states.get(pid))
            try:
                if kind == "train":
                    report, self.states[pid] = run_session(request, side, link)
                else:
                    report = run_eval_session(request, side, link)
            except Exception as err:  # noqa: BLE001 - the client's failure is the round's business, as under Flower
                log.warning("client %d's %s session failed", pid, kind, exc_info=True)
                yield pid, SessionReply(None, f"{type(err).__name__}: {err}")  # as a ClientApp's error reply
            else:
                yield pid, SessionReply(report)


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    """Run a scenario in-process and write ``out_dir/results.json`` (the format ``flwr run`` writes);
    returns the results."""
    coord = Coordinator(config, out_dir, serve_stream=False)
    try:
        if config.run.resume:
            coord.resume(out_dir)
        rounds.run(InProcessFederation(coord, config.federation.num_clients), coord)
    finally:
        coord.close()
    return coord.results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", help="flat TOML scenario file (e.g. sim_configs/smoke_tiny.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--out", default="", help="output folder (default: a new runs/<time>-<mode>-<task>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:  # every input checked before anything trains: one line and exit code 2 if not
        config, _ = scenario_config(args.scenario, args.set + ([f"out-dir={args.out}"] if args.out else []))
        check_scenario(config)
        out_dir = run_folder(config.run.out_dir, config)
        check_out_dir(out_dir, "--out", resume=config if config.run.resume else None)
    except ValueError as err:
        exit_with_error(str(err))
    try:
        run(config, out_dir)  # prints each round, test accuracy and, last, where the results are
    except (RunFolderBusy, CheckpointRefused) as err:  # refused before anything trained
        exit_with_error(str(err))
    except WriteFailed as err:  # e.g. a full disk: results.json says failed, the last checkpoint is intact
        print(f"error: {err} (the run stopped; resume from its last checkpoint once there is room)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
