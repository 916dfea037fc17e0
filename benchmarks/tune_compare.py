"""AUTOMATA side by side, over tasks and seeds: the same Optuna study (sampler, pruner, trials)
tuned on the full data, on random subsets and on gradient-matched subsets of the same fraction,
each followed by the best configuration trained on the full data and tested. One `flwr run`
simulation per (task, seed, row); the seed moves the data sample, the client partitions, the
sampler and the model's initialisation together.

    python -m benchmarks.tune_compare --out runs/tune [--tasks sst2 rte] [--seeds 0 1 2]
        [--fractions 0.1 0.3] [--selectors random gradmatch] [--set key=value ...]
        [--task-set rte:max-length=128 ...] [--task-selectors rte:random,gradmatch ...] [--docs docs/results]

Writes ``<docs>/tuning.md`` / ``.json`` / ``tuning.png``: per task and row, tuning speed-up over
full-data tuning and final test accuracy after retraining on the full data (mean ± sd over
seeds), the paired difference gradmatch - random, and the selection quality (how far each selected
subset's weighted proxy sum is from the full sum, next to random subsets of the same size drawn
on the same proxies); the per-seed rows follow. Each finished (task, seed, row) is recorded in
the ledger ``docs/results/ledgers/tuning.json`` (committed with the reports); one found there with the
same request (scenario, overrides, SuperNodes) is read back, not rerun, so a study spread over
sessions and machines picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.accuracy import LEARNED, beats_floor
from benchmarks.flower_sim import ROOT, run_simulation
from benchmarks.ledger import Ledger
from benchmarks.report import write_report
from benchmarks.stats import mean_sd, spread, standard_error
from fl_app.config import SELECTORS, scenario_config
from fl_app.scenario import majority_test_accuracy

SCENARIO = ROOT / "sim_configs" / "tune_minilm.toml"


def summarise(name: str, results: dict) -> dict:
    """One tuning run's costs, choice and outcome."""
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


def rows_of(fractions: list[float], selectors: list[str]) -> list[tuple[str, str, float]]:
    """(name, selector, fraction): full-data tuning first, then each selector at each fraction."""
    return [("full", "full", 1.0)] + [(f"{sel} {f:.0%}", sel, f) for f in fractions for sel in selectors]


def run_row(scenario: Path, overrides: list[str], run_dir: Path, supernodes: int) -> dict:
    """One `flwr run` of the scenario in ``run_dir`` (emptied first: this benchmark's own); its results."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_simulation(scenario, [*overrides, f"out-dir={run_dir}"], supernodes)


def task_overrides(sets: list[str], task_sets: dict[str, list[str]] | None, task: str, seed: int) -> list[str]:
    """A task's run overrides on one seed: the study's ``sets``, then the task's own, then task and
    seed. Its runs, its validation and its constant-answer floor all sample the data from these."""
    return [*sets, *(task_sets or {}).get(task, []), f"task={task}", f"seed={seed}"]


def measure(
    scenario: Path,
    tasks: list[str],
    seeds: list[int],
    rows: list[tuple[str, str, float]],
    out: Path,
    supernodes: int,
    sets: list[str],
    task_sets: dict[str, list[str]] | None = None,
    ledger: Ledger | None = None,
    task_rows: dict[str, list[tuple[str, str, float]]] | None = None,
) -> dict[str, dict[int, list[dict]]]:
    """Per task and seed, each row's summary (the full row first, with ``speed_up`` over it), read
    from ``ledger`` (default: ``out/ledger.json``) or run in a folder under ``out`` and recorded
    there; ``task_sets`` adds one task's own overrides (a shorter max length, say), ``task_rows``
    one task's own rows in place of ``rows`` (fewer selectors, say)."""
    ledger = ledger if ledger is not None else Ledger(out / "ledger.json")
    study: dict[str, dict[int, list[dict]]] = {}
    for task in tasks:
        for seed in seeds:
            found = []
            for name, selector, fraction in (task_rows or {}).get(task, rows):
                overrides = [
                    *task_overrides(sets, task_sets, task, seed),
                    f"subset-selector={selector}",
                    f"subset-fraction={fraction}",
                ]
                key = f"{task}/s{seed}/" + name.replace(" ", "_").replace("%", "pct")
                request = {"scenario": scenario.read_text(), "overrides": overrides, "supernodes": supernodes}
                summary = ledger.get(key, request)
                if summary is None:
                    summary = summarise(name, run_row(scenario, overrides, out / key, supernodes))
                    ledger.put(key, request, summary)
                found.append(summary)
            for r in found:
                r["speed_up"] = found[0]["tuning_seconds"] / r["tuning_seconds"]
                r["test_vs_full"] = r["test"] - found[0]["test"]
            study.setdefault(task, {})[seed] = found
            print(f"[tune_compare] {task} seed {seed}: " + ", ".join(f"{r['run']} {r['test']:.3f}" for r in found))
    return study


