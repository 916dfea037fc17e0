"""Flower ServerApp: holds the top (FO in hosl) and runs rounds of client sessions.

Per round: select clients (seeded fraction / minimum), send each a session message in waves of
at most ``max-concurrent-clients``, serve their steps on the direct step stream, collect reports
(dropping clients that fail or time out, with their partial server updates rolled back), run
federated evaluation, checkpoint and write ``results.json``.

With ``tune-trials > 0`` the run first tunes hyper-parameters (an Optuna study whose trials train
on each client's data subsets, pruned on dev accuracy per round), then trains the best
configuration on the full data and evaluates it on test.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fl_app.client_session import History
from fl_app.config import make_config
from fl_app.coordinator import Coordinator, waves
from fl_app.subset import round_plan
from fl_app.tuning import plot_history, run_study, warm_rounds

log = logging.getLogger("hosl.server")
app = ServerApp()
POLL_SECONDS = 0.2


def resolve_out_dir(out_dir: str) -> Path:
    """Absolute output directory (relative paths are taken from the current directory)."""
    return Path(out_dir).expanduser().resolve()


def history_record(history: History) -> ConfigRecord:
    """Flattened (seed, projected gradient) history; every step has the same number of queries."""
    queries = len(history.seeds[0]) if len(history) else 0
    return ConfigRecord({"h-rounds": history.rounds, "h-clients": history.clients, "h-lrs": history.lrs,
                         "h-queries": queries, "h-seeds": [s for step in history.seeds for s in step],
                         "h-grads": [g for step in history.grads for g in step], "h-rows": list(history.rows)})


def record_bytes(content: RecordDict) -> int:
    """Approximate payload bytes of a message's records (arrays by size, scalars at 8 bytes)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in items)
    return total


