"""What a client step costs against its floor, per ZO setting, side by side.

    python -m benchmarks.client_cost [--scenario sim_configs/sst2_minilm_full.toml] [--steps 6] [--repeats 3]
                                     [--set key=value] [--out docs/results/client_cost]

For each variant it times HOSL steps of one client over the in-process link, each variant in a fresh
process, alternating the variants ``--repeats`` times (the machine is shared: only ratios measured
in one run mean anything). Variants: MeZO's settings (Gaussian directions over every embedding
row), each direction kind and embedding-row mode, gradient feedback, Q = 4, and fo-fo; speed-ups are
against MeZO's settings at the same Q.

Per variant it reports the step split, as :mod:`fl_app.step_timing` records it, into direction
generation (thread-seconds), the rest of the perturb / update passes, bottom forwards, waiting for
the server, and other; the floor ((2Q + 1) no-grad forwards of the bottom on the same batches, timed
alone in the same process); and the client's own step with a server that answers at once
(``client-only``), which is what an edge device pays when the server runs elsewhere. Writes
``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import write_report
from fl_app import step_timing
from fl_app.batches import BatchStream
from fl_app.client_party import Link, SplitClient
from fl_app.config import make_config, read_scenario
from fl_app.local_transport import InProcessLink
from fl_app.protocol import StepReply, StepRequest
from fl_app.scenario import build_client, build_server, load_split, load_task_data

ROOT = Path(__file__).resolve().parents[1]


class TimedLink:
    """A link whose ``exchange`` calls (the client waiting for the server) are timed."""

    def __init__(self, link: Any) -> None:
        self.link, self.wait = link, 0.0

    def send(self, payload: bytes) -> None:
        self.link.send(payload)

    def exchange(self, payload: bytes) -> bytes:
        started = time.perf_counter()
        try:
            return self.link.exchange(payload)
        finally:
            self.wait += time.perf_counter() - started

    @property
    def bytes_up(self) -> int:
        return self.link.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.link.bytes_down


class EchoLink:
    """A server that answers at once with plausible losses, or (``gradient``) a plausible cut gradient
    of the request's activations' shape: the client's own cost only."""

    def __init__(self, queries: int, gradient: bool, per_query: int = 2) -> None:
        self.queries, self.gradient, self.bytes_up, self.bytes_down = queries, gradient, 0, 0
        self.per_query = per_query  # losses per direction: 2 two-point, 1 one-sided

    def send(self, payload: bytes) -> None:
        self.bytes_up += len(payload)

    def exchange(self, payload: bytes) -> bytes:
        self.bytes_up += len(payload)
        if self.gradient:
            shape = StepRequest.from_bytes(payload).clean.shape
            return StepReply(clean_loss=0.69, grad=1e-3 * torch.randn(shape)).to_bytes()
        losses = 0.69 + 0.01 * torch.randn(self.per_query * self.queries, dtype=torch.float64)
        return StepReply(clean_loss=0.69, perturbed_losses=losses).to_bytes()


def timed_steps(client: SplitClient, batches: list[dict[str, torch.Tensor]], link: Link) -> dict[str, float]:
    """Train on ``batches`` over ``link``: the median and mean step, and per step the seconds of each
    :mod:`fl_app.step_timing` section and of waiting for the server."""
    timed = TimedLink(link)
    with step_timing.recording() as sections:
        steps = [client.train_step(batch, timed).seconds for batch in batches]
    per_step = {k: sections.get(k, 0.0) / len(batches) for k in ("generate", "passes", "forward")}
    return {
        "step": statistics.median(steps),
        "mean_step": statistics.mean(steps),
        **per_step,
        "wait": timed.wait / len(batches),
    }


def _floor(client: SplitClient, batches: list[dict[str, torch.Tensor]], queries: int, per_query: int = 2) -> float:
    """(per_query x Q + 1) no-grad forwards of the bottom on each batch (2Q + 1 for two-point estimates),
    seconds per batch (median of 3)."""
    floors = []
    for _ in range(3):
        started = time.perf_counter()
        for batch in batches:
            for _ in range(per_query * queries + 1):
                client.cut_activations(batch)
        floors.append((time.perf_counter() - started) / len(batches))
    return statistics.median(floors)


