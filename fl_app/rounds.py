"""The round loop, shared by the Flower ServerApp and the local runner.

A run is: optionally an Optuna study (each trial trains a few rounds on the clients' data subsets),
then the scenario's rounds on full data (or on subsets, without tuning), then a test evaluation.
Each round selects clients, has the :class:`Federation` run their sessions with at most
``max-concurrent-clients`` open at once (a sliding window: the next session opens as soon as one
ends), commits or rolls back each session, evaluates on dev and records the round (results.json,
checkpoint). How a session reaches a client is the federation's business:
Flower messages to ClientApps (``server_app``), or direct calls in this process (``fl_app.train``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from fl_app.checkpoint import WriteFailed
from fl_app.coordinator import Coordinator
from fl_app.records import SessionReply, SessionRequest, TrainReport
from fl_app.stream import Session
from fl_app.subset import round_plan
from fl_app.tuning import plot_history, run_study, warm_rounds

log = logging.getLogger("hosl.rounds")
NO_REPLY = "no reply before round-timeout"


class Federation(Protocol):
    """Runs sessions on clients. :meth:`partitions` lists the clients reachable now (asked again
    every round: nodes come and go).

    :meth:`run_sessions` runs the sessions ``requests`` yields (``kind`` "train" or "evaluate"), at
    most ``window`` at a time: it draws the next request, which opens that session on the server,
    only when a slot is free. It yields ``(partition id, reply)`` as each session ends; a client
    that does not answer within ``timeout`` of its request gets a reply without a report, and so does
    one whose session ``failed(partition id)`` says has already failed on the step stream (a node
    that lost its network: the round need not wait for its reply). ``tick`` is called while waiting."""

    def partitions(self) -> list[int]: ...

    def run_sessions(
        self,
        kind: str,
        requests: Iterable[SessionRequest],
        window: int,
        timeout: float,
        tick: Callable[[], Any],
        failed: Callable[[int], bool] = lambda pid: False,
    ) -> Iterator[tuple[int, SessionReply]]: ...


def session_request(coord: Coordinator, pid: int, rnd: int, extra: dict[str, Any]) -> tuple[Session, SessionRequest]:
    """Open a session for client ``pid`` and build its request (the history it still needs, if synced)."""
    session, settings = coord.open(pid, rnd, **extra)
    request = SessionRequest(
        settings, dict(coord.overrides), coord.history_for(pid, coord.synced.get(pid, 0)), coord.average
    )
    return session, request


def _run_sessions(
    fed: Federation, coord: Coordinator, kind: str, clients: list[int], rnd: int, extra: Callable[[int], dict[str, Any]]
) -> Iterator[tuple[Session, SessionReply]]:
    """Run ``kind`` sessions for ``clients`` through ``fed`` in a window of ``max-concurrent-clients``,
    each opened only when its turn comes; yields (session, reply) as each ends."""
    opened: dict[int, Session] = {}

    def requests() -> Iterator[SessionRequest]:
        for pid in clients:
            opened[pid], request = session_request(coord, pid, rnd, extra(pid))
            yield request

    federation = coord.config.federation
    try:
        for pid, reply in fed.run_sessions(
            kind,
            requests(),
            federation.max_concurrent_clients,
            federation.round_timeout,
            coord.expire_idle,
            lambda pid: pid in opened and opened[pid].status == "failed",
        ):
            yield opened.pop(pid), reply
    finally:  # the round broke off (the federation or the caller raised): no session stays open
        for session in opened.values():
            if kind == "train":
                coord.finish_train(session, None, "the round broke off")
            else:
                coord.finish_eval(session)


def train_round(
    fed: Federation, coord: Coordinator, rnd: int, plan: str = "full"
) -> tuple[list[TrainReport], list[dict[str, Any]]]:
    """One round of training sessions, each client using its data as ``plan`` says
    (:data:`fl_app.subset.PLANS`); returns (reports, dropped), each in client order."""
    reports, dropped = [], []
    clients = coord.select(fed.partitions(), rnd)
    for session, reply in _run_sessions(fed, coord, "train", clients, rnd, lambda pid: {"subset": plan}):
        pid = int(session.client_id)
        if coord.finish_train(session, reply.report, reply.reason):
            reports.append(reply.report)
            coord.synced[pid] = rnd - 1
        else:
            reason = reply.reason or session.reason
            dropped.append({"client": pid, "reason": reason})
            log.warning("round %d: client %d dropped: %s", rnd, pid, reason)
    return sorted(reports, key=lambda r: r.partition_id), sorted(dropped, key=lambda d: d["client"])


def evaluators(coord: Coordinator, clients: list[int], split: str) -> list[int]:
    """The clients that evaluate ``split``: each scores a contiguous shard of it, so past as many
    clients as the split can have examples the rest would score nothing, and are not asked."""
    data, examples = coord.config.data, coord.config.eval.examples
    most = data.n_test if split == "test" else min(data.n_dev, examples or data.n_dev)
    return clients[: max(1, most)]


def evaluate_round(
    fed: Federation, coord: Coordinator, rnd: int, clients: list[int], split: str
) -> dict[str, Any] | None:
    """Federated evaluation: each of :func:`evaluators` scores its shard of ``split``."""
    clients = evaluators(coord, clients, split)
    if not clients:
        return None
    shards = {pid: {"split": split, "shard": index, "num_shards": len(clients)} for index, pid in enumerate(clients)}
    reports = {}
    for session, reply in _run_sessions(fed, coord, "evaluate", clients, rnd, shards.__getitem__):
        coord.finish_eval(session)
        pid = int(session.client_id)
        if reply.report is None:
            log.warning("round %d: evaluation by client %d failed: %s", rnd, pid, reply.reason)
        elif reply.report.count:
            reports[pid] = reply.report
    return coord.record_eval(rnd, [reports[pid] for pid in sorted(reports)])


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
    clients = sorted(r.partition_id for r in reports)
    evaluation = evaluate_round(fed, coord, rnd, clients, "dev") if evaluate else None
    entry = coord.record_round(rnd, reports, dropped, evaluation, time.perf_counter() - started)
    acc = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
    loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    print(
        f"[hosl] {label}round {rnd}: train loss {loss}, dev accuracy {acc}, clients {len(clients)}, "
        f"dropped {len(dropped)}, data {plan}, {entry['steps']} steps, {entry['seconds']:.1f} s",
        flush=True,
    )
    if entry.get("diverging"):
        print(f"[hosl] {label}round {rnd}: warning: {entry['diverging']}", flush=True)
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
    with status "failed" and the reason (when results.json can be written at all)."""
    try:
        return _run(fed, coord)
    except BaseException as err:
        try:
            coord.write_results(status="failed", error=f"{type(err).__name__}: {err}")
        except WriteFailed as unwritten:  # e.g. the disk that failed the run is still full: say so, raise the cause
            log.error("the run failed (%s) and results.json could not be marked failed: %s", err, unwritten)
        raise


