"""The estimator study's gate: where does first-order training of the bottom pay at least 3 dev points?

    python -m benchmarks.zo_gate [--jobs 2] [--model minilm|smollm2|all] [--out runs/zo_gate]

Decided on dev only (500 examples from SST-2's training split, disjoint from training), before any
estimator runs long (issue 43). Per setting (model, cut): the frozen bottom with the server's Adam
rate swept over three points, and first-order training of the bottom (fo-fo) with the
parameterisations the ZO estimators will use, each with Adam, a 40-step warm-up and a cosine decay:
the full client at two rates (and plain SGD at the last study's stable rate), LoRA on the last client
layer only (its q and v projections), the norms only. headroom = the best fo-fo run's final dev
accuracy - the best frozen bottom's, each picked by late dev cross-entropy, paired per example on the
same 500 dev examples (points, the per-example standard error SE, McNemar's exact p). A setting
clears the gate when its headroom is at least :data:`GATE_POINTS` and its fo-fo pick is stable (no
round flagged as diverging). The table is recorded whatever it shows.

Settings: all-MiniLM-L6-v2 at cuts 5 and 6 (of 6: at cut 6 the server keeps only the pooler and the
classifier), 500 steps of 16 fresh examples; SmolLM2-135M with LoRA on both sides at cuts 15 and 20
(of 30), 300 steps of 8, fo-fo at the rate that stayed stable at cut 10 (Adam 3e-4, cosine). The
frozen bottom's server-rate sweep is the frozen bottom's own: fo-fo runs at 2e-4 (MiniLM), so if the
frozen bottom prefers another rate the headroom is, if anything, understated.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.ledger import Ledger
from benchmarks.report import ROOT, write_report
from benchmarks.zo_bottom import COSINE, SMOL, budget, diverging_rounds, late_loss, pick, run_all

GATE_POINTS = 3.0  # dev points of first-order headroom a setting needs (issue 43)
MINILM_CUTS = (5, 6)
MINILM_STEPS = 500
SERVER_LRS = (5e-5, 2e-4, 1e-3)  # the frozen bottom's server (Adam) rates
FOFO_SERVER_LR = 2e-4  # the last study's pick at cut 4
NORMS_ONLY = "embeddings,matrices,biases"  # client-freeze leaving the norms alone
SMOL_CUTS = (15, 20)
SMOL_STEPS = 300
SMOL_BATCH = 8
ADAM_COSINE = {"client-optimizer": "adam", **COSINE}


def minilm_runs(cut: int) -> dict[str, dict[str, Any]]:
    """The gate's MiniLM runs at ``cut`` by name (``gate/minilm/cut<k>/<kind>/<label>``)."""
    common = {**budget(MINILM_STEPS, 100), "cut-layer": cut, "seed": 0}
    prefix = f"gate/minilm/cut{cut}"
    runs = {
        f"{prefix}/frozen/s-lr{lr:g}": {**common, "mode": "hosl", "client-params": "frozen", "server-lr": lr}
        for lr in SERVER_LRS
    }
    fofo = {**common, "mode": "fo-fo", "server-lr": FOFO_SERVER_LR}
    last = f"layer.{cut - 1}.attention.self"
    variants = {
        "full/adam1e-05": {"client-lr": 1e-5, **ADAM_COSINE},
        "full/adam3e-05": {"client-lr": 3e-5, **ADAM_COSINE},
        "full/sgd0.03": {"client-lr": 0.03, "client-optimizer": "sgd"},
        "lora-last/adam1e-03": {
            "client-lr": 1e-3,
            **ADAM_COSINE,
            "client-params": "lora",
            "lora-targets": f"{last}.query,{last}.value",
        },
        "norms/adam1e-03": {"client-lr": 1e-3, **ADAM_COSINE, "client-freeze": NORMS_ONLY},
    }
    runs.update({f"{prefix}/fo-fo/{label}": {**fofo, **keys} for label, keys in variants.items()})
    return runs


def smollm2_runs(cut: int) -> dict[str, dict[str, Any]]:
    """The gate's SmolLM2 runs at ``cut``: the frozen bottom and fo-fo with LoRA on every client layer."""
    common = {**budget(SMOL_STEPS, 100, SMOL_BATCH), **SMOL, "cut-layer": cut, "seed": 0}
    prefix = f"gate/smollm2/cut{cut}"
    return {
        f"{prefix}/frozen/s-lr1e-04": {**common, "mode": "hosl", "client-params": "frozen"},
        f"{prefix}/fo-fo/lora/adam3e-04": {**common, "mode": "fo-fo", "client-lr": 3e-4, **COSINE},
    }


SETTINGS = {
    **{f"minilm/cut{c}": minilm_runs(c) for c in MINILM_CUTS},
    **{f"smollm2/cut{c}": smollm2_runs(c) for c in SMOL_CUTS},
}


