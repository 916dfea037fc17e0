"""Does a ZO client estimator that carries more signal capture a real share of a real headroom?

    python -m benchmarks.zo_estimators [--phase pilot|main] [--jobs 2] [--out runs/zo_estimators]

The study of issue 43, at the setting the gate picked (:mod:`benchmarks.zo_gate`: the cleared setting
with the largest first-order headroom on dev; SmolLM2 with LoRA at cut 10 when none clears). Every run
is in the ledger ``docs/results/ledgers/zo_estimators.json`` and a run cut off by a session's end
continues from its last round (:func:`benchmarks.zo_bottom.run_all`).

1. ``pilot`` (seed 0; 400 steps for MiniLM, 200 for SmolLM2; picked by late dev cross-entropy):
   a. each estimator at three client rates (cosine decay after a 40-step warm-up): two-point at the
      setting's Q, one-sided at twice that Q (the same client forwards and server scorings per step),
      low-rank (rank 2, subspace kept 50 steps), sparse (80 % of each matrix left out; full-parameter
      clients only); on MiniLM also two-point and one-sided on the small parameterisations whose
      first-order ceiling the gate measured (the norms alone; LoRA on the last client layer); fo-fo
      with Adam at three rates, the same schedule (the ceiling gets the same tuning effort);
   b. at the best estimator's pick: its Q doubled and its eps times 10; and the server rate swept over
      three points (x 1/4, x 1, x 4) for the frozen bottom, fo-fo's pick and the best estimator's.
2. ``main`` (:data:`MAIN_STEPS` steps, seeds 0-4): the frozen bottom, fo-fo and hosl with the two best
   estimators, each at its picks; the cross-estimator table by the rule below.

The success rule, written before any run of this study (pre-registered): :data:`SUCCESS_RULE`.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks import stats, zo_gate
from benchmarks.ledger import Ledger
from benchmarks.report import ROOT, write_report
from benchmarks.zo_bottom import COSINE, SMOL, budget, late_loss, pick, run_all, stability

SUCCESS_RULE = (
    "An estimator succeeds when, over the main phase's 5 seeds, hosl - frozen is above zero by more than two "
    "standard errors in both tests (over seeds: the paired t's SE; per example with the seeds pooled: its SE), "
    "it captures at least half of the headroom (mean hosl - frozen >= 0.5 x mean fo-fo - frozen), the headroom "
    "is at least 3 points, and no seed's hosl run diverges (benchmarks.zo_bottom.stability)."
)
SEEDS = (0, 1, 2, 3, 4)
MAIN_STEPS = {"minilm": 1000, "smollm2": 500}
PILOT_STEPS = {"minilm": 400, "smollm2": 200}
FALLBACK = "smollm2/cut10"  # the one significant headroom of the last study (issue 43)
ESTIMATOR_RATES = {  # per model family, per estimator: its client rates
    "minilm": {
        "two-point": (5e-5, 1e-4, 3e-4),
        "one-sided": (5e-5, 1e-4, 3e-4),
        "low-rank": (5e-5, 1e-4, 3e-4),
        "sparse": (1e-4, 3e-4, 1e-3),  # a fifth of the matrices' values: steps ~sqrt(5) smaller in norm
    },
    "smollm2": {  # a LoRA client has no pretrained matrix to mask: no sparse estimator
        "two-point": (1e-3, 3e-3, 1e-2),
        "one-sided": (1e-3, 3e-3, 1e-2),
        "low-rank": (1e-3, 3e-3, 1e-2),
    },
}
FOFO_RATES = {"minilm": (1e-5, 3e-5, 1e-4), "smollm2": (1e-4, 3e-4, 1e-3)}  # Adam
# The small parameterisations whose first-order ceiling the gate measured (MiniLM's full-parameter client
# only): ZO over a few thousand values (the norms: d ~ 5k at cut 6; LoRA on the last layer's q and v:
# d ~ 12k) against ~21M for the full client, so sqrt(T Q / d) is ~60x larger. Two-point and one-sided each.
SMALL_PARTS = {"norms": (1e-3, 3e-3, 1e-2), "lora-last": (1e-3, 3e-3, 1e-2)}
SMALL_DIFFERENCES = ("two-point", "one-sided")
SERVER_FACTORS = (0.25, 1.0, 4.0)


def setting_keys(setting: str, server_lr: float | None = None) -> dict[str, Any]:
    """The keys every run of ``setting`` (``<model>/cut<k>``) shares."""
    model, cut = setting.split("/")
    keys: dict[str, Any] = {"cut-layer": int(cut.removeprefix("cut"))}
    if model == "smollm2":
        keys.update(SMOL)
    if server_lr is not None:
        keys["server-lr"] = server_lr
    return keys


def family(setting: str) -> str:
    return setting.split("/")[0]


def batch(setting: str) -> int:
    return zo_gate.SMOL_BATCH if family(setting) == "smollm2" else 16


def queries(setting: str) -> int:
    return SMOL["zo-queries"] if family(setting) == "smollm2" else 4


def estimator_keys(setting: str, name: str) -> dict[str, Any]:
    """hosl with estimator ``name`` at the setting's cost: one-sided at twice Q (the same forwards)."""
    q = queries(setting) * (2 if name == "one-sided" else 1)
    return {"mode": "hosl", "zo-estimator": name, "zo-queries": q, **COSINE}