def exchange(grid: Grid, messages: list[Message], timeout: float, tick: Callable[[], Any]) -> dict[int, Message]:
    """Push ``messages`` and poll for replies until all arrive or ``timeout``; ``tick`` runs each poll."""
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending, replies = set(ids), {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                replies[node_of[mid]] = reply
        tick()
        if pending:
            time.sleep(POLL_SECONDS)
    return replies


def discover(grid: Grid, timeout: float) -> dict[int, int]:
    """partition-id -> node id, asked of every connected node (waits for at least one node)."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while not node_ids and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in node_ids]
    replies = exchange(grid, messages, timeout, lambda: None)
    nodes = {}
    for node_id, reply in replies.items():
        if reply.has_error():
            log.warning("node %s did not answer the query: %s", node_id, reply.error.reason)
            continue
        nodes[int(reply.content.config_records["node"]["partition-id"])] = node_id
    if not nodes:
        raise RuntimeError("no client node answered; check that SuperNodes are connected")
    return nodes


def probe_message_rtt(grid: Grid, node_id: int, count: int) -> list[float]:
    """Seconds per sequential query round trip to one node: what a per-step Flower message would cost."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        exchange(grid, [Message(RecordDict(), dst_node_id=node_id, message_type="query")], 600, lambda: None)
        times.append(time.perf_counter() - started)
    return times


def _reply_report(reply: Message | None) -> tuple[dict[str, Any] | None, str]:
    if reply is None:
        return None, "no reply before round-timeout"
    if reply.has_error():
        return None, f"client error: {reply.error.reason}"
    report = dict(reply.content.config_records["report"])
    if not report.get("ok"):
        return None, str(report.get("error", "client reported failure"))
    return report, ""


def _unflatten(report: dict[str, Any], queries: int) -> dict[str, Any]:
    seeds, grads = list(report.get("seeds", [])), list(report.get("grads", []))
    report["seeds"] = [seeds[i : i + queries] for i in range(0, len(seeds), queries)] if queries else []
    report["grads"] = [grads[i : i + queries] for i in range(0, len(grads), queries)] if queries else []
    report["rows"] = [bytes(r) for r in report.get("rows", [])] or None
    report["losses"] = list(report["losses"])
    return report


def session_content(coord: Coordinator, pid: int, session_config: dict[str, Any], synced: dict[int, int]) -> RecordDict:
    """A session message: settings, plus the synced history (ZO) or averaged bottom (FO) if any."""
    content = RecordDict({"session": ConfigRecord(session_config)})
    if coord.overrides:
        content["overrides"] = ConfigRecord(coord.overrides)
    history = coord.history_for(pid, synced.get(pid, 0))
    if history is not None:
        content["history"] = history_record(history)
    if coord.average is not None:
        content["average"] = ArrayRecord(coord.average)
    return content


def train_round(grid: Grid, coord: Coordinator, nodes: dict[int, int], rnd: int, synced: dict[int, int],
                plan: str = "full"):
    """One round of training sessions in waves, each client using its data as ``plan`` says
    (:data:`fl_app.subset.PLANS`); returns (reports, dropped)."""
    config = coord.config
    queries = config["zo-queries"] if coord.client_order == "zo" else 0
    reports, dropped = [], []
    for wave in waves(coord.select(list(nodes), rnd), config["max-concurrent-clients"]):
        sessions, messages = {}, []
        for pid in wave:
            session, session_config = coord.open(pid, rnd, {"subset": plan})
            content = session_content(coord, pid, session_config, synced)
            sessions[nodes[pid]] = (pid, session, record_bytes(content))
            messages.append(Message(content, dst_node_id=nodes[pid], message_type="train"))
        replies = exchange(grid, messages, config["round-timeout"], coord.expire_idle)
        for node_id, (pid, session, sent) in sessions.items():
            reply = replies.get(node_id)
            report, reason = _reply_report(reply)
            if coord.finish_train(session, report, reason):
                report = _unflatten(report, queries)
                report["message-bytes-down"] = sent
                report["message-bytes-up"] = record_bytes(reply.content)
                if "weights" in reply.content.array_records:
                    report["weights"] = reply.content.array_records["weights"].to_torch_state_dict()
                reports.append(report)
                synced[pid] = rnd - 1
            else:
                dropped.append({"client": pid, "reason": reason or session.reason})
                log.warning("round %d: client %d dropped: %s", rnd, pid, reason or session.reason)
    return reports, dropped


def evaluate_round(grid: Grid, coord: Coordinator, nodes: dict[int, int], rnd: int, clients: list[int],
                   synced: dict[int, int], split: str) -> dict[str, Any] | None:
    """Federated evaluation: each listed client scores its shard of ``split``."""
    if not clients:
        return None
    reports = []
    for wave in waves(clients, coord.config["max-concurrent-clients"]):
        sessions, messages = {}, []
        for pid in wave:
            session, session_config = coord.open(pid, rnd, {"split": split, "shard": clients.index(pid),
                                                            "num-shards": len(clients)})
            content = session_content(coord, pid, session_config, synced)
            sessions[nodes[pid]] = session
            messages.append(Message(content, dst_node_id=nodes[pid], message_type="evaluate"))
        replies = exchange(grid, messages, coord.config["round-timeout"], coord.expire_idle)
        for node_id, session in sessions.items():
            coord.finish_eval(session)
            report, reason = _reply_report(replies.get(node_id))
            if report is None:
                log.warning("round %d: evaluation by node %s failed: %s", rnd, node_id, reason)
                continue
            metrics = replies[node_id].content.metric_records["metrics"]
            if metrics.get("count"):
                reports.append({k: float(v) for k, v in metrics.items()})
    return coord.record_eval(rnd, reports)


def run_round(grid: Grid, coord: Coordinator, nodes: dict[int, int], rnd: int, synced: dict[int, int], plan: str,
              evaluate: bool, label: str = "") -> dict[str, Any]:
    """Train one round, evaluate on dev if asked, record and print it; returns the round's entry."""
    started = time.perf_counter()
    reports, dropped = train_round(grid, coord, nodes, rnd, synced, plan)
    clients = sorted(r["partition-id"] for r in reports)
    evaluation = evaluate_round(grid, coord, nodes, rnd, clients, synced, "dev") if evaluate else None
    entry = coord.record_round(rnd, reports, dropped, evaluation, time.perf_counter() - started)
    acc = "n/a" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
    loss = "n/a" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
    print(f"[hosl] {label}round {rnd}: train loss {loss}, dev accuracy {acc}, clients {len(clients)}, "
          f"dropped {len(dropped)}, data {plan}, {entry['steps']} steps, {entry['seconds']:.1f} s", flush=True)
    return entry


def tune(grid: Grid, coord: Coordinator, nodes: dict[int, int], synced: dict[int, int], rounds: itertools.count,
         out_dir: Path) -> dict[str, Any]:
    """The Optuna study over the live federation; returns its summary (trials, best, seconds, plot)."""
    def one_round(trial: int, rnd: int, params, plan: str) -> dict[str, Any]:
        if rnd == 1:
            coord.reset(trial, params)
            synced.clear()
            print(f"[hosl] trial {trial}: {params}", flush=True)
        return run_round(grid, coord, nodes, next(rounds), synced, plan, evaluate=True, label=f"trial {trial} ")

    study, summary = run_study(coord.base_config, one_round)
    plot = plot_history(study, out_dir / "optimization_history.png")
    summary["plot"] = str(plot) if plot else None
    for record in summary["trials"]:
        print(f"[hosl] trial {record['number'] + 1}: {record['state']}, {len(record['rounds'])} rounds, "
              f"dev accuracy {record['accuracy']}, {record['seconds']:.1f} s, {record['params']}", flush=True)
    if summary["best"] is None:
        raise RuntimeError(f"no tuning trial completed ({summary['failed']} failed, {summary['pruned']} pruned)")
    print(f"[hosl] tuning took {summary['seconds']:.1f} s; best {summary['best']}", flush=True)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the scenario given by the run-config (tuning first when ``tune-trials > 0``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = make_config(context.run_config)
    out_dir = resolve_out_dir(config["out-dir"])
    tls_cert = Path(config["stream-tls-cert"]).read_bytes() if config["stream-tls-cert"] else None
    tls_key = Path(config["stream-tls-key"]).read_bytes() if config["stream-tls-key"] else None
    coord = Coordinator(config, out_dir, tls_cert=tls_cert, tls_key=tls_key)
    try:
        nodes = discover(grid, timeout=config["round-timeout"])
        print(f"[hosl] {len(nodes)} client nodes; step stream on {coord.advertised_address}; mode {config['mode']}, "
              f"bottoms {config['bottoms']}", flush=True)
        if config["probe-messages"]:
            rtts = probe_message_rtt(grid, nodes[min(nodes)], config["probe-messages"])
            coord.results["flower_message_rtt_seconds"] = rtts
            print(f"[hosl] Flower message round trip: mean {sum(rtts) / len(rtts):.3f} s over {len(rtts)}", flush=True)
        synced: dict[int, int] = {}
        rounds = itertools.count(1)
        selector, warm = config["subset-selector"], warm_rounds(config, config["num-rounds"])
        if config["tune-trials"]:
            tuning = tune(grid, coord, nodes, synced, rounds, out_dir)
            coord.reset(config["tune-trials"] + 1, tuning["best"]["params"])  # best config, full data
            synced.clear()
            coord.results["tuning"] = tuning
            selector = "full"
        final_started = time.perf_counter()
        for index in range(1, config["num-rounds"] + 1):
            rnd = next(rounds)
            plan = round_plan(selector, index, config["subset-reselect-every"], warm)
            run_round(grid, coord, nodes, rnd, synced, plan,
                      evaluate=index % config["eval-every"] == 0 or index == config["num-rounds"])
        if config["eval-test"]:
            last = coord.results["rounds"][-1]["clients"] if coord.results["rounds"] else []
            test = evaluate_round(grid, coord, nodes, rnd, last or sorted(nodes), synced, "test")
            coord.results["eval"]["test"] = test
            print(f"[hosl] test accuracy {test['accuracy'] if test else None}", flush=True)
        if config["tune-trials"]:
            coord.results["tuning"]["final"] = {
                "params": coord.overrides, "rounds": config["num-rounds"], "seconds": time.perf_counter() - final_started,
                "dev_accuracy": coord.results["eval"].get("history", [{}])[-1].get("accuracy"),
                "test_accuracy": (coord.results["eval"].get("test") or {}).get("accuracy")}
        path = coord.write_results(status="finished")
        print(f"[hosl] results written to {path}", flush=True)
    finally:
        coord.close()