def verdict(runs: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """One setting's gate row from its finished runs (None until all finished): each side's pick, the
    headroom on dev paired per example, whether the fo-fo pick diverged, and whether the gate is cleared."""
    frozen = pick({n: r for n, r in runs.items() if "/frozen/" in n})
    fofo = pick({n: r for n, r in runs.items() if "/fo-fo/" in n})
    if frozen is None or fofo is None:
        return None
    best_frozen, best_fofo = runs[frozen[0]], runs[fofo[0]]
    if best_frozen.get("dev_correct") is None or best_fofo.get("dev_correct") is None:
        return None
    headroom = stats.per_example(best_fofo["dev_correct"], best_frozen["dev_correct"])
    diverged = diverging_rounds(best_fofo)
    per_kind = {}
    for name, r in runs.items():
        if "/fo-fo/" in name:
            per_kind[name.split("/fo-fo/")[1]] = stats.per_example(r["dev_correct"], best_frozen["dev_correct"])
    return {
        "frozen": frozen[0],
        "fo-fo": fofo[0],
        "headroom": headroom,
        "per_variant": per_kind,
        "diverged": diverged,
        "cleared": headroom["points"] >= GATE_POINTS and not diverged,
        "minutes": sum(r["seconds"] for r in runs.values()) / 60,
    }


def measure(models: tuple[str, ...], out: Path, jobs: int, ledger: Ledger) -> dict[str, Any]:
    """Every wanted setting's runs (from the ledger or run now) and its gate row."""
    wanted = {
        name: keys
        for setting, runs in SETTINGS.items()
        if setting.split("/")[0] in models
        for name, keys in runs.items()
    }
    done = run_all(wanted, out, jobs, ledger)
    rows = {}
    for setting, runs in SETTINGS.items():
        mine = {n: done.get(n) for n in runs}
        rows[setting] = {"runs": mine, "verdict": None if None in mine.values() else verdict(mine)}
    return rows


def report(rows: dict[str, Any]) -> str:
    """The gate table: one row per setting, then each fo-fo variant against the best frozen bottom."""
    lines = [
        "# The ZO-estimator study's gate (dev only, seed 0)",
        "",
        f"A setting clears the gate when first-order training of the bottom beats the frozen bottom by at least "
        f"{GATE_POINTS:g} points of final dev accuracy (500 examples, paired per example) at a stable rate. "
        "± is the per-example standard error (SE) of the paired difference; p is McNemar's exact test.",
        "",
        "| setting | frozen pick (dev %) | fo-fo pick (dev %) | headroom on dev | stable | cleared | run minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for setting, row in rows.items():
        v = row["verdict"]
        if v is None:
            done = sum(r is not None for r in row["runs"].values())
            lines.append(f"| {setting} | {done} of {len(row['runs'])} runs finished | | | | | |")
            continue
        h = v["headroom"]
        fz, fo = row["runs"][v["frozen"]], row["runs"][v["fo-fo"]]
        lines.append(
            f"| {setting} | {v['frozen'].rsplit('/', 1)[1]} ({100 * fz['dev_accuracy'][-1]:.1f}) | "
            f"{v['fo-fo'].split('/fo-fo/')[1]} ({100 * fo['dev_accuracy'][-1]:.1f}) | {h['points']:+.1f} ± "
            f"{h['se']:.1f} SE (+{h['gained']} / -{h['lost']}, p {h['p']:.2g}) | "
            f"{'no: rounds ' + str(v['diverged']) if v['diverged'] else 'yes'} | "
            f"{'**yes**' if v['cleared'] else 'no'} | {v['minutes']:.0f} |"
        )
    lines += ["", "Each fo-fo variant against the best frozen bottom (final dev, paired per example, ± SE):", ""]
    for setting, row in rows.items():
        v = row["verdict"]
        if v is None:
            continue
        parts = [
            f"{label} {p['points']:+.1f} ± {p['se']:.1f} (late dev CE "
            f"{late_loss(row['runs'][next(n for n in row['runs'] if n.endswith('/fo-fo/' + label))]):.3f})"
            for label, p in v["per_variant"].items()
        ]
        lines.append(f"- {setting}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each); 0: report only")
    parser.add_argument("--out", default="runs/zo_gate", help="run folders")
    parser.add_argument("--docs", default=str(ROOT / "docs/results"), help="where zo_gate.md / .json go")
    parser.add_argument("--ledger", default=str(ROOT / "docs/results/ledgers/zo_gate.json"), help="finished runs")
    args = parser.parse_args(argv)
    models = ("minilm", "smollm2") if args.model == "all" else (args.model,)
    rows = measure(models, Path(args.out), args.jobs, Ledger(Path(args.ledger)))
    md, _ = write_report(Path(args.docs) / "zo_gate", report(rows), rows, "python -m benchmarks.zo_gate --jobs 0")
    print(f"[zo_gate] report written to {md}")


if __name__ == "__main__":
    main()