def aggregate(study: dict[str, dict[int, list[dict]]]) -> dict[str, list[dict]]:
    """Per task, one entry per row with its per-seed values gathered (selection errors averaged)."""
    per_seed = ("speed_up", "tuning_seconds", "steps", "test", "test_vs_full", "best_dev", "pruned")
    out: dict[str, list[dict]] = {}
    for task, by_seed in study.items():
        out[task] = []
        for name in [r["run"] for r in next(iter(by_seed.values()))]:
            runs = [next(r for r in found if r["run"] == name) for found in by_seed.values()]
            entry: dict[str, Any] = {"run": name, **{key: [r[key] for r in runs] for key in per_seed}}
            for key in ("gradmatch_error", "random_error"):
                entry[key] = mean([r[key] for r in runs if r[key] is not None])
            out[task].append(entry)
    return out


def paired_differences(study: dict[str, dict[int, list[dict]]], a: str, b: str) -> dict[str, dict[str, Any]]:
    """Per task and fraction, final test of selector ``a`` minus ``b`` on the same seed: the
    differences, their mean and its standard error."""
    found: dict[str, dict[str, Any]] = {}
    for task, by_seed in study.items():
        for r in next(iter(by_seed.values())):
            if not r["run"].startswith(a + " "):
                continue
            frac = r["run"].split(" ", 1)[1]
            diffs = [
                next(x["test"] for x in runs if x["run"] == f"{a} {frac}")
                - next(x["test"] for x in runs if x["run"] == f"{b} {frac}")
                for runs in by_seed.values()
                if any(x["run"] == f"{b} {frac}" for x in runs)
            ]
            if diffs:
                found[f"{task} {frac}"] = {"diffs": diffs, "mean": spread(diffs)[0], "se": standard_error(diffs)}
    return found


def wins_of(diffs: dict[str, dict[str, Any]]) -> list[str]:
    """Where the paired mean is more than two standard errors above zero, over more than one seed."""
    return [k for k, d in diffs.items() if len(d["diffs"]) > 1 and d["mean"] > 2 * d["se"] > 0]


def verdict(diffs: dict[str, dict[str, Any]], a: str = "gradmatch", b: str = "random") -> str:
    """Plainly: where ``a`` beats ``b`` on final test (paired mean more than two standard errors
    above zero, over more than one seed), or that it does not anywhere."""
    wins = wins_of(diffs)
    listed = "; ".join(f"{k}: {100 * d['mean']:+.1f} ± {100 * d['se']:.1f}" for k, d in diffs.items())
    if wins:
        return (
            f"{a} beats {b} on final test at {', '.join(wins)} (paired difference, points ± standard error: {listed})."
        )
    return f"{a} does not beat {b} on final test anywhere here (paired difference, points ± standard error: {listed})."


