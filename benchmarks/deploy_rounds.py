"""A deployment round's fixed cost: cold nodes (a process per message) against warm nodes (a worker).

    python -m benchmarks.deploy_rounds [--scenario sim_configs/smoke_tiny.toml] [--rounds 3] [--repeats 1]

Runs ``scripts/deploy_local.sh`` (a SuperLink and 2 nodes on this machine) with ``--cold`` and
without, alternated in one run: first the scenario as shipped (its clients train concurrently),
then once more each with ``max-concurrent-clients = 1``, whose per-step losses do not depend on
timing and must be identical on both paths. A round's fixed cost is its wall time minus its steps'
(the longest session's with concurrent clients, all sessions' with one at a time): starting
processes, imports, loading the bottom and data, Flower's message polls and the evaluation
sessions' set-up. Writes ``docs/results/deploy_rounds.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[1]
PATHS = {"cold": ["--cold"], "warm": []}


def fixed_seconds(results: dict[str, Any]) -> list[float]:
    """Per round: wall seconds minus step seconds (the longest session's when clients run at once)."""
    one_at_a_time = int(results["config"]["max-concurrent-clients"]) == 1
    return [r["seconds"] - r["step_seconds"]["sum" if one_at_a_time else "max"] for r in results["rounds"]]


def deploy(scenario: str, path: str, sets: str, home: Path) -> dict[str, Any]:
    """One deployment run on ``path`` ('cold' or 'warm'); its results.json."""
    out = home / "out"
    command = ["bash", "scripts/deploy_local.sh", "--insecure", *PATHS[path], "--flwr-home", str(home)]
    command += ["--run-config", scenario, "--set", f"out-dir={out} {sets}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    try:
        results = json.loads((out / "results.json").read_text())
    except OSError as err:
        raise RuntimeError(f"{path} run left no results ({err}); its output ends:\n{done.stdout[-3000:]}") from err
    if results.get("status") != "finished":
        raise RuntimeError(f"{path} run ended {results.get('status')!r}; see {home / 'logs'}")
    return results


def measure(scenario: str, rounds: int, repeats: int) -> dict[str, Any]:
    """Fixed and wall seconds per round on each path (shipped concurrency), and the one-at-a-time
    runs' fixed seconds and whether their per-step losses agree."""
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    ordered: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="hosl-deploy-bench-") as tmp:
        for repeat in range(repeats):
            for path in PATHS:
                runs[path].append(deploy(scenario, path, f"num-rounds={rounds}", Path(tmp) / f"{path}-{repeat}"))
        for path in PATHS:
            sets = f"num-rounds={rounds} max-concurrent-clients=1"
            ordered[path] = deploy(scenario, path, sets, Path(tmp) / f"{path}-ordered")
    found: dict[str, Any] = {"scenario": scenario, "rounds": rounds, "repeats": repeats, "paths": {}}
    for path, results in runs.items():
        fixed = [s for r in results for s in fixed_seconds(r)]
        found["paths"][path] = {
            "fixed_seconds": fixed,
            "round_seconds": [r["seconds"] for res in results for r in res["rounds"]],
            "wall_seconds": [res["wall_seconds"] for res in results],
            "ordered_fixed_seconds": fixed_seconds(ordered[path]),
        }
    losses = {path: [h["train_loss"] for h in res["history"]] for path, res in ordered.items()}
    found["same_losses"] = losses["cold"] == losses["warm"]
    found["steps_compared"] = len(losses["warm"])
    cold, warm = (statistics.mean(found["paths"][p]["fixed_seconds"]) for p in ("cold", "warm"))
    found["fixed_ratio_cold_to_warm"] = cold / warm
    return found


def report(found: dict[str, Any]) -> str:
    def row(path: str) -> str:
        p = found["paths"][path]
        fixed, walls = p["fixed_seconds"], p["round_seconds"]
        return (
            f"| {path} | {' / '.join(f'{s:.1f}' for s in walls)} | {' / '.join(f'{s:.1f}' for s in fixed)} | "
            f"{statistics.mean(fixed):.1f} | {' / '.join(f'{s:.1f}' for s in p['ordered_fixed_seconds'])} |"
        )

    same = "identical" if found["same_losses"] else "DIFFERENT"
    return (
        f"# Deployment rounds: fixed cost, cold nodes against warm workers\n\n`scripts/deploy_local.sh` on "
        f"`{found['scenario']}`, 2 nodes, {found['rounds']} rounds, {found['repeats']} run(s) per path, the paths "
        "alternated in one run. Fixed cost = a round's wall time minus its steps' time.\n\n"
        "| nodes | round seconds | fixed seconds per round | mean fixed | fixed, clients one at a time |\n"
        f"|---|---|---|---|---|\n{row('cold')}\n{row('warm')}\n\n"
        f"Cold / warm fixed cost: {found['fixed_ratio_cold_to_warm']:.1f}x. Per-step losses of the one-at-a-time "
        f"runs ({found['steps_compared']} steps): {same} on both paths."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="sim_configs/smoke_tiny.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs/results/deploy_rounds"))
    args = parser.parse_args(argv)
    found = measure(args.scenario, args.rounds, args.repeats)
    text = report(found)
    print(text)
    command = f"python -m benchmarks.deploy_rounds --scenario {args.scenario} --rounds {args.rounds}"
    write_report(args.out, text, found, command + f" --repeats {args.repeats}")


if __name__ == "__main__":
    main()
