"""Getting a client's state ready: loading its weights against replaying its own ZO steps.

    python -m benchmarks.client_state [--scenario sim_configs/quick_minilm.toml] [--steps 4] [--repeats 3]

One client trains ``--steps`` real HOSL steps in-process (local runner) with ``client-state = seeds``
and once more with ``weights``; its state is then read back from the client store as a node serving
it next would, side by side in one process: the weights file loaded and restored into the bottom,
and the starting bottom rebuilt with 1x, 4x and 16x the client's steps replayed (its real steps,
repeated: each costs one update pass whatever its values). Prints and writes each case's seconds,
its ratio to loading, the per-step replay cost, the bytes on disk and the break-even step count
(``client-state`` picks per run: seeds below it, weights above). Writes ``docs/results/client_state.md``
/ ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_report
from fl_app.client_session import make_client, replay_own
from fl_app.client_store import load_client_state
from fl_app.config import make_config, read_scenario
from fl_app.records import ClientState, History
from fl_app.train import run

ROOT = Path(__file__).resolve().parents[1]
MULTIPLES = (1, 4, 16)


def _trained(scenario: dict[str, Any], kept: str, steps: int, out: Path) -> tuple[Path, Any]:
    """Train one client ``steps`` steps keeping its state as ``kept``: (its client store, config)."""
    config = make_config(
        {
            **scenario,
            "num-clients": 1,
            "num-rounds": 1,
            "local-steps": steps,
            "client-state": kept,
            "eval-test": False,
            "eval-untrained": False,
        }
    )
    run(config, out)
    (store,) = out.glob("clients/*")
    return store, config


def _ready_seconds(config: Any, store: Path, state: ClientState | None) -> float:
    """Seconds to get the client ready: its weights read from the store and restored (``state`` None),
    or the starting bottom rebuilt and ``state``'s steps replayed."""
    started = time.perf_counter()
    if state is None:
        make_client(config, 0, load_client_state(store, 0, 1))
    else:
        client, _ = make_client(config, 0, state)
        replay_own(client, state.updates)
    return time.perf_counter() - started


def _repeated(updates: History, times: int) -> History:
    more = History()
    for _ in range(times):
        more.extend(1, 0, updates.lrs, updates.seeds, updates.grads, updates.rows)
    return more


def measure(scenario: dict[str, Any], steps: int, repeats: int) -> dict[str, Any]:
    """Seconds per case (each the median of ``repeats``, the cases interleaved), bytes on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        weights_store, weights_config = _trained(scenario, "weights", steps, Path(tmp) / "weights")
        seeds_store, seeds_config = _trained(scenario, "seeds", steps, Path(tmp) / "seeds")
        kept = load_client_state(seeds_store, 0, 1)
        cases = {"load weights": (weights_config, weights_store, None)}
        for times in MULTIPLES:
            state = ClientState(steps=kept.steps * times, updates=_repeated(kept.updates, times))
            cases[f"replay {steps * times} steps"] = (seeds_config, seeds_store, state)
        _ready_seconds(weights_config, weights_store, None)  # warm: the bottom and data are loaded once
        times_by_case: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, (config, store, state) in cases.items():
                times_by_case[name].append(_ready_seconds(config, store, state))
        sizes = {
            kind: sum(p.stat().st_size for p in store.rglob("*.pt"))
            for kind, store in (("weights", weights_store), ("seeds", seeds_store))
        }
    seconds = {name: statistics.median(values) for name, values in times_by_case.items()}
    load = seconds["load weights"]
    longest = steps * MULTIPLES[-1]
    per_step = (seconds[f"replay {longest} steps"] - seconds[f"replay {steps} steps"]) / (longest - steps)
    base = seconds[f"replay {steps} steps"] - steps * per_step  # the starting bottom, before any step
    return {
        "steps": steps,
        "seconds": seconds,
        "ratio_to_load": {name: s / load for name, s in seconds.items()},
        "replay_seconds_per_step": per_step,
        "bytes": sizes,
        "break_even_steps": max(0.0, (load - base) / per_step) if per_step > 0 else None,
    }


def report(found: dict[str, Any], scenario: str) -> str:
    rows = "\n".join(
        f"| {name} | {s:.3f} | {found['ratio_to_load'][name]:.2f} |" for name, s in found["seconds"].items()
    )
    even = found["break_even_steps"]
    verdict = (
        f"Break-even: about {even:.0f} steps per client (seeds are quicker to get ready below it, weights above; "
        "seeds are always smaller)."
        if even is not None
        else "Replay cost did not grow with the steps here."
    )
    return (
        f"# Client state: load the weights, or replay the steps\n\n`{scenario}`, one client, {found['steps']} real "
        "HOSL steps, read back from the client store as the next node serving it would (medians, cases "
        f"interleaved in one process).\n\n| case | seconds | / load |\n|---|---|---|\n{rows}\n\n"
        f"Replay costs {1000 * found['replay_seconds_per_step']:.1f} ms per step; on disk the state is "
        f"{found['bytes']['weights'] / 2**20:.1f} MiB as weights and {found['bytes']['seeds'] / 2**10:.1f} KiB as "
        f"seeds. {verdict}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="sim_configs/quick_minilm.toml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs/results/client_state"))
    args = parser.parse_args(argv)
    found = measure(read_scenario(args.scenario), args.steps, args.repeats)
    text = report(found, args.scenario)
    print(text)
    command = f"python -m benchmarks.client_state --scenario {args.scenario} --steps {args.steps}"
    write_report(args.out, text, found, command)


if __name__ == "__main__":
    main()