def table(agg: dict[str, list[dict]]) -> str:
    """Mean ± sd over seeds per task and row."""
    lines = [
        "| task | tuning data | speed-up | tuning s | steps | final test acc | test vs full | best dev in tuning | "
        "pruned | proxy-sum error: gradmatch / random |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in agg.items():
        for r in rows:
            error = "-" if r["gradmatch_error"] is None else f"{r['gradmatch_error']:.3f} / {r['random_error']:.3f}"
            lines.append(
                f"| {task} | {r['run']} | {mean_sd(r['speed_up'], 2)}x | {mean_sd(r['tuning_seconds'], 0)} | "
                f"{mean_sd(r['steps'], 0)} | {mean_sd(r['test'])} | {mean_sd(r['test_vs_full'], signed=True)} | "
                f"{mean_sd(r['best_dev'])} | {mean_sd(r['pruned'], 1)} | {error} |"
            )
    return "\n".join(lines)


def seed_table(study: dict[str, dict[int, list[dict]]]) -> str:
    """Every run: its seed, cost, choice and final test."""
    lines = [
        "| task | seed | tuning data | tuning s | speed-up | selection s | selection MiB | pruned / failed | "
        "best dev | final test | best config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, by_seed in study.items():
        for seed, runs in by_seed.items():
            for r in runs:
                params = ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items()
                )
                lines.append(
                    f"| {task} | {seed} | {r['run']} | {r['tuning_seconds']:.0f} | {r['speed_up']:.2f}x | "
                    f"{r['selection_seconds']:.1f} | {r['selection_mib']:.1f} | {r['pruned']} / {r['failed']} of "
                    f"{r['trials']} | {r['best_dev']:.3f} | {r['test']:.3f} | {params} |"
                )
    return "\n".join(lines)


def plot(agg: dict[str, list[dict]], path: Path) -> Path:
    """Tuning speed-up against final test accuracy by selector, one panel per task (error bars: one
    standard deviation over seeds; labels: the subset fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(agg), figsize=(5 * len(agg), 4), squeeze=False)
    markers = {"full": "s", "random": "o", "gradmatch": "^", "gradmatch-pc": "v"}
    for ax, (task, rows) in zip(axes[0], agg.items()):
        for selector in dict.fromkeys(r["run"].split(" ")[0] for r in rows):
            mine = [r for r in rows if r["run"].split(" ")[0] == selector]
            xs, ys = [spread(r["speed_up"]) for r in mine], [spread(r["test"]) for r in mine]
            ax.errorbar(
                [m for m, _ in xs],
                [m for m, _ in ys],
                xerr=[sd for _, sd in xs],
                yerr=[sd for _, sd in ys],
                fmt=markers.get(selector, "D"),
                capsize=3,
                label=selector,
            )
            for r, (x, _), (y, _) in zip(mine, xs, ys):
                ax.annotate(r["run"].partition(" ")[2], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("tuning speed-up over full data (x)")
        ax.legend(fontsize=8)  # per panel: a task may run its own selectors
    axes[0][0].set_ylabel("final test accuracy (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def selectors_in(study: dict[str, dict[int, list[dict]]]) -> list[str]:
    """The subset selectors a study ran, in order of first appearance (``full`` aside)."""
    names = [r["run"] for by_seed in study.values() for runs in by_seed.values() for r in runs]
    return [sel for sel in dict.fromkeys(name.split(" ")[0] for name in names) if sel != "full"]


def verdicts(study: dict[str, dict[int, list[dict]]]) -> list[str]:
    """Each GradMatch variant the study ran against random subsets, plainly."""
    return [
        verdict(paired_differences(study, sel, "random"), sel)
        for sel in selectors_in(study)
        if sel.startswith("gradmatch") and "random" in selectors_in(study)
    ]


def same_choice_gaps(study: dict[str, dict[int, list[dict]]]) -> list[dict[str, Any]]:
    """Rows of one task and seed whose studies chose the same configuration: their final tests differ
    only by the final training's own run-to-run noise (with clients side by side the server trains in
    arrival order), the floor below which differences between rows say nothing."""
    found = []
    for task, by_seed in study.items():
        for seed, runs in by_seed.items():
            groups: dict[str, list[dict]] = {}
            for r in runs:
                groups.setdefault(json.dumps(r["best_params"], sort_keys=True), []).append(r)
            for same in (g for g in groups.values() if len(g) > 1):
                tests = [r["test"] for r in same]
                found.append(
                    {"task": task, "seed": seed, "runs": [r["run"] for r in same], "gap": max(tests) - min(tests)}
                )
    return found


def noise_line(study: dict[str, dict[int, list[dict]]]) -> str:
    """The same-choice gaps, plainly (empty if no two rows chose alike)."""
    gaps = same_choice_gaps(study)
    if not gaps:
        return ""
    listed = "; ".join(f"{g['task']} seed {g['seed']}: {', '.join(g['runs'])} {100 * g['gap']:.1f}" for g in gaps)
    return (
        f"Noise floor: rows that chose the same configuration still differ in final test by up to "
        f"{100 * max(g['gap'] for g in gaps):.1f} points ({listed}); the final training is not bit-reproducible "
        "with clients side by side (the server trains on activations in arrival order)."
    )


def suggestions(study: dict[str, dict[int, list[dict]]], settings: dict[str, Any] | None = None) -> str:
    """Where no GradMatch variant beats random: what the measurements point to, each part computed from
    them (selection quality, the paired gaps against the noise floor, selection's share of the study's
    time, speed-ups of the rows paired by task, seed and fraction) and from the study's ``settings``
    (warm start, reselection: those every task shares); empty otherwise."""
    variants = [sel for sel in selectors_in(study) if sel.startswith("gradmatch")]
    settings = settings or {}
    if not variants or "random" not in selectors_in(study):
        return ""
    paired = {sel: paired_differences(study, sel, "random") for sel in variants}
    if any(wins_of(diffs) for diffs in paired.values()):
        return ""
    pairs = []  # (gradmatch-variant row, the random row of its task, seed and fraction)
    for by_seed in study.values():
        for runs in by_seed.values():
            by_name = {x["run"]: x for x in runs}
            for r in runs:
                selector, _, fraction = r["run"].partition(" ")
                if selector in variants and (twin := by_name.get(f"random {fraction}")) is not None:
                    pairs.append((r, twin))
    parts = []
    errors = [(r["gradmatch_error"], r["random_error"]) for r, _ in pairs if r["gradmatch_error"] is not None]
    if errors and mean([g for g, _ in errors]) and mean([x for _, x in errors]):
        ratio = mean([x for _, x in errors]) / mean([g for g, _ in errors])
        size = "the full sum than a random subset's of the same size"
        parts.append(
            f"the selection itself works as designed: a GradMatch subset's weighted proxy sum is {ratio:.1f}x "
            f"closer to {size}"
            if ratio > 1
            else "the selection does not match the full gradient better than chance: a GradMatch subset's "
            f"weighted proxy sum is {1 / ratio:.1f}x farther from {size}"
        )
    diffs = [d for by_key in paired.values() for v in by_key.values() for d in v["diffs"]]
    if diffs and (gaps := same_choice_gaps(study)):
        floor = max(g["gap"] for g in gaps)
        beyond = [d for d in diffs if abs(d) > floor]
        parts.append(
            f"{len(diffs) - len(beyond)} of {len(diffs)} paired gaps to random (seed by seed) are within the noise "
            f"floor ({100 * floor:.1f} points)"
            + (
                f"; of the {len(beyond)} beyond it, {sum(d < 0 for d in beyond)} favour random"
                f" (largest {100 * max(abs(d) for d in beyond):.1f} points)"
                if beyond
                else ""
            )
            + ": more seeds or a deterministic final training would be needed to resolve gaps of that size"
        )
    if pairs and (spent := sum(r["tuning_seconds"] for r, _ in pairs)):
        share = sum(r["selection_seconds"] for r, _ in pairs) / spent
        mine, theirs = mean([r["speed_up"] for r, _ in pairs]), mean([x["speed_up"] for _, x in pairs])
        slower = mine < theirs
        parts.append(
            f"selection takes {100 * share:.0f}% of a GradMatch study's tuning time; its speed-up ({mine:.1f}x) is "
            f"{'below' if slower else 'not below'} random's ({theirs:.1f}x) on the same task, seed and fraction"
            + (
                f", and reselecting less often (subset-reselect-every = {settings['subset-reselect-every']} here) "
                "would narrow that"
                if "subset-reselect-every" in settings and slower
                else ""
            )
        )
    if settings.get("subset-warm-start") == 0:
        parts.append(
            "the first selection scores proxies of the untrained model (subset-warm-start = 0 here; AUTOMATA "
            "trains on the full data for a share of the rounds first)"
        )
    return "What the measurements suggest: " + "; ".join(parts) + "." if parts else ""


def constant_answer_floors(
    scenario: Path, tasks: list[str], seeds: list[int], sets: list[str], task_sets: dict[str, list[str]]
) -> dict[str, list[float]]:
    """Per task, the best constant answer's test accuracy (the test split's most common label, no
    model) on each seed's data sample: the floor a row must beat to have learned the task."""
    return {
        task: [
            majority_test_accuracy(
                scenario_config(scenario, task_overrides(sets, task_sets, task, seed))[0],
                best_constant=True,
            )
            for seed in seeds
        ]
        for task in tasks
    }


