"""Compare fo-fo, hosl and zo-zo on one scenario, side by side in one process.

    python -m benchmarks.compare_modes sim_configs/sst2_minilm_full.toml --out runs/modes_minilm \
        [--set key=value ...] [--mode-set MODE:key=value ...] [--modes fo-fo,hosl,zo-zo]

Prints a markdown table (dev/test accuracy, client peak memory, bytes per step, seconds per step)
including the untrained model (round 0), and writes it next to each mode's results.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.report import write_report
from fl_app.config import make_config, parse_overrides, read_scenario
from fl_app.train import run


def table(rows: list[dict]) -> str:
    head = (
        "| mode | dev acc | test acc | client peak MiB | up KiB/step | down KiB/step | s/step |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['dev']:.4f} | {r['test'] if r['test'] is None else format(r['test'], '.4f')} "
            f"| {r['mem']} | {r['up']} | {r['down']} | {r['sps']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument(
        "--mode-set",
        action="append",
        default=[],
        metavar="MODE:KEY=VALUE",
        help="override a key for one mode only (e.g. learning rates that differ by optimiser order)",
    )
    parser.add_argument("--modes", default="fo-fo,hosl,zo-zo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = {**read_scenario(args.scenario), **parse_overrides(args.set)}
    rows = []
    per_mode: dict[str, list[str]] = {}
    for item in args.mode_set:
        mode, _, pair = item.partition(":")
        per_mode.setdefault(mode, []).append(pair)
    for mode in args.modes.split(","):
        config = make_config({**base, **parse_overrides(per_mode.get(mode, [])), "mode": mode})
        results = run(config, Path(args.out) / mode)
        untrained = [e for e in results["eval"]["history"] if e["round"] == 0]  # eval-untrained = true
        if not rows and untrained:
            untrained = untrained[0]
            rows.append(
                {
                    "mode": "untrained",
                    "dev": untrained["accuracy"],
                    "test": None,
                    "mem": "-",
                    "up": "-",
                    "down": "-",
                    "sps": "-",
                }
            )
        test = (results["eval"].get("test") or {}).get("accuracy")
        rows.append(
            {
                "mode": mode,
                "dev": results["eval"]["accuracy"],
                "test": test,
                "mem": f"{results['client']['peak_memory_bytes'] / 2**20:.1f}",
                "up": f"{results['comm']['train_bytes_up_per_step'] / 1024:.0f}",
                "down": f"{results['comm']['train_bytes_down_per_step'] / 1024:.1f}",
                "sps": f"{results['client']['seconds_per_step']:.2f}",
            }
        )
    text = table(rows)
    print(text)
    write_report(Path(args.out, "table"), text, rows)


if __name__ == "__main__":
    main()
