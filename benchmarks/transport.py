"""Steps per second of the step stream vs the local runner, in simulation and in a loopback
deployment, and what per-step Flower messages would cost instead. One run, side by side.

    python -m benchmarks.transport --out runs/transport [--steps 40] [--probes 10]

Uses the tiny scenario with one client so the transport, not the model, dominates.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
from pathlib import Path

from benchmarks.flower_sim import run_simulation
from benchmarks.report import write_report
from fl_app.config import make_config, read_scenario
from fl_app.train import run

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "sim_configs" / "smoke_tiny.toml"


def overrides(out: Path, steps: int, probes: int) -> list[str]:
    return [
        f"out-dir={out}",
        "num-clients=1",
        "num-rounds=1",
        f"local-steps={steps}",
        "eval-test=false",
        "eval-examples=8",
        f"probe-messages={probes}",
    ]


def session_rate(results: dict) -> tuple[float, float]:
    """(steps / summed client step seconds, steps / round wall seconds) from a Flower results.json."""
    steps = len(results["history"])
    return steps / results["step_seconds"], steps / results["rounds"][0]["seconds"]


def flower_sim(out: Path, steps: int, probes: int) -> dict:
    return run_simulation(SCENARIO, overrides(out, steps, probes), supernodes=1, timeout=1800)


def flower_deploy(out: Path, steps: int, probes: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = " ".join(overrides(out, steps, probes))
    subprocess.run(
        [
            "bash",
            "scripts/deploy_local.sh",
            "--insecure",
            "--nodes",
            "1",
            "--port",
            str(port),
            "--run-config",
            str(SCENARIO),
            "--set",
            sets,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    return json.loads((out / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--probes", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    local_cfg = {**read_scenario(SCENARIO), **dict(o.split("=", 1) for o in overrides(out / "local", args.steps, 0))}
    local_cfg.pop("out-dir")
    local = run(make_config(local_cfg), out / "local")
    local_rate = len(local["history"]) / local["step_seconds"]
    rows = [("local runner (in-process)", local_rate, None, None)]
    for name, fn in (("flwr simulation + stream", flower_sim), ("loopback deployment + stream", flower_deploy)):
        results = fn(out / name.split()[0], args.steps, args.probes)
        rate, wall_rate = session_rate(results)
        rtts = results["flower_message_rtt_seconds"]
        rows.append((name, rate, wall_rate, sum(rtts) / len(rtts)))
    lines = [
        "| transport | steps/s (client step time) | steps/s (round wall) | ratio to local | "
        "Flower message RTT s | steps/s if one Flower message per step | stream speed-up over per-step messages |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rate, wall, rtt in rows:
        if rtt is None:
            lines.append(f"| {name} | {rate:.1f} | - | 1.00 | - | - | - |")
        else:
            lines.append(
                f"| {name} | {rate:.1f} | {wall:.1f} | {rate / local_rate:.2f} | {rtt:.3f} | {1 / rtt:.2f} | "
                f"{rate * rtt:.0f}x |"
            )
    text = "\n".join(lines)
    print(text)
    write_report(
        out / "transport", text, [{"name": n, "steps_per_s": r, "wall_s": w, "rtt_s": t} for n, r, w, t in rows]
    )


if __name__ == "__main__":
    main()
