"""AUTOMATA side by side: the same Optuna study (sampler, pruner, trials, seed) tuned on the full
data, on random subsets and on gradient-matched subsets of the same fraction, each followed by the
best configuration trained on the full data and tested. One `flwr run` simulation per row.

    python -m benchmarks.tune_compare --out runs/tune [--fractions 0.1 0.3] [--set key=value ...]

Prints (and writes to OUT/tune_compare.md) tuning wall time, speed-up over full-data tuning,
training steps, selection cost, pruned trials, best dev accuracy, final test accuracy and, for
gradient matching, how far each selected subset's weighted proxy sum is from the full sum next to
random subsets of the same size drawn on the same proxies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.flower_sim import ROOT, run_simulation
from benchmarks.report import write_report

SCENARIO = ROOT / "sim_configs" / "tune_minilm.toml"


def summarise(name: str, results: dict) -> dict:
    tuning = results["tuning"]
    rounds = [r for t in tuning["trials"] for r in t["rounds"]]
    selections = [q for r in rounds for q in r["selection_quality"]]
    return {
        "run": name,
        "tuning_seconds": tuning["seconds"],
        "final_seconds": tuning["final"]["seconds"],
        "steps": sum(r["steps"] for r in rounds),
        "selection_seconds": sum(r["selection_seconds"] for r in rounds),
        "selection_mib": sum(r["selection_bytes"] for r in rounds) / 2**20,
        "tuning_mib": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / 2**20,
        "pruned": tuning["pruned"],
        "failed": tuning["failed"],
        "trials": len(tuning["trials"]),
        "best_dev": tuning["best"]["accuracy"],
        "best_params": tuning["best"]["params"],
        "test": tuning["final"]["test_accuracy"],
        "gradmatch_error": mean([q["gradmatch_error"] for q in selections]),
        "random_error": mean([q["random_error"] for q in selections]),
    }


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table(rows: list[dict]) -> str:
    full = rows[0]
    lines = [
        "| tuning data | tuning s | speed-up | steps | selection s | selection MiB | tuning MiB | pruned / failed | "
        "best dev acc | final test acc | test acc vs full | proxy-sum error: gradmatch / random | best config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        error = "-" if r["gradmatch_error"] is None else f"{r['gradmatch_error']:.3f} / {r['random_error']:.3f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items())
        lines.append(
            f"| {r['run']} | {r['tuning_seconds']:.0f} | {full['tuning_seconds'] / r['tuning_seconds']:.2f}x | "
            f"{r['steps']} | {r['selection_seconds']:.1f} | {r['selection_mib']:.1f} | {r['tuning_mib']:.0f} | "
            f"{r['pruned']} / {r['failed']} of {r['trials']} | {r['best_dev']:.3f} | {r['test']:.3f} | "
            f"{r['test'] - full['test']:+.3f} | {error} | {params} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    runs = [("full", "full", 1.0)] + [
        (f"{sel} {f:.0%}", sel, f) for f in args.fractions for sel in ("random", "gradmatch")
    ]
    rows = []
    for name, selector, fraction in runs:
        run_dir = out / name.replace(" ", "_").replace("%", "pct")
        results = run_simulation(
            Path(args.scenario),
            [*args.set, f"out-dir={run_dir}", f"subset-selector={selector}", f"subset-fraction={fraction}"],
            args.supernodes,
        )
        rows.append(summarise(name, results))
        text = table(rows)
        print(text, flush=True)
        write_report(out / "tune_compare", text, rows)


if __name__ == "__main__":
    main()
