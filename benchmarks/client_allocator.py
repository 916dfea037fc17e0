"""The client process's allocator: peak memory and step time of allocator settings, side by side.

    python -m benchmarks.client_allocator [--repeats 2] [--setting NAME=ENV ...]

Each setting is an environment for a fresh client process (``GLIBC_TUNABLES``, ``LD_PRELOAD``);
every case (``benchmarks.client_memory``'s matrix cells: a client built the ClientApp's way, stepped
against a server that answers at once) runs under every setting, settings alternating within each
repeat so a loaded moment hits them alike. Per setting: the process peak (VmHWM) of an
inference-only and a hosl client at the same shape and their ratio, and the hosl step's mean time
(first step left out) as a ratio to the first setting's.
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.client_memory import MATRIX_MODELS, MATRIX_MODES, run_in_subprocess
from benchmarks.report import ROOT, write_report
from fl_app.allocator import DEFAULT, process_env

# per model: batch x length, steps per process (the first is not timed), timed processes per setting
CASES = {"MiniLM full": (16, 64, 10, 4), "SmolLM2 full": (16, 256, 4, 2)}


def default_settings() -> dict[str, dict[str, str]]:
    """glibc's malloc (what clients ran with before), a fixed mmap threshold, and the shipped default."""
    return {
        "glibc (dynamic threshold, trim per step)": {},
        "glibc mmap_threshold 1 MiB": {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"},
        f"{DEFAULT} (shipped)": process_env(DEFAULT),
    }


def run_cell(model: str, mode: str, env: dict[str, str], steps: int) -> dict:
    """One matrix cell in a fresh process under ``env``."""
    rows, length = CASES[model][:2]
    spec = {"model": MATRIX_MODELS[model], "mode": MATRIX_MODES[mode], "rows": rows, "length": length, "steps": steps}
    return run_in_subprocess(["--matrix-case", json.dumps(spec)], env)


def parse_env(text: str) -> dict[str, str]:
    """``"A=1 B=2"`` -> ``{"A": "1", "B": "2"}``."""
    env = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--setting: {item!r} is not VAR=VALUE")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=ENV", help="'name=VAR=VALUE ...'")
    parser.add_argument("--out", default="docs/results/client_allocator")
    args = parser.parse_args(argv)
    if args.setting:
        settings = {name: parse_env(env) for name, env in (s.split("=", 1) for s in args.setting)}
    else:
        settings = default_settings()
    cells: dict[tuple[str, str], dict] = {}
    for model in args.models:
        steps, repeats = CASES[model][2:]
        for name, env in settings.items():
            cells[model, name] = {"inference": run_cell(model, "inference", env, steps), "hosl": []}
        for _ in range(repeats):
            for name, env in settings.items():
                cell = run_cell(model, "hosl", env, steps)
                cells[model, name]["hosl"].append(cell)
                print(
                    f"{model} {name}: step {statistics.mean(cell['step_seconds'][1:]):.3f} s, "
                    f"peak {cell['peak_hwm']:.0f} MiB",
                    flush=True,
                )
    rows = []
    for model in args.models:
        base = None
        for name in settings:
            cell = cells[model, name]
            step = statistics.median(statistics.mean(c["step_seconds"][1:]) for c in cell["hosl"])
            base = base or step
            peak = max(c["peak_hwm"] for c in cell["hosl"])
            inference = cell["inference"]["peak_hwm"]
            torch_only = cell["inference"]["torch"]
            rows.append(
                {
                    "model": model,
                    "shape": "x".join(map(str, CASES[model][:2])),
                    "setting": name,
                    "env": settings[name],
                    "inference_peak": inference,
                    "hosl_peak": peak,
                    "torch": torch_only,
                    "step_seconds": step,
                    "steps": [c["step_seconds"] for c in cell["hosl"]],
                }
            )
            rows[-1]["ratio"] = peak / inference
            rows[-1]["ratio_above_torch"] = (peak - torch_only) / (inference - torch_only)
            rows[-1]["step_ratio"] = step / base
    lines = [
        "# Client allocator settings: peak memory and step time",
        "",
        "`python -m benchmarks.client_allocator`",
        "",
        "Process peak (VmHWM, MiB) of an inference-only client (frozen bottom) and a hosl client at the same "
        "shape, against a server that answers at once; hosl step time: mean of a process's steps after its "
        "first, median over processes, settings alternating; ratio to the first setting. "
        + "; ".join(f"{m}: {s} steps, {r} processes" for m, (_, _, s, r) in CASES.items())
        + ".",
        "",
        "| model | batch x length | setting | inference peak | hosl peak | hosl / inference | above torch | "
        "hosl step s | step / first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['setting']} | {r['inference_peak']:.0f} | {r['hosl_peak']:.0f} "
            f"| {r['ratio']:.2f}x | {r['ratio_above_torch']:.2f}x | {r['step_seconds']:.3f} | {r['step_ratio']:.3f} |"
        )
    write_report(ROOT / args.out, "\n".join(lines), {"settings": settings, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