def part_keys(setting: str, part: str) -> dict[str, Any]:
    """The client keys of a small parameterisation at ``setting``'s cut (as the gate's fo-fo variants)."""
    if part == "norms":
        return {"client-freeze": zo_gate.NORMS_ONLY}
    last = f"layer.{setting_keys(setting)['cut-layer'] - 1}.attention.self"
    return {"client-params": "lora", "lora-targets": f"{last}.query,{last}.value", "zo-eps": 1e-2}  # MeZO's LoRA eps


def hosl_kinds(setting: str) -> dict[str, tuple[dict[str, Any], tuple[float, ...]]]:
    """Every hosl kind of the pilot by name: its keys and its client rates (each estimator on the full
    client; two-point and one-sided on each small parameterisation, MiniLM only)."""
    fam = family(setting)
    kinds = {name: (estimator_keys(setting, name), rates) for name, rates in ESTIMATOR_RATES[fam].items()}
    if fam == "minilm":
        for part, rates in SMALL_PARTS.items():
            for name in SMALL_DIFFERENCES:
                kinds[f"{name}-{part}"] = ({**estimator_keys(setting, name), **part_keys(setting, part)}, rates)
    return kinds


def chosen_setting(gate: dict[str, Any]) -> tuple[str, str] | None:
    """(setting, why): the gate's cleared setting with the largest headroom, else :data:`FALLBACK`; None
    while the gate has settings left to run."""
    rows = {s: r["verdict"] for s, r in gate.items()}
    if any(v is None for v in rows.values()):
        return None
    cleared = {s: v for s, v in rows.items() if v["cleared"]}
    if not cleared:
        return FALLBACK, "no setting cleared the gate: the last study's one significant headroom"
    # the largest headroom; equal headrooms go to the cheaper model (MiniLM's step is ~3x SmolLM2's here)
    best = max(cleared, key=lambda s: (round(cleared[s]["headroom"]["points"], 6), family(s) == "minilm"))
    return best, f"the largest headroom on dev that cleared the gate ({cleared[best]['headroom']['points']:+.1f})"


def server_rate(setting: str, gate: dict[str, Any]) -> float:
    """The frozen bottom's pick in the gate (the setting's default server rate at the fallback)."""
    if setting in gate and gate[setting]["verdict"] is not None:
        return float(gate[setting]["verdict"]["frozen"].rsplit("s-lr", 1)[1])
    return float(SMOL["server-lr"])


