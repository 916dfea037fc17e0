"""The round loop, shared by the Flower ServerApp and the local runner.

A run is: optionally an Optuna study (each trial trains a few rounds on the clients' data subsets),
then the scenario's rounds on full data (or on subsets, without tuning), then a test evaluation.
Each round selects clients, opens their sessions in waves of ``max-concurrent-clients``, has the
:class:`Federation` run them, commits or rolls back each session, evaluates on dev and records
the round (results.json, checkpoint). How a session reaches a client is the federation's business:
Flower messages to ClientApps (``server_app``), or direct calls in this process (``fl_app.train``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fl_app.coordinator import Coordinator, waves
from fl_app.records import History
from fl_app.stream import Session
from fl_app.subset import round_plan
from fl_app.tuning import plot_history, run_study, warm_rounds

log = logging.getLogger("hosl.rounds")
NO_REPLY = "no reply before round-timeout"


@dataclass
class SessionRequest:
    """What one client needs for a session: its settings, and the synced state to apply first."""

    partition_id: int
    session: dict[str, Any]  # round, token, address, root-certificate, local-steps, trial, and subset or split
    overrides: dict[str, Any] = field(default_factory=dict)  # the tuning trial's hyper-parameters
    history: History | None = None  # synced ZO: the other clients' (seed, projected gradient) steps
    average: dict[str, torch.Tensor] | None = None  # synced FO: the averaged bottom


@dataclass
class SessionReply:
    """A client's report (training) or metrics (evaluation), or why there is none."""

    report: dict[str, Any] | None
    reason: str = ""


class Federation(Protocol):
    """Runs sessions on clients: ``kind`` is "train" or "evaluate"; replies by partition id (a client
    that does not answer before ``timeout`` is missing); ``tick`` is called while waiting.
    :meth:`partitions` lists the clients reachable now (asked again every round: nodes come and go)."""

    def partitions(self) -> list[int]: ...

    def run_sessions(
        self, kind: str, requests: list[SessionRequest], timeout: float, tick: Callable[[], Any]
    ) -> dict[int, SessionReply]: ...


def session_request(coord: Coordinator, pid: int, rnd: int, extra: dict[str, Any]) -> tuple[Session, SessionRequest]:
    """Open a session for client ``pid`` and build its request (the history it still needs, if synced)."""
    session, settings = coord.open(pid, rnd, extra)
    request = SessionRequest(
        pid, settings, dict(coord.overrides), coord.history_for(pid, coord.synced.get(pid, 0)), coord.average
    )
    return session, request


