"""Bytes per step and per round, by mode, with personal vs synced bottoms (and vs sending weights).

    python -m benchmarks.bytes --out runs/bytes [--scenario sim_configs/quick_minilm.toml]

Runs 2 rounds x 2 clients x 2 steps per (mode, bottoms) through the real coordinator and step
stream (no Flower runtime). Stream bytes are the serialised frames; round messages are counted
as Flower would carry them: scalars at 8 bytes, tensors at their size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.report import write_report
from fl_app.client_session import ClientSide, run_session
from fl_app.config import make_config, read_scenario
from fl_app.coordinator import Coordinator
from fl_app.records import SessionRequest

SCALAR = 8


def history_bytes(history) -> int:
    """(round, client, lr) + Q seeds + Q projected gradients per step, 8 bytes each."""
    return sum(SCALAR * (3 + len(s) + len(g)) for s, g in zip(history.seeds, history.grads))


def weights_bytes(weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def measure(config: dict, out: Path) -> dict:
    coord = Coordinator(config, out)
    states, synced = {}, {}
    per_round = []
    try:
        for rnd in (1, 2):
            reports, down_msgs, up_msgs = [], 0, 0
            for pid in (0, 1):
                session, message = coord.open(pid, rnd)
                history = coord.history_for(pid, synced.get(pid, 0))
                down_msgs += history_bytes(history) if history is not None else 0
                down_msgs += weights_bytes(coord.average) if coord.average is not None else 0
                request = SessionRequest(message, history=history, average=coord.average)
                report, states[pid] = run_session(request, ClientSide(config, pid, 2, states.get(pid)))
                up_msgs += SCALAR * sum(len(s) + len(g) for s, g in zip(report.seeds, report.grads))
                if report.weights is not None:
                    up_msgs += weights_bytes(report.weights)
                coord.finish_train(session, report)
                reports.append(report)
                synced[pid] = rnd - 1
            coord.sync(rnd, reports)
            coord.record_round(rnd, reports, [], None, 0.0)
            steps = sum(r.steps for r in reports)
            per_round.append(
                {
                    "stream_up_per_step": sum(r.bytes_up for r in reports) / steps,
                    "stream_down_per_step": sum(r.bytes_down for r in reports) / steps,
                    "messages_up": up_msgs,
                    "messages_down": down_msgs,
                    "round_total": sum(r.bytes_up + r.bytes_down for r in reports) + up_msgs + down_msgs,
                }
            )
        weights = weights_bytes(states[0].weights)
    finally:
        coord.close()
    return {"rounds": per_round, "trainable_bottom_bytes": weights}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", default="sim_configs/quick_minilm.toml")
    args = parser.parse_args()
    base = {**read_scenario(args.scenario), "local-steps": 2, "num-clients": 2}
    rows = []
    for mode in ("hosl", "fo-fo", "zo-zo"):
        for bottoms in ("personal", "synced"):
            config = make_config({**base, "mode": mode, "bottoms": bottoms})
            result = measure(config, Path(args.out) / f"{mode}_{bottoms}")
            second = result["rounds"][1]
            rows.append(
                {
                    "mode": mode,
                    "bottoms": bottoms,
                    **second,
                    "fedavg_weights_per_round": 2 * 2 * result["trainable_bottom_bytes"],
                }
            )
    mib = 2**20
    lines = [
        "| mode | bottoms | stream up / step (MiB) | stream down / step (KiB) | round messages up (KiB) | "
        "round messages down (KiB) | round total, 2 clients x 2 steps (MiB) | FedAvg of bottoms / round (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['bottoms']} | {r['stream_up_per_step'] / mib:.2f} | "
            f"{r['stream_down_per_step'] / 1024:.1f} | {r['messages_up'] / 1024:.1f} | "
            f"{r['messages_down'] / 1024:.1f} | {r['round_total'] / mib:.2f} | "
            f"{r['fedavg_weights_per_round'] / mib:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    write_report(Path(args.out, "bytes"), text, rows)


if __name__ == "__main__":
    main()