def _run(fed: Federation, coord: Coordinator) -> Path:
    config = coord.base_config
    coord.write_results(status="running")  # before any checkpoint: a run killed after one is readable
    done = coord.finished_round  # > 0 when resuming: those rounds are in the results already
    rounds = itertools.count(1)
    selector, warm = config.subset.selector, warm_rounds(config, config.federation.num_rounds)
    if config.tune.trials:
        tuning = tune(fed, coord, rounds)
        coord.reset(config.tune.trials + 1, tuning["best"]["params"])  # best config, full data
        coord.record_tuning(tuning)
        selector = "full"
    final_started = time.perf_counter()
    numbers = [next(rounds) for _ in range(config.federation.num_rounds)]  # after tuning's rounds
    if done:
        print(f"[hosl] resuming after round {done} of {numbers[-1]} from {coord.out_dir}", flush=True)
    elif config.eval.untrained:  # the baseline, scored by the clients round 1 selects
        untrained = evaluate_round(fed, coord, 0, coord.select(fed.partitions(), numbers[0]), "dev")
        if untrained is not None and untrained["count"]:
            coord.record_untrained(untrained)
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
        testers = evaluators(coord, coord.last_round_clients() or sorted(fed.partitions()), "test")
        swap = ", and the final top over the initial bottom (swap evaluation)" if config.eval.swap != "none" else ""
        print(f"[hosl] testing: {len(testers)} clients score the test split with the final model{swap}", flush=True)
        test = evaluate_round(fed, coord, numbers[-1], testers, "test")
        coord.record_test(test)
        print(f"[hosl] test accuracy {test['accuracy'] if test else None}", flush=True)
    if config.tune.trials:
        coord.record_tuned_run(time.perf_counter() - final_started)
    path = coord.write_results(status="finished")
    print(f"[hosl] results written to {path}", flush=True)  # the run's last line, under Flower and locally
    return path