def _server_floor(
    server: Any, client: SplitClient, batch: dict[str, torch.Tensor], queries: int | None, per_query: int = 2
) -> float:
    """The server's own work per step, timed alone (median of 3): with losses feedback it scores
    per_query x Q activations (2Q two-point) and takes one FO step; otherwise one FO step that returns
    the cut gradient."""
    clean = client.cut_activations(batch)
    labels = {k: batch[k] for k in ("labels", "score_ids", "target_ids") if k in batch}
    if queries:
        perturbed = clean.unsqueeze(0).repeat(per_query * queries, 1, 1, 1)
        request = StepRequest(
            kind="zo", clean=clean, attention_mask=batch["attention_mask"], perturbed=perturbed, **labels
        )
    else:
        request = StepRequest(kind="fo", clean=clean, attention_mask=batch["attention_mask"], **labels)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        server.handle(request)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_variant(scenario: str, overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """Time ``steps`` client steps of the scenario with ``overrides``: with the in-process server
    (``full``), with a server that answers at once (``client_only``), and their floors."""
    config = make_config({**read_scenario(scenario), **overrides})
    torch.manual_seed(0)
    loaded, bottom, top = load_split(config)
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    client = build_client(config, bottom, 0)
    del bottom
    stream = BatchStream(data.encoder, data.client_examples(0), config["batch-size"], config.client_seed(0))
    batches = [stream.batch(step) for step in range(steps + 1)]
    zo = client.zo is not None
    queries = config.zo.queries if zo else None
    per_query = config.zo.per_query
    scored = zo and config.zo.hosl_feedback == "losses"  # the server sends back per_query x Q losses
    link = InProcessLink(server.handle_bytes)
    timed_steps(client, batches[:1], link)  # warm-up
    counts = {"forwards": 0, "scored": 0}
    hook = client.bottom.register_forward_hook(lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1))
    score_jobs = server.score_jobs

    def counted(jobs):
        counts["scored"] += sum(job.perturbed.shape[0] for job in jobs)
        return score_jobs(jobs)

    server.score_jobs = counted
    up, down = link.bytes_up, link.bytes_down
    full = timed_steps(client, batches[1:], link)
    link.close()
    hook.remove()
    server.score_jobs = score_jobs
    measured = len(batches) - 1
    alone = timed_steps(client, batches[1:], EchoLink(queries or 0, gradient=not scored, per_query=per_query))
    return {
        "full": full,
        "client_only": alone,
        "floor": _floor(client, batches[1:], queries, per_query) if zo else None,
        "server_floor": _server_floor(server, client, batches[1], queries if scored else None, per_query),
        "queries": queries,
        "trainable": sum(p.numel() for p in client.params),
        "per_step": {  # counted over the whole steps
            "client_forwards": counts["forwards"] / measured,
            "server_scorings": counts["scored"] / measured,
            "bytes_up": (link.bytes_up - up) / measured,
            "bytes_down": (link.bytes_down - down) / measured,
        },
    }


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure_variant`` in a fresh process (each variant starts from the same state)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.client_cost", "--worker", json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker for {spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
        r["client_only"]["mean_step"]
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
        "| variant | Q | whole step s | speed-up vs MeZO's settings (same Q) | client-only step s | floor s "
        "| client-only / floor | generation s | passes s (incl. generation) | forwards s | other s "
        "| wait for server s (whole step) | server floor s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        old = next(o for o in rows if o["variant"] == r["versus"])
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
        "are drawn on two threads). Other: the rest of the client-only step (serialising frames, the "
        "client's bookkeeping; in fo-fo its backward and optimiser step), per run from the mean step. "
        "The fo-fo row's speed-up is against MeZO's settings at the scenario's Q.",
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


MEZO = {"zo-directions": "gaussian", "zo-embedding-rows": "all"}  # MeZO's directions, over every row
MEZO_ROW = "MeZO's settings (gaussian, all rows)"
DEFAULT = {"zo-directions": "rademacher", "zo-embedding-rows": "batch"}
VARIANTS = {  # name: (overrides, the row its speed-up is measured against)
    MEZO_ROW: (MEZO, MEZO_ROW),
    "gaussian, batch rows": ({**MEZO, "zo-embedding-rows": "batch"}, MEZO_ROW),
    "rademacher, all rows": ({**DEFAULT, "zo-embedding-rows": "all"}, MEZO_ROW),
    "rademacher, batch rows (default)": (DEFAULT, MEZO_ROW),
    "default + hosl-feedback = gradient": (
        {**DEFAULT, "hosl-feedback": "gradient"},
        MEZO_ROW,
    ),
    "MeZO's settings, Q = 4": ({**MEZO, "zo-queries": 4}, "MeZO's settings, Q = 4"),
    "default, Q = 4": ({**DEFAULT, "zo-queries": 4}, "MeZO's settings, Q = 4"),
    "default + gradient feedback, Q = 4": (
        {**DEFAULT, "zo-queries": 4, "hosl-feedback": "gradient"},
        "MeZO's settings, Q = 4",
    ),
    "fo-fo (client SGD)": ({"mode": "fo-fo"}, MEZO_ROW),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default="sim_configs/sst2_minilm_full.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/client_cost")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure_variant(spec["scenario"], spec["overrides"], spec["steps"])))
        return
    shared = dict(pair.split("=", 1) for pair in args.set)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, (overrides, _) in VARIANTS.items():
            spec = {"name": name, "scenario": str(Path(args.scenario).resolve()), "steps": args.steps}
            runs[name].append(_run_worker({**spec, "overrides": {**shared, **overrides}}))
            print(f"repeat {repeat + 1}: {name}: step {runs[name][-1]['full']['step']:.3f} s", flush=True)
    rows = [{**_summary(name, result), "versus": VARIANTS[name][1]} for name, result in runs.items()]
    text = _markdown(rows, args)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, text, rows, f"python -m benchmarks.client_cost --steps {args.steps} --repeats {args.repeats}")
    _plot(rows, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