def floor_line(agg: dict[str, list[dict]], floors: dict[str, list[float]]) -> str:
    """The best constant answer per task, and on each task the rows whose final test does not beat it
    (:func:`beats_floor`): where none does, the task was not learned and its selector comparison
    says nothing about selection."""
    listed = ", ".join(f"{task} {100 * mean(values):.1f}" for task, values in floors.items())
    text = f"Best constant answer (the test split's most common label, no model) on test: {listed} (seed mean)."
    for task, rows in agg.items():
        below = [r["run"] for r in rows if not beats_floor(r["test"], floors[task])]
        if len(below) == len(rows):
            text += (
                f" No row beats it on {task} (by more than {100 * LEARNED:g} points and two standard errors over "
                f"seeds): the study does not learn {task} at this budget, so {task}'s selector comparison says "
                "nothing about selection."
            )
        elif below:
            text += f" On {task}, {', '.join(below)} do{'es' if len(below) == 1 else ''} not beat it."
        else:
            text += f" Every row beats it on {task}."
    return text


def report(
    study: dict[str, dict[int, list[dict]]],
    docs: Path,
    flags: str,
    settings: dict[str, Any] | None = None,
    floors: dict[str, list[float]] | None = None,
) -> Path:
    """``<docs>/tuning.md`` / ``.json`` / ``.png`` from the study run with ``flags`` (``--tasks ...``) on a
    scenario with ``settings`` (its subset keys, for the suggestions), beside each task's constant-answer
    ``floors`` per seed."""
    command = f"python -m benchmarks.tune_compare {flags}"
    agg = aggregate(study)
    docs.mkdir(parents=True, exist_ok=True)
    png = plot(agg, docs / "tuning.png")
    seeds = sorted({s for by_seed in study.values() for s in by_seed})
    text = (
        f"# Tuning on subsets over seeds\n\n`{command}` (seeds {', '.join(map(str, seeds))}; one `flwr run` per "
        "task, seed and row). The full row tunes on all data; the others on subsets reselected every round; "
        "each study's best configuration is then trained on the full data and tested. Speed-up: the full "
        f"row's tuning wall time over the row's, on the same seed. Plot: `{png.name}`.\n\n"
        + "".join(
            f"{line}\n\n"
            for line in [
                floor_line(agg, floors) if floors else "",
                *verdicts(study),
                suggestions(study, settings),
                noise_line(study),
            ]
            if line
        )
        + f"## Mean ± sd over seeds\n\n{table(agg)}\n\n## Every run\n\n{seed_table(study)}\n"
    )
    rerun = f"python -m benchmarks.tune_compare --out runs/tune {flags} --docs docs/results"  # rewrites its report
    md, _ = write_report(docs / "tuning", text, {"study": study, "aggregate": agg, "constant_answer": floors}, rerun)
    return md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scenario", default=str(SCENARIO))
    parser.add_argument("--tasks", nargs="+", default=["sst2"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3])
    subsets = [sel for sel in SELECTORS if sel != "full"]
    parser.add_argument("--selectors", nargs="+", default=["random", "gradmatch"], choices=subsets)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--task-set", action="append", default=[], metavar="TASK:KEY=VALUE")
    parser.add_argument(
        "--task-selectors", action="append", default=[], metavar="TASK:SEL[,SEL...]", help="a task's own selectors"
    )
    parser.add_argument("--docs", type=Path, help="where tuning.md / .json / .png go (default: --out)")
    parser.add_argument(
        "--ledger", type=Path, default=ROOT / "docs" / "results" / "ledgers" / "tuning.json", help="finished runs"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    task_sets: dict[str, list[str]] = {}
    for item in args.task_set:
        task, sep, pair = item.partition(":")
        if not sep or "=" not in pair or task not in args.tasks:
            parser.error(f"--task-set {item!r}: expected TASK:KEY=VALUE, a task of --tasks")
        task_sets.setdefault(task, []).append(pair)
    task_rows: dict[str, list[tuple[str, str, float]]] = {}
    for item in args.task_selectors:
        task, sep, names = item.partition(":")
        if not sep or task not in args.tasks or not set(names.split(",")) <= set(subsets):
            parser.error(f"--task-selectors {item!r}: expected TASK:SEL[,SEL...], a task of --tasks, SEL of {subsets}")
        task_rows[task] = rows_of(args.fractions, names.split(","))
    try:  # every task's scenario, as its runs will get it: a bad one fails here, before any run
        configs = [
            scenario_config(args.scenario, task_overrides(args.set, task_sets, t, seed))[0]
            for t in args.tasks
            for seed in args.seeds
        ]
    except ValueError as err:
        parser.error(str(err))
    keys = ("subset-reselect-every", "subset-warm-start")  # quoted by the suggestions only where every task agrees
    settings = {k: configs[0][k] for k in keys if all(config[k] == configs[0][k] for config in configs)}
    study = measure(
        Path(args.scenario),
        args.tasks,
        args.seeds,
        rows_of(args.fractions, args.selectors),
        out,
        args.supernodes,
        args.set,
        task_sets,
        Ledger(args.ledger),
        task_rows,
    )
    flags = " ".join(
        [
            f"--tasks {' '.join(args.tasks)}",
            f"--seeds {' '.join(map(str, args.seeds))}",
            f"--fractions {' '.join(f'{f:g}' for f in args.fractions)}",
            f"--selectors {' '.join(args.selectors)}",
        ]
        + [f"--set {s}" for s in args.set]
        + [f"--task-set {s}" for s in args.task_set]
        + [f"--task-selectors {s}" for s in args.task_selectors]
        + ([f"--scenario {args.scenario}"] if args.scenario != str(SCENARIO) else [])
    )
    floors = constant_answer_floors(Path(args.scenario), args.tasks, args.seeds, args.set, task_sets)
    print(f"[tune_compare] wrote {report(study, args.docs or out, flags, settings, floors)}", flush=True)


if __name__ == "__main__":
    main()
