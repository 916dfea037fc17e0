"""Do the quick scenario's clients train faster side by side? One round of the default scenario under
`flwr run` with each client given both cores (Ray runs one client at a time, the default) against one
core each (two clients at once, each torch using its own thread pool), measured in one run.

    python -m benchmarks.side_by_side [--rounds 1] [--repeats 2] [--out docs/results/side_by_side]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.flower_sim import ROOT, run_simulation
from benchmarks.report import write_report

SCENARIO = ROOT / "sim_configs/quick_minilm.toml"


def one(cpus: int, rounds: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="hosl-side-"))
    sets = [f"out-dir={out}", f"num-rounds={rounds}", "eval-untrained=false", "eval-test=false"]
    try:
        results = run_simulation(SCENARIO, sets, supernodes=2, cpus_per_client=cpus)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a temporary run folder: only the figures below are kept
    rounds_s = [r["seconds"] for r in results["rounds"]]
    return {
        "cpus_per_client": cpus,
        "round_seconds": rounds_s,
        "wall_seconds": results["wall_seconds"],
        "client_seconds_per_step": results["client"]["seconds_per_step"],
        "losses": [h["train_loss"] for h in results["history"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="docs/results/side_by_side")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):  # interleaved, so a load change hits both arms alike
        runs += [one(2, args.rounds), one(1, args.rounds)]
    arm = {c: [r for r in runs if r["cpus_per_client"] == c] for c in (2, 1)}
    mean = {c: sum(sum(r["round_seconds"]) for r in rs) / len(rs) for c, rs in arm.items()}
    lines = [
        f"Quick scenario (`{SCENARIO.relative_to(ROOT)}`), {args.rounds} round(s), 2 clients, "
        f"{args.repeats} interleaved repeats.",
        "",
        "| clients at once | CPUs per client | training round s (mean) | client s/step (mean) |",
        "|---|---|---|---|",
    ]
    for c, rs in arm.items():
        sps = sum(r["client_seconds_per_step"] for r in rs) / len(rs)
        lines.append(f"| {2 // c} | {c} | {mean[c]:.1f} | {sps:.2f} |")
    lines += ["", f"Side by side / one at a time: **{mean[1] / mean[2]:.2f}x** the round time."]
    text = "\n".join(lines)
    print(text)
    write_report(args.out, text, runs)


if __name__ == "__main__":
    main()