def train_round(
    fed: Federation, coord: Coordinator, rnd: int, plan: str = "full"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One round of training sessions in waves, each client using its data as ``plan`` says
    (:data:`fl_app.subset.PLANS`); returns (reports, dropped)."""
    reports, dropped = [], []
    for wave in waves(coord.select(fed.partitions(), rnd), coord.config.federation.max_concurrent_clients):
        opened = [session_request(coord, pid, rnd, {"subset": plan}) for pid in wave]
        replies = fed.run_sessions(
            "train", [r for _, r in opened], coord.config.federation.round_timeout, coord.expire_idle
        )
        for session, request in opened:
            pid = request.partition_id
            reply = replies.get(pid, SessionReply(None, NO_REPLY))
            if coord.finish_train(session, reply.report, reply.reason):
                reports.append(reply.report)
                coord.synced[pid] = rnd - 1
            else:
                reason = reply.reason or session.reason
                dropped.append({"client": pid, "reason": reason})
                log.warning("round %d: client %d dropped: %s", rnd, pid, reason)
    return reports, dropped


def evaluate_round(
    fed: Federation, coord: Coordinator, rnd: int, clients: list[int], split: str
) -> dict[str, Any] | None:
    """Federated evaluation: each listed client scores its shard of ``split``."""
    if not clients:
        return None
    reports = []
    for wave in waves(clients, coord.config.federation.max_concurrent_clients):
        opened = [
            session_request(coord, pid, rnd, {"split": split, "shard": clients.index(pid), "num-shards": len(clients)})
            for pid in wave
        ]
        replies = fed.run_sessions(
            "evaluate", [r for _, r in opened], coord.config.federation.round_timeout, coord.expire_idle
        )
        for session, request in opened:
            coord.finish_eval(session)
            reply = replies.get(request.partition_id, SessionReply(None, NO_REPLY))
            if reply.report is None:
                log.warning("round %d: evaluation by client %d failed: %s", rnd, request.partition_id, reply.reason)
            elif reply.report.get("count"):
                reports.append(reply.report)
    return coord.record_eval(rnd, reports)


def run_round(
    fed: Federation,
    coord: Coordinator,
    rnd: int,
    plan: str,
    evaluate: bool,
    label: str = "",
) -> dict[str, Any]:
    """Train one round, evaluate on dev if asked, record and print it; returns the round's entry."""
    started = time.perf_counter()
    reports, dropped = train_round(fed, coord, rnd, plan)
    coord.sync(rnd, reports)
    clients = sorted(r["partition-id"] for r in reports)
    evaluation = evaluate_round(fed, coord, rnd, clients, "dev") if evaluate else None
    entry = coord.record_round(rnd, reports, dropped, evaluation, time.perf_counter() - started)
    acc = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
    loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    print(
        f"[hosl] {label}round {rnd}: train loss {loss}, dev accuracy {acc}, clients {len(clients)}, "
        f"dropped {len(dropped)}, data {plan}, {entry['steps']} steps, {entry['seconds']:.1f} s",
        flush=True,
    )
    return entry


def tune(fed: Federation, coord: Coordinator, rounds: itertools.count) -> dict[str, Any]:
    """The Optuna study over the federation; returns its summary (trials, best, seconds, plot)."""

    def one_round(trial: int, rnd: int, params, plan: str) -> dict[str, Any]:
        if rnd == 1:
            coord.reset(trial, params)
            print(f"[hosl] trial {trial}: {params}", flush=True)
        return run_round(fed, coord, next(rounds), plan, evaluate=True, label=f"trial {trial} ")

    study, summary = run_study(coord.base_config, one_round)
    plot = plot_history(study, coord.out_dir / "optimization_history.png")
    summary["plot"] = str(plot) if plot else None
    for record in summary["trials"]:
        print(
            f"[hosl] trial {record['number'] + 1}: {record['state']}, {len(record['rounds'])} rounds, "
            f"dev accuracy {record['accuracy']}, {record['seconds']:.1f} s, {record['params']}",
            flush=True,
        )
    if summary["best"] is None:
        raise RuntimeError(f"no tuning trial completed ({summary['failed']} failed, {summary['pruned']} pruned)")
    print(f"[hosl] tuning took {summary['seconds']:.1f} s; best {summary['best']}", flush=True)
    return summary


def run(fed: Federation, coord: Coordinator) -> Path:
    """The whole run (tuning first when ``tune-trials > 0``; from the last finished round when
    resuming); returns the finished results.json's path. A run that raises leaves results.json
    with status "failed" and the reason."""
    try:
        return _run(fed, coord)
    except BaseException as err:
        coord.write_results(status="failed", error=f"{type(err).__name__}: {err}")
        raise


def _run(fed: Federation, coord: Coordinator) -> Path:
    config = coord.base_config
    done = coord.finished_round  # > 0 when resuming: those rounds are in the results already
    rounds = itertools.count(1)
    selector, warm = config.subset.selector, warm_rounds(config, config.federation.num_rounds)
    if config.tune.trials:
        tuning = tune(fed, coord, rounds)
        coord.reset(config.tune.trials + 1, tuning["best"]["params"])  # best config, full data
        coord.results["tuning"] = tuning
        selector = "full"
    final_started = time.perf_counter()
    numbers = [next(rounds) for _ in range(config.federation.num_rounds)]  # after tuning's rounds
    if done:
        print(f"[hosl] resuming after round {done} of {numbers[-1]} from {coord.out_dir}", flush=True)
    elif config.eval.untrained:  # the baseline, scored by the clients round 1 selects
        untrained = evaluate_round(fed, coord, 0, coord.select(fed.partitions(), numbers[0]), "dev")
        if untrained is not None and untrained["count"]:
            coord.results["eval"]["history"].append({"round": 0, **untrained})
            print(f"[hosl] round 0 (untrained): dev accuracy {untrained['accuracy']:.4f}", flush=True)
    for index, rnd in enumerate(numbers, start=1):
        if rnd <= done:
            continue
        plan = round_plan(selector, index, config.subset.reselect_every, warm)
        run_round(
            fed,
            coord,
            rnd,
            plan,
            evaluate=index % config.eval.every == 0 or index == config.federation.num_rounds,
        )
    if config.eval.test:
        last = coord.results["rounds"][-1]["clients"] if coord.results["rounds"] else []
        test = evaluate_round(fed, coord, numbers[-1], last or sorted(fed.partitions()), "test")
        coord.results["eval"]["test"] = test
        print(f"[hosl] test accuracy {test['accuracy'] if test else None}", flush=True)
    if config.tune.trials:
        coord.results["tuning"]["final"] = {
            "params": coord.overrides,
            "rounds": config.federation.num_rounds,
            "seconds": time.perf_counter() - final_started,
            "dev_accuracy": coord.results["rounds"][-1]["accuracy"],  # the last round always evaluates
            "test_accuracy": (coord.results["eval"].get("test") or {}).get("accuracy"),
        }
    path = coord.write_results(status="finished")
    print(f"[hosl] results written to {path}", flush=True)  # the run's last line, under Flower and locally
    return path
