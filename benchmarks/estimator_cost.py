"""What each ZO client estimator costs per step at equal Q, side by side in one run per model.

    python -m benchmarks.estimator_cost [--scenario sim_configs/sst2_minilm_full.toml] [--set cut-layer=4]
        [--queries 4] [--steps 6] [--repeats 3] [--out docs/results/estimator_cost_minilm]

Each estimator of :data:`fl_app.config.ESTIMATORS` (and fo-fo, for scale) runs HOSL steps of one client
over the in-process link in a fresh process (:func:`benchmarks.client_cost.measure_variant`), the
estimators alternating ``--repeats`` times on the same batches. Per step it counts the client's bottom
forwards, the perturbed activations the server scores, and the bytes each way, and times the whole
step (client and in-process server sharing the cores) and the client's own step against a server that
answers at once. Ratios are against two-point at the same Q, measured in the same run (the machine is
shared: only ratios mean anything).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.client_cost import ROOT, _run_worker
from benchmarks.report import write_report
from fl_app.config import ESTIMATORS

VARIANTS = {**{name: {"zo-estimator": name} for name in ESTIMATORS}, "fo-fo (client SGD)": {"mode": "fo-fo"}}
COUNTS = ("client_forwards", "server_scorings", "bytes_up", "bytes_down")


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's row: its per-step counts (the same in every repeat) and median times."""
    return {
        "variant": name,
        **{k: runs[0]["per_step"][k] for k in COUNTS},
        "step": statistics.median(r["full"]["step"] for r in runs),
        "client_only": statistics.median(r["client_only"]["step"] for r in runs),
        "server_floor": statistics.median(r["server_floor"] for r in runs),
        "trainable": runs[0]["trainable"],
    }


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    base = next(r for r in rows if r["variant"] == "two-point")

    def ratio(r: dict[str, Any], key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base[key] else "n/a"

    lines = [
        f"# ZO client estimators' cost per step ({title})",
        "",
        "| estimator | client forwards | server scorings | bytes up | bytes down | whole step s | client-only step s "
        "| server floor s | bytes up vs two-point | scorings vs two-point | whole step vs two-point |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['client_forwards']:.0f} | {r['server_scorings']:.0f} | {r['bytes_up']:,.0f} | "
            f"{r['bytes_down']:,.0f} | {r['step']:.3f} | {r['client_only']:.3f} | {r['server_floor']:.3f} | "
            f"{ratio(r, 'bytes_up')} | {ratio(r, 'server_scorings')} | {ratio(r, 'step')} |"
        )
    lines += [
        "",
        "Counts are per step, counted over the measured steps. Server scorings: perturbed activations the "
        "server scores (each a forward of its top over the batch); its training forward and backward on the "
        "clean activations come on top, the same for every estimator. Whole step: client and in-process "
        "server share the machine's cores. Client-only: the server answers at once. Server floor: the "
        "server's own work per step, timed alone. Times are medians over the repeats.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="sim_configs/sst2_minilm_full.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/estimator_cost_minilm")
    args = parser.parse_args(argv)
    shared = {**dict(pair.split("=", 1) for pair in args.set), "zo-queries": args.queries}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    scenario = str(Path(args.scenario).resolve())
    for repeat in range(args.repeats):
        for name, overrides in VARIANTS.items():
            spec = {"name": name, "scenario": scenario, "steps": args.steps, "overrides": {**shared, **overrides}}
            runs[name].append(_run_worker(spec))
            print(f"repeat {repeat + 1}: {name}: step {runs[name][-1]['full']['step']:.3f} s", flush=True)
    rows = [summarise(name, result) for name, result in runs.items()]
    title = f"{Path(args.scenario).name} {' '.join(args.set)}, Q = {args.queries}, {args.steps} steps x {args.repeats}"
    text = markdown(rows, title)
    command = " ".join(
        [
            f"python -m benchmarks.estimator_cost --scenario {args.scenario}",
            *(f"--set {s}" for s in args.set),
            f"--queries {args.queries} --steps {args.steps} --repeats {args.repeats} --out {args.out}",
        ]
    )
    write_report(ROOT / args.out, text, rows, command)
    print(text)


if __name__ == "__main__":
    main()