def pilot_runs(setting: str, server_lr: float) -> dict[str, dict[str, Any]]:
    """Stage a: each estimator's and fo-fo's rates, by name (``pilot/<kind>/lr<rate>``)."""
    common = {**budget(PILOT_STEPS[family(setting)], 50, batch(setting)), **setting_keys(setting, server_lr)}
    common["seed"] = 0
    runs = {
        f"pilot/{name}/lr{lr:g}": {**common, **keys, "client-lr": lr}
        for name, (keys, rates) in hosl_kinds(setting).items()
        for lr in rates
    }
    fofo = {"mode": "fo-fo", "client-optimizer": "adam", **COSINE}
    runs.update({f"pilot/fo-fo/lr{lr:g}": {**common, **fofo, "client-lr": lr} for lr in FOFO_RATES[family(setting)]})
    return runs


def picks(done: dict[str, dict[str, Any] | None], prefix: str = "pilot") -> dict[str, str]:
    """Per kind (each estimator, fo-fo): its run name picked by late dev cross-entropy."""
    kinds = sorted({name.split("/")[1] for name in done if name.startswith(prefix + "/")})
    found = {}
    for kind in kinds:
        chosen = pick({n: r for n, r in done.items() if n.startswith(f"{prefix}/{kind}/")})
        if chosen is not None:
            found[kind] = chosen[0]
    return found


def ranked_estimators(done: dict[str, Any], chosen: dict[str, str]) -> list[str]:
    """The estimators by their pick's late dev cross-entropy, best first."""
    names = [k for k in chosen if k != "fo-fo"]
    return sorted(names, key=lambda k: late_loss(done[chosen[k]]))


def second_stage(setting: str, server_lr: float, done: dict[str, Any], chosen: dict[str, str], requests: dict) -> dict:
    """Stage b: the best estimator's Q doubled and eps x 10; the server rate swept for the frozen bottom,
    fo-fo's pick and the best estimator's pick."""
    best = ranked_estimators(done, chosen)[0]
    keys = requests[chosen[best]]
    runs = {
        f"pilot-b/{best}/q{2 * keys['zo-queries']}": {**keys, "zo-queries": 2 * keys["zo-queries"]},
        f"pilot-b/{best}/eps{10 * _eps(keys):g}": {**keys, "zo-eps": 10 * _eps(keys)},
    }
    frozen = {**requests[chosen["fo-fo"]], "mode": "hosl", "client-params": "frozen"}
    for label, base in (("frozen", frozen), ("fo-fo", requests[chosen["fo-fo"]]), (best, keys)):
        for factor in SERVER_FACTORS:
            runs[f"pilot-b/server/{label}/x{factor:g}"] = {**base, "server-lr": server_lr * factor}
    return runs


def _eps(keys: dict[str, Any]) -> float:
    return float(keys.get("zo-eps", 1e-3))


