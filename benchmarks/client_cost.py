"""What a ZO client step costs against its floor, and what the old code path cost, side by side.

    python -m benchmarks.client_cost [--scenario sim_configs/sst2_minilm_full.toml] [--steps 6] [--repeats 3]
                                     [--baseline 5a52b98] [--out docs/results/client_cost]

Both code trees come from git (``--baseline`` and ``--candidate``, default HEAD). For each variant it
times HOSL steps of one client over the in-process link in a fresh process,
alternating the variants ``--repeats`` times (the machine is shared: only ratios measured in one
run mean anything). Variants: the code at ``--baseline`` (MeZO's Gaussian directions over every
row, each direction drawn four times per query, the server scoring after the last part: the old
code path with the old settings) and this tree with each direction kind and embedding-row mode.

Per variant it reports the step split into direction generation (thread-seconds), the rest of the
perturb / update passes, bottom forwards, waiting for the server, and other; the floor ((2Q + 1)
no-grad forwards of the bottom on the same batch, timed alone in the same process); and the
client's own step with a server that answers at once (``client-only``), which is what an edge
device pays when the server runs elsewhere. Also ``hosl-feedback = gradient``, Q = 4 and fo-fo.
Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import write_report

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "5a52b98"  # the last commit before directions, row restriction, fused passes and streamed scoring


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``spec['steps']`` HOSL steps with the ``fl_app`` on ``sys.path`` (old or new tree)."""
    import torch

    import fl_app
    from fl_app.batches import BatchStream
    from fl_app.config import make_config, read_scenario
    from fl_app.local_transport import InProcessLink
    from fl_app.protocol import StepReply
    from fl_app.scenario import build_client, build_server, load_split, load_task_data

    config = make_config({**read_scenario(spec["scenario"]), **spec["overrides"]})
    torch.manual_seed(0)
    loaded, bottom, top = load_split(config)
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    client = build_client(config, bottom, 0)
    del bottom
    stream = BatchStream(data.encoder, data.client_examples(0), config["batch-size"], config.client_seed(0))
    q = config["zo-queries"]
    timers = {"generate": 0.0, "passes": 0.0, "forward": 0.0, "wait": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - started

        return wrapper

    import fl_app.zo as zo_module

    if client.zo is None:  # fo-fo: no directions, one forward and a backward
        pass
    elif hasattr(zo_module, "direction_chunk"):
        zo_module.direction_chunk = timed("generate", zo_module.direction_chunk)
        client.zo.apply = timed("passes", client.zo.apply)
    else:  # the old estimator: every pass is perturb (or update), generation inside it
        client.zo.perturb = timed("passes", client.zo.perturb)
        client.zo.update = timed("passes", client.zo.update)
    client._forward = timed("forward", client._forward)
    from fl_app.protocol import StepRequest

    scored = client.zo is not None and config.get("hosl-feedback", "losses") == "losses"  # the server sends 2Q losses

    class EchoLink:
        """A server that answers at once with plausible losses (or a plausible cut gradient): the
        client's own cost only."""

        def __init__(self):
            self.bytes_up = self.bytes_down = 0
            self.grad_shape = None  # set per batch when the client expects a cut gradient

        def send(self, payload):
            self.bytes_up += len(payload)

        def exchange(self, payload):
            if self.grad_shape is not None:
                return StepReply(clean_loss=0.69, grad=1e-3 * torch.randn(self.grad_shape)).to_bytes()
            losses = 0.69 + 0.01 * torch.randn(2 * q, dtype=torch.float64)
            return StepReply(clean_loss=0.69, perturbed_losses=losses).to_bytes()

    def run(link, steps, first):
        for key in timers:
            timers[key] = 0.0
        if not hasattr(link, "untimed_exchange"):  # wrap once: the link is run twice (warm-up, timed)
            link.untimed_exchange = link.exchange
            link.exchange = timed("wait", link.untimed_exchange)
        times = []
        for step in range(first, first + steps):
            batch = stream.batch(step)
            if isinstance(link, EchoLink) and not scored:
                link.grad_shape = (*batch["input_ids"].shape, server.top.hidden_size)
            started = time.perf_counter()
            client.train_step(batch, link)
            times.append(time.perf_counter() - started)
        return {
            "step": statistics.median(times),
            "mean_step": statistics.mean(times),
            **{k: v / steps for k, v in timers.items()},
        }

    link = InProcessLink(server.handle_bytes)
    run(link, 1, 0)  # warm-up
    full = run(link, spec["steps"], 1)
    link.close()
    alone = run(EchoLink(), spec["steps"], 1)  # the same batches (lengths vary with padding)
    batches = [stream.batch(step) for step in range(1, 1 + spec["steps"])]
    with torch.no_grad():
        floors = []
        for _ in range(3 if client.zo is not None else 0):  # (2Q + 1) forwards of each step's batch, per step
            started = time.perf_counter()
            for batch in batches:
                for _ in range(2 * q + 1):
                    client.bottom(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            floors.append((time.perf_counter() - started) / len(batches))
        batch = batches[0]
        clean = client._forward(batch)
    labels = {k: batch[k] for k in ("labels", "score_ids", "target_ids") if k in batch}
    if scored:  # the server's own work per step: score 2Q activations, one FO step
        request = StepRequest(
            kind="zo",
            clean=clean,
            attention_mask=batch["attention_mask"],
            perturbed=clean.unsqueeze(0).repeat(2 * q, 1, 1, 1),
            **labels,
        )
    else:  # one FO step that returns the cut gradient
        request = StepRequest(kind="fo", clean=clean, attention_mask=batch["attention_mask"], **labels)
    server_floor = []
    for _ in range(3):
        started = time.perf_counter()
        server.handle(request)
        server_floor.append(time.perf_counter() - started)
    return {
        "fl_app": str(Path(fl_app.__file__).parent),
        "full": full,
        "client_only": alone,
        "floor": statistics.median(floors) if floors else None,
        "server_floor": statistics.median(server_floor),
        "queries": q if client.zo is not None else None,
        "trainable": sum(p.numel() for p in client.params),
    }


def _run_worker(spec: dict[str, Any], tree: Path, script: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker for {spec['name']} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["fl_app"]).resolve() != (tree / "fl_app").resolve():
        raise RuntimeError(f"worker imported {result['fl_app']}, expected the tree {tree}")
    return result


def _git_tree(commit: str, into: Path) -> Path:
    """The files of ``commit`` (both sides are measured from git, so editing the checkout mid-run is safe)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(path):
        values = [r[path[0]][path[1]] if len(path) == 2 else r[path[0]] for r in runs]
        return None if None in values else statistics.median(values)

    row = {
        "variant": name,
        "queries": runs[0]["queries"],
        "step": med(("full", "step")),
        "client_only": med(("client_only", "step")),
        "floor": med(("floor",)),
        "server_floor": med(("server_floor",)),
        "generate": med(("client_only", "generate")),
        "passes": med(("client_only", "passes")),
        "forward": med(("client_only", "forward")),
        "wait": med(("full", "wait")),
        "runs": runs,
    }
    # the components are means over the steps, so the rest is taken from the mean step, run by run
    row["other"] = statistics.median(
        r["client_only"].get("mean_step", r["client_only"]["step"])
        - r["client_only"]["passes"]
        - r["client_only"]["forward"]
        - r["client_only"]["wait"]
        for r in runs
    )
    return row


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}x"


def _markdown(rows: list[dict[str, Any]], args) -> str:
    lines = [
        f"# ZO client step cost ({Path(args.scenario).name}, {args.steps} steps x {args.repeats} "
        "alternating repeats, medians)",
        "",
        "`python -m benchmarks.client_cost " + " ".join(sys.argv[1:]) + "`",
        "",
        "| variant | Q | whole step s | speed-up vs old (same Q) | client-only step s | floor s "
        "| client-only / floor | generation s | passes s (incl. generation) | forwards s | other s "
        "| wait for server s (whole step) | server floor s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        old = rows[0] if r["versus"] is None else next(o for o in rows if o["variant"] == r["versus"])
        floor = "n/a" if r["floor"] is None else f"{r['floor']:.3f}"
        lines.append(
            f"| {r['variant']} | {r['queries'] or '-'} | {r['step']:.3f} | {_ratio(old['step'], r['step'])} "
            f"| {r['client_only']:.3f} | {floor} "
            f"| {_ratio(r['client_only'], r['floor'])} | {r['generate']:.3f} | {r['passes']:.3f} "
            f"| {r['forward']:.3f} | {r['other']:.3f} | {r['wait']:.3f} | {r['server_floor']:.3f} |"
        )
    lines += [
        "",
        "Whole step: client and in-process server share the machine's cores. Client-only: the server "
        "answers at once (what the edge device itself spends). Floor: (2Q + 1) no-grad forwards of the "
        "bottom on each step's batch, timed alone. Server floor: the server's own work per step, timed "
        "alone (with losses feedback: score 2Q activations and one FO step; with gradient feedback and "
        "in fo-fo: one FO step returning the cut gradient). Generation is thread-seconds (Gaussian chunks "
        "are drawn on two threads); the old code's generation is inside its passes. Other: the rest of "
        "the client-only step (serialising frames, the client's bookkeeping; in fo-fo its backward "
        "and optimiser step), per run from the mean step (the step columns are medians; runs without "
        "the mean can show a small negative rest). The fo-fo row's speed-up is against the old HOSL "
        "step at Q = 10.",
    ]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: whole step beside the server's floor. Right: the client-only step split, floor marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        r["variant"] if "Q =" in r["variant"] or not r["queries"] else f"{r['variant']}, Q = {r['queries']}"
        for r in rows
    ]
    y = list(range(len(rows)))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.55 * len(rows) + 1.8), sharey=True)
    left.barh([v + 0.2 for v in y], [r["step"] for r in rows], height=0.4, label="whole step (in-process server)")
    left.barh([v - 0.2 for v in y], [r["server_floor"] for r in rows], height=0.4, label="server floor")
    left.set_yticks(y, names)
    left.set_xlabel("seconds per step")
    left.legend(loc="lower right")
    starts = [0.0] * len(rows)
    generation = [min(r["generate"], r["passes"]) for r in rows]  # thread-seconds: up to the passes' wall time
    parts = {
        "direction generation (within the passes)": generation,
        "perturb / update passes": [r["passes"] - g for r, g in zip(rows, generation)],
        "forwards": [r["forward"] for r in rows],
        "other": [max(0.0, r["other"]) for r in rows],
    }
    for label, widths in parts.items():
        right.barh(y, widths, left=starts, height=0.6, label=label)
        starts = [s + w for s, w in zip(starts, widths)]
    floors = [(v, r["floor"]) for v, r in zip(y, rows) if r["floor"] is not None]
    right.scatter(
        [f for _, f in floors],
        [v for v, _ in floors],
        marker="|",
        s=400,
        color="black",
        label="floor: (2Q + 1) forwards",
        zorder=3,
    )
    right.set_xlabel("client-only seconds per step")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DEFAULT = {"zo-directions": "rademacher", "zo-embedding-rows": "batch"}
VARIANTS = {  # name: (tree, overrides, the old-code row its speed-up is measured against)
    "old code (gaussian, all rows)": ("baseline", {}, None),
    "gaussian, all rows": ("tree", {"zo-directions": "gaussian", "zo-embedding-rows": "all"}, None),
    "gaussian, batch rows": ("tree", {"zo-directions": "gaussian", "zo-embedding-rows": "batch"}, None),
    "rademacher, all rows": ("tree", {"zo-directions": "rademacher", "zo-embedding-rows": "all"}, None),
    "rademacher, batch rows (default)": ("tree", DEFAULT, None),
    "default + hosl-feedback = gradient": ("tree", {**DEFAULT, "hosl-feedback": "gradient"}, None),
    "old code, Q = 4": ("baseline", {"zo-queries": 4}, "old code, Q = 4"),
    "default, Q = 4": ("tree", {**DEFAULT, "zo-queries": 4}, "old code, Q = 4"),
    "default + gradient feedback, Q = 4": (
        "tree",
        {**DEFAULT, "zo-queries": 4, "hosl-feedback": "gradient"},
        "old code, Q = 4",
    ),
    "fo-fo (client SGD)": ("tree", {"mode": "fo-fo"}, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="sim_configs/sst2_minilm_full.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--candidate", default="HEAD", help="the revision measured against the baseline")
    parser.add_argument("--out", default="docs/results/client_cost")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    shared = dict(pair.split("=", 1) for pair in args.set)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "old").mkdir()
        (Path(tmp) / "new").mkdir()
        trees = {
            "baseline": _git_tree(args.baseline, Path(tmp) / "old"),
            "tree": _git_tree(args.candidate, Path(tmp) / "new"),
        }
        for repeat in range(args.repeats):
            for name, (tree, overrides, _) in VARIANTS.items():
                spec = {
                    "name": name,
                    "scenario": str(trees["tree"] / args.scenario),
                    "steps": args.steps,
                    "overrides": {**shared, **overrides},
                }
                runs[name].append(_run_worker(spec, trees[tree], trees["tree"] / "benchmarks" / "client_cost.py"))
                print(f"repeat {repeat + 1}: {name}: step {runs[name][-1]['full']['step']:.3f} s", flush=True)
    rows = [{**_summary(name, result), "versus": VARIANTS[name][2]} for name, result in runs.items()]
    text = _markdown(rows, args)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, text, rows)
    _plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