def main_runs(setting: str, picked: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The main phase: per seed the frozen bottom, fo-fo and each picked hosl estimator at its keys."""
    steps = MAIN_STEPS[family(setting)]
    runs = {}
    for kind, keys in picked.items():
        for seed in SEEDS:
            runs[f"main/{kind}/s{seed}"] = {**keys, **budget(steps, 100, batch(setting)), "seed": seed}
    return runs


def measure(phase: str, out: Path, jobs: int, ledger: Ledger, gate_ledger: Ledger) -> dict[str, Any]:
    """Every stage up to ``phase`` as far as finished runs allow (``jobs = 0``: read the ledger only)."""
    gate = zo_gate.measure(("minilm", "smollm2"), out / "gate", 0, gate_ledger)
    data: dict[str, Any] = {"rule": SUCCESS_RULE, "gate": {s: r["verdict"] for s, r in gate.items()}}
    found = chosen_setting(gate)
    if found is None:
        return data
    setting, why = found
    server_lr = server_rate(setting, gate)
    data["setting"] = {"setting": setting, "why": why, "server_lr": server_lr}
    first = pilot_runs(setting, server_lr)
    done = run_all(first, out, jobs, ledger)
    data["pilot"] = done
    chosen = picks(done)
    if len(chosen) < len(hosl_kinds(setting)) + 1:
        return data
    second = second_stage(setting, server_lr, done, chosen, first)
    done_b = run_all(second, out, jobs, ledger)
    data["pilot_b"] = done_b
    if any(r is None for r in done_b.values()):
        return data
    everything = {**done, **done_b}
    requests = {**first, **second}
    best = ranked_estimators(done, chosen)
    server = {label: _best_server(done_b, label) for label in ("frozen", "fo-fo", best[0])}
    picked = {
        "frozen": {**requests[f"pilot-b/server/frozen/x{server['frozen']:g}"]},
        "fo-fo": {**requests[f"pilot-b/server/fo-fo/x{server['fo-fo']:g}"]},
    }
    for rank, name in enumerate(best[:2]):
        keys = dict(requests[chosen[name]])
        if rank == 0:
            variants = {k: v for k, v in done_b.items() if k.startswith(f"pilot-b/{name}/")}
            variants[chosen[name]] = everything[chosen[name]]
            keys = dict(requests[pick(variants)[0]])
            keys["server-lr"] = server_lr * server[name]
        picked[f"hosl-{name}"] = keys
    data["picked"] = picked
    if phase == "pilot":
        return data
    data["main"] = run_all(main_runs(setting, picked), out, jobs, ledger)
    return data


def _best_server(done_b: dict[str, Any], label: str) -> float:
    runs = {factor: done_b[f"pilot-b/server/{label}/x{factor:g}"] for factor in SERVER_FACTORS}
    return pick(runs)[0]


def verdict(runs: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """``kind``'s row of the main table by :data:`SUCCESS_RULE` (None before two seeds finished)."""
    seeds = [s for s in SEEDS if all(runs.get(f"main/{k}/s{s}") for k in (kind, "frozen", "fo-fo"))]
    if len(seeds) < 2:
        return None
    mine = [runs[f"main/{kind}/s{s}"]["test_correct"] for s in seeds]
    frozen = [runs[f"main/frozen/s{s}"]["test_correct"] for s in seeds]
    fofo = [runs[f"main/fo-fo/s{s}"]["test_correct"] for s in seeds]
    gaps = [stats.per_example(a, b)["points"] for a, b in zip(mine, frozen)]
    headroom = [stats.per_example(a, b)["points"] for a, b in zip(fofo, frozen)]
    to_fofo = [stats.per_example(a, b)["points"] for a, b in zip(mine, fofo)]
    seed_test, pooled = stats.over_seeds(gaps), stats.pooled(mine, frozen)
    share = stats.share_interval(gaps, headroom)
    steady = stability(runs, "main", kind, tuple(seeds))
    minutes = statistics.fmean(runs[f"main/{kind}/s{s}"]["seconds"] / 60 for s in seeds)
    success = (
        len(seeds) == len(SEEDS)
        and stats.clears(seed_test)
        and stats.clears(pooled)
        and share[0] >= 0.5
        and statistics.fmean(headroom) >= zo_gate.GATE_POINTS
        and steady is not None
        and steady["stable"]
    )
    return {
        "seeds": seeds,
        "over_seeds": seed_test,
        "pooled": pooled,
        "share": share,
        "headroom": stats.over_seeds(headroom),
        "to_fofo": stats.over_seeds(to_fofo),
        "stable": None if steady is None else steady["stable"],
        "minutes": minutes,
        "success": success,
        "detectable": 2.8 * seed_test["se"],  # 80 % power, two-sided 5 %: (1.96 + 0.84) SE over seeds
    }


def report(data: dict[str, Any]) -> str:
    lines = [
        "# ZO client estimators: signal, a fair ceiling and a pre-registered test (issue 43)",
        "",
        f"**Success rule (pre-registered, written before any run of this study):** {SUCCESS_RULE}",
        "",
        "## Gate (dev only; benchmarks.zo_gate, docs/results/zo_gate.md)",
        "",
    ]
    for setting, v in data["gate"].items():
        if v is None:
            lines.append(f"- {setting}: not finished")
            continue
        h = v["headroom"]
        lines.append(
            f"- {setting}: headroom {h['points']:+.1f} ± {h['se']:.1f} SE per example (dev), "
            f"{'cleared' if v['cleared'] else 'not cleared'}"
        )
    if "setting" not in data:
        return "\n".join(lines + ["", "The study waits for the gate."])
    s = data["setting"]
    lines += ["", f"Setting: **{s['setting']}** ({s['why']}); server rate {s['server_lr']:g}.", ""]
    lines += ["## Pilot (seed 0, picked by late dev cross-entropy)", "", "| run | late dev CE | test % | minutes |"]
    lines.append("|---|---|---|---|")
    for name, r in {**data.get("pilot", {}), **data.get("pilot_b", {})}.items():
        if r is None:
            lines.append(f"| {name} | not run yet | | |")
        else:
            lines.append(f"| {name} | {late_loss(r):.4f} | {100 * r['test']:.1f} | {r['seconds'] / 60:.0f} |")
    if "picked" in data:
        lines += ["", "Picks for the main phase:", ""]
        lines += [f"- {kind}: {_describe(keys)}" for kind, keys in data["picked"].items()]
    if "main" in data:
        lines += ["", _main_table(data)]
    return "\n".join(lines)


def _describe(keys: dict[str, Any]) -> str:
    shown = ("mode", "client-params", "zo-estimator", "zo-queries", "zo-eps", "client-lr", "client-optimizer")
    return ", ".join(f"{k} {keys[k]}" for k in (*shown, "server-lr") if k in keys)


def _main_table(data: dict[str, Any]) -> str:
    runs = data["main"]
    lines = [
        "## Main phase: the cross-estimator table",
        "",
        "| estimator | seeds | hosl - frozen over seeds | hosl - frozen per example (pooled) | share of the headroom "
        "(95 % interval) | headroom fo-fo - frozen | hosl - fo-fo | stable | minutes per run | succeeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in data["picked"]:
        if not kind.startswith("hosl-"):
            continue
        v = verdict(runs, kind)
        if v is None:
            lines.append(f"| {kind} | fewer than 2 seeds finished | | | | | | | | |")
            continue
        share, low, high = v["share"]
        interval = f"{share:.2f} ({low:.2f} to {high:.2f})" if math.isfinite(low) else f"{share:.2f}"
        lines.append(
            f"| {kind} | {len(v['seeds'])} | {stats.fmt_seeds(v['over_seeds'])} | "
            f"{stats.fmt_per_example(v['pooled'], '')} | {interval} | {stats.fmt_seeds(v['headroom'])} | "
            f"{stats.fmt_seeds(v['to_fofo'])} | {v['stable']} | {v['minutes']:.0f} | "
            f"{'**yes**' if v['success'] else 'no'} (detectable over seeds: ~{v['detectable']:.1f} points) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("pilot", "main"), default="main")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each); 0: report only")
    parser.add_argument("--out", default="runs/zo_estimators", help="run folders")
    parser.add_argument("--docs", default=str(ROOT / "docs/results"), help="where zo_estimators.md / .json go")
    parser.add_argument("--ledger", default=str(ROOT / "docs/results/ledgers/zo_estimators.json"))
    parser.add_argument("--gate-ledger", default=str(ROOT / "docs/results/ledgers/zo_gate.json"))
    args = parser.parse_args(argv)
    data = measure(args.phase, Path(args.out), args.jobs, Ledger(Path(args.ledger)), Ledger(Path(args.gate_ledger)))
    command = f"python -m benchmarks.zo_estimators --phase {args.phase} --jobs 0"
    md, _ = write_report(Path(args.docs) / "zo_estimators", report(data), data, command)
    print(f"[zo_estimators] report written to {md}")


if __name__ == "__main__":
    main()
