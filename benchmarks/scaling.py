"""How cost and accuracy change with the number of clients, under `flwr run` simulation.

    python -m benchmarks.scaling [--size quick|full] [--out runs/scaling] [--docs docs/results]

Each point of the sweep is one `flwr run` (its own FLWR_HOME and SuperLink) of a scenario with
one more setting changed: the number of clients, the share of them per round (``fraction-train``),
the sessions open at once (``max-concurrent-clients``), the partition (IID or Dirichlet alpha) and
the bottoms (personal or synced). For each point it records the wall time per round, the server's
throughput (client steps per second of round), the peak resident memory of the server process
(the ServerApp and Flower's simulation engine share it) and of the ClientApp actors, the client's
own step peak, the bytes per round and the dev accuracy per round and on test. It writes
``<docs>/scaling.md`` / ``.json`` and ``scaling_cost.png`` / ``scaling_accuracy.png``.

``quick`` (about 10 minutes on 2 cores) runs the tiny model only; ``full`` adds the large client
counts, the fraction and concurrency sweeps and MiniLM (its accuracy is the one that means
anything: the tiny model is randomly initialised). ``virtual`` serves many clients from few nodes
(``virtual-clients``): 10,000 tiny clients with 1,000 per round on 10, 20 and 50 nodes (the
clients-per-node axis), and 100,000 tiny clients, 1 % per round, on 20 nodes, their states kept as
seeds. ``minilm-1000`` gives 1,000 MiniLM clients personal bottoms (5 % per round, 2 steps each, on 4
nodes) with each client state representation (weights, seeds), beside the 1-client run, and
records each client's state bytes.
With ``--profile`` (needs ``py-spy``) the largest tiny point is also sampled, and the functions
the server process and a ClientApp actor spend their time in are written down: where a curve
bends, that says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.flower_sim import ROOT, home_pids, run_simulation
from benchmarks.report import write_report

TINY, MINILM = "sim_configs/tiny_100_clients.toml", "sim_configs/quick_minilm.toml"


@dataclass(frozen=True)
class Point:
    """One run of the sweep: a scenario and the settings changed from it."""

    scenario: str
    clients: int
    fraction: float = 1.0
    concurrency: int = 4  # max-concurrent-clients: above the 2 actors, so one is always queued
    alpha: float = 0.0  # 0: IID; otherwise a Dirichlet partition with this alpha
    bottoms: str = "personal"
    rounds: int = 2
    nodes: int = 0  # 0: one SuperNode per client; else this many, each serving any client (virtual-clients)
    client_state: str = "weights"  # or seeds (a ZO bottom kept as its own steps)
    steps: int = 0  # local-steps per session; 0: the scenario's

    @property
    def model(self) -> str:
        return "MiniLM" if self.scenario == MINILM else "tiny"

    def overrides(self, out: Path) -> list[str]:
        per_client, scheme = self.per_client, self.partition
        draw = scheme == "draw"
        return [
            f"out-dir={out}",
            f"num-clients={self.clients}",
            f"n-train={min(SST2_TRAIN, max(per_client * self.clients, 16))}",
            f"num-rounds={self.rounds}",
            f"fraction-train={self.fraction}",
            f"max-concurrent-clients={self.concurrency}",
            f"partition={scheme}",
            f"min-partition-size={per_client if draw else 1}",
            f"dirichlet-alpha={self.alpha or 0.5}",
            f"bottoms={self.bottoms}",
            "eval-untrained=false",
            f"virtual-clients={str(bool(self.nodes)).lower()}",
            f"client-state={self.client_state}",
        ] + ([f"local-steps={self.steps}"] if self.steps else [])

    def key(self) -> str:
        parts = [self.model, f"c{self.clients}", f"f{self.fraction}", f"w{self.concurrency}"]
        parts += [f"a{self.alpha}" if self.alpha else "iid", self.bottoms, f"r{self.rounds}"]
        parts += [f"n{self.nodes}"] if self.nodes else []
        parts += [f"s{self.steps}"] if self.steps else []
        return "-".join(parts + ([self.client_state] if self.client_state != "weights" else []))

    @property
    def per_client(self) -> int:
        """Examples per client: the data grows with the clients."""
        return 4 if self.scenario == TINY else 32

    @property
    def partition(self) -> str:
        """The partition scheme: each client draws its own examples when there are more clients than
        disjoint partitions of SST-2, else IID or Dirichlet(alpha)."""
        if self.per_client * self.clients > SST2_TRAIN:
            return "draw"
        return "dirichlet" if self.alpha else "iid"

    @property
    def supernodes(self) -> int:
        return self.nodes or self.clients


SST2_TRAIN = 67_000  # SST-2's train pool (67,349) less the dev split: beyond it clients draw their examples
SIZES = ("quick", "full", "1k", "10k", "virtual", "minilm-1000")
VIRTUAL_NODES = (10, 20, 50)  # the clients-per-node axis at 10,000 clients


def sweep(size: str) -> list[tuple[str, Point]]:
    """(study, point) pairs of a size; a point in several studies runs once. ``1k``: 1,000 tiny
    clients all in one round; ``10k``: 10,000 tiny clients, 10 % of them in each of 2 rounds."""
    if size == "1k":
        return [("1,000 clients in one round", Point(TINY, 1000, rounds=1))]
    if size == "10k":
        return [("10,000 clients, 10 % per round", Point(TINY, 10_000, fraction=0.1))]
    if size == "virtual":
        study = "10,000 virtual clients, 1,000 per round, by node count"
        points = [(study, Point(TINY, 10_000, fraction=0.1, nodes=n)) for n in VIRTUAL_NODES]
        everyone = Point(TINY, 100_000, fraction=0.01, rounds=3, nodes=20, client_state="seeds")
        return points + [("100,000 virtual clients, 1 % per round", everyone)]
    if size == "minilm-1000":
        study = "1,000 MiniLM clients with personal bottoms, 5 % per round"
        one = [(study, Point(MINILM, 1, rounds=3, client_state=kept, steps=2)) for kept in ("weights", "seeds")]
        return one + [
            (study, Point(MINILM, 1000, fraction=0.05, rounds=3, nodes=4, client_state=kept, steps=2))
            for kept in ("weights", "seeds")
        ]
    points: list[tuple[str, Point]] = []
    counts = (1, 16, 256) if size == "quick" else tuple(2**i for i in range(11))
    points += [("clients", Point(TINY, n)) for n in counts]
    skew = 16 if size == "quick" else 32
    alphas = (0.0, 0.1) if size == "quick" else (0.0, 1.0, 0.3, 0.1)
    for bottoms in ("personal", "synced"):
        points += [("partition", Point(TINY, skew, alpha=a, bottoms=bottoms)) for a in alphas]
    if size == "full":
        points += [("fraction", Point(TINY, 256, fraction=f)) for f in (0.1, 0.3, 1.0)]
        points += [("concurrency", Point(TINY, 256, concurrency=w)) for w in (1, 2, 4, 8)]
        points += [("clients-minilm", Point(MINILM, n, rounds=3)) for n in (1, 2, 4, 8, 16)]
        for bottoms in ("personal", "synced"):
            points += [
                ("partition-minilm", Point(MINILM, 8, alpha=a, bottoms=bottoms, rounds=3)) for a in (0.0, 1.0, 0.3, 0.1)
            ]
    return points


class MemorySampler:
    """Peak resident memory of the processes of one FLWR_HOME, sampled twice a second: the server
    process (``flwr-simulation``: the ServerApp and the simulation engine) and the ClientApp actors."""

    ROLES = {"server": b"flwr-simulation", "actor": b"ClientAppActor"}

    def __init__(self, home: Path):
        self.home, self.peaks = home, {role: 0 for role in self.ROLES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for role, marker in self.ROLES.items():
                for pid in home_pids(self.home, marker):
                    self.peaks[role] = max(self.peaks[role], _rss(pid))


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_point(point: Point, out: Path, profile_seconds: int = 0) -> dict[str, Any]:
    """Run one point; its measurements (and, with ``profile_seconds``, where the time went)."""
    shutil.rmtree(out, ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="hosl-scaling-"))
    profiler = threading.Thread(target=_profile, args=(home, out, profile_seconds), daemon=True)
    started = time.perf_counter()
    try:
        with MemorySampler(home) as memory:
            if profile_seconds:
                profiler.start()
            results = run_simulation(ROOT / point.scenario, point.overrides(out), point.supernodes, home=home)
        if profile_seconds:
            profiler.join()
    finally:
        shutil.rmtree(home, ignore_errors=True)  # the run's temporary FLWR_HOME; the run folder stays
    rounds = results["rounds"]
    seconds = [r["seconds"] for r in rounds]
    steps = sum(r["steps"] for r in rounds)
    row = {
        **dataclasses.asdict(point),
        "model": point.model,
        "supernodes": point.supernodes,
        "partition": point.partition,
        "run_seconds": time.perf_counter() - started,
        "round_seconds": seconds,
        "seconds_per_round": sum(seconds) / len(seconds),
        "max_round_seconds": max(seconds),
        "clients_per_round": sum(len(r["clients"]) for r in rounds) / len(rounds),
        "dropped": sum(len(r["dropped"]) for r in rounds),
        "steps_per_second": steps / sum(seconds),
        "server_peak_rss": memory.peaks["server"],
        "actor_peak_rss": memory.peaks["actor"],
        "client_step_peak": results["client"].get("peak_memory_bytes", 0),
        "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / len(rounds),  # incl. messages
        "client_state_bytes": client_state_bytes(out),
        # per training session: reading the client's state and restoring its weights or replaying its steps
        "state_seconds": sum(r.get("state_seconds", 0.0) for r in rounds)
        / max(1, sum(len(r["clients"]) for r in rounds)),
        "accuracy": [r["accuracy"] for r in rounds],
        "test_accuracy": (results["eval"].get("test") or {}).get("accuracy"),
    }
    profile = out / "profile.json"
    if profile.exists():
        row["profile"] = json.loads(profile.read_text())
    return row


def client_state_bytes(out: Path) -> float | None:
    """Mean bytes on disk of a client's state in the run's client store (each client's newest file)."""
    sizes = [max(own.glob("round-*.pt")).stat().st_size for own in out.glob("clients/*/client-*")]
    sizes = [size for size in sizes if size]
    return sum(sizes) / len(sizes) if sizes else None


PROFILED = ("fl_app/", "client_app/", "server_app/", "flwr/")


def _profile(home: Path, out: Path, seconds: int) -> None:
    """Once the first round runs, sample the server process and one actor with py-spy for
    ``seconds``; write each one's busiest functions (share of its samples) to ``out/profile.json``."""
    deadline = time.time() + 600
    while time.time() < deadline and not (home_pids(home, b"ClientAppActor") and (out / "clients").exists()):
        time.sleep(1)
    targets = {"server": home_pids(home, b"flwr-simulation"), "actor": home_pids(home, b"ClientAppActor")}
    procs = {}
    for role, pids in targets.items():
        if pids:
            raw = out / f"py-spy-{role}.txt"
            command = [
                "py-spy",
                "record",
                "-d",
                str(seconds),
                "-r",
                "50",
                "-p",
                str(pids[0]),
                "-f",
                "raw",
                "-o",
                str(raw),
            ]
            procs[role] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), raw
    summary = {}
    for role, (proc, raw) in procs.items():
        _, error = proc.communicate()
        if proc.returncode or not raw.exists():
            summary[role] = {"error": f"py-spy exited with {proc.returncode}: {error.strip()[-300:]}"}
            continue
        summary[role] = busiest(raw.read_text())
        summary[role]["busy"] = summary[role]["samples"] / (seconds * 50)  # py-spy skips idle samples
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(summary, indent=1))


def busiest(raw: str, top: int = 20) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks -> the samples and the project and Flower functions on the
    most of them (inclusive share)."""
    total, inclusive = 0, Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for frame in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0] + ")" for f in stack.split(";")}:
            if any(k in frame for k in PROFILED):
                inclusive[frame] += int(count)
    return {"samples": total, "functions": [[f, n / max(total, 1)] for f, n in inclusive.most_common(top)]}


COLUMNS = (
    ("clients", "clients", "{}"),
    ("nodes", "supernodes", "{}"),
    ("client state", "client_state", "{}"),
    ("per round", "clients_per_round", "{:.0f}"),
    ("window", "concurrency", "{}"),
    ("partition", "alpha", "{}"),
    ("bottoms", "bottoms", "{}"),
    ("s / round", "seconds_per_round", "{:.1f}"),
    ("steps / s", "steps_per_second", "{:.2f}"),
    ("server peak MiB", "server_peak_rss", "mib"),
    ("actor peak MiB", "actor_peak_rss", "mib"),
    ("client step peak MiB", "client_step_peak", "mib"),
    ("MiB / round", "bytes_per_round", "mib"),
    ("dev acc per round", "accuracy", "accs"),
    ("test acc", "test_accuracy", "{:.3f}"),
    ("state KiB / client", "client_state_bytes", "kib"),
    ("state s / session", "state_seconds", "{:.3f}"),
    ("dropped", "dropped", "{}"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "alpha":
        if row.get("partition") == "draw":
            return "drawn per client"
        return f"Dirichlet {value}" if value else "IID"
    if value is None:
        return "n/a"
    if fmt == "mib":
        return f"{value / 2**20:.1f}"
    if fmt == "kib":
        return f"{value / 2**10:.1f}"
    if fmt == "accs":
        return " / ".join("n/a" if a is None else f"{a:.3f}" for a in value)
    return fmt.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in rows)


def plot(rows_by_study: dict[str, list[dict[str, Any]]], docs: Path) -> list[Path]:
    """scaling_cost.png (wall time per round and throughput against clients) and
    scaling_accuracy.png (final dev accuracy against clients, by alpha and by bottoms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (wall, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for study in ("clients", "clients-minilm"):
        rows = rows_by_study.get(study, [])
        if rows:
            label = rows[0]["model"]
            wall.plot([r["clients"] for r in rows], [r["seconds_per_round"] for r in rows], marker="o", label=label)
            rate.plot([r["clients"] for r in rows], [r["steps_per_second"] for r in rows], marker="o", label=label)
    wall.set(xscale="log", yscale="log", xlabel="clients (all in every round)", ylabel="s", title="wall time per round")
    rate.set(xscale="log", xlabel="clients", ylabel="client steps / s", title="server throughput")
    paths.append(_save(fig, [wall, rate], docs / "scaling_cost.png"))

    studies = [s for s in ("partition", "partition-minilm") if rows_by_study.get(s)]
    fig, axes = plt.subplots(1, max(1, len(studies)), figsize=(5.5 * max(1, len(studies)), 4), squeeze=False)
    for ax, study in zip(axes[0], studies):
        rows = rows_by_study[study]
        for bottoms in ("personal", "synced"):
            own = [r for r in rows if r["bottoms"] == bottoms]
            names = [_cell(r, "alpha", "") for r in own]
            ax.plot(names, [r["accuracy"][-1] for r in own], marker="o", label=f"{bottoms} bottoms")
        ax.set(
            title=f"{rows[0]['model']}, {rows[0]['clients']} clients: dev accuracy after {rows[0]['rounds']} rounds",
            ylabel="dev accuracy",
        )
    paths.append(_save(fig, list(axes[0][: len(studies)]), docs / "scaling_accuracy.png"))
    return paths


def plot_virtual(rows_by_study: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Virtual clients: per run, the wall time per round and the server process's peak memory,
    labelled by clients, nodes and client state (``--size virtual`` or ``minilm-1000``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for study in rows_by_study.values() for r in study]
    names = [f"{r['clients']:,} clients\n{r['supernodes']} nodes\n{r.get('client_state', 'weights')}" for r in rows]
    fig, (wall, memory) = plt.subplots(1, 2, figsize=(max(9, 3.0 * len(rows)), 4.5))
    wall.bar(names, [r["seconds_per_round"] for r in rows])
    wall.set(ylabel="s", title="wall time per round")
    memory.bar(names, [r["server_peak_rss"] / 2**20 for r in rows])
    memory.set(ylabel="MiB", title="server process peak memory")
    for ax in (wall, memory):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _save(fig, axes: list, path: Path) -> Path:
    """Legends and grids on ``axes``, then ``fig`` written to ``path`` and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="quick")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scaling")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--profile", type=int, default=0, help="seconds of py-spy sampling at the largest tiny point")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    points = sweep(args.size)
    largest = max((p for _, p in points if p.scenario == TINY), key=lambda p: p.clients, default=None)
    done: dict[Point, dict[str, Any]] = {}
    rows_by_study: dict[str, list[dict[str, Any]]] = {}
    for study, point in points:
        if point not in done:  # a run serves every study it is in
            profile = args.profile if point == largest else 0
            done[point] = row = run_point(point, args.out / point.key(), profile)
            print(
                f"[scaling] {point.key()}: {row['seconds_per_round']:.1f} s/round, "
                f"{row['steps_per_second']:.2f} steps/s, server {row['server_peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
        rows_by_study.setdefault(study, []).append(done[point])
    args.docs.mkdir(parents=True, exist_ok=True)
    stem = args.docs / ("scaling" if args.size in ("quick", "full") else f"scaling_{args.size.replace('-', '_')}")
    if args.size in ("quick", "full"):
        plots = plot(rows_by_study, args.docs)
    elif args.size in ("virtual", "minilm-1000"):
        plots = [plot_virtual(rows_by_study, stem.with_suffix(".png"))]
    else:
        plots = []
    minutes = (time.perf_counter() - started) / 60
    sections = [
        "# Many-client scaling\n",
        f"`python -m benchmarks.scaling --size {args.size}` ({len(done)} `flwr run` simulations, "
        f"{minutes:.0f} minutes)." + (f" Plots: {', '.join(f'`{p.name}`' for p in plots)}." if plots else "") + "\n",
    ]
    for study, rows in rows_by_study.items():
        sections.append(f"## {study}\n\n{table(rows)}\n")
    profiles = {p.key(): r["profile"] for p, r in done.items() if r.get("profile")}
    for key, profile in profiles.items():
        sections.append(
            f"## Where the time goes at {key}\n\npy-spy, {args.profile} s at 50 Hz: for each function, the "
            "threads of the process busy in it, on average (1.00 = one core all the time; threads waiting "
            "for the GIL count as busy)\n"
        )
        for role, summary in profile.items():
            if "error" in summary:
                sections.append(f"{role}: {summary['error']}\n")
                continue
            lines = "\n".join(f"| {share * summary['busy']:.2f} | `{name}` |" for name, share in summary["functions"])
            sections.append(
                f"{role} (all threads: {summary['busy']:.2f}):\n\n| busy | function |\n|---|---|\n{lines}\n"
            )
    write_report(stem, "\n".join(sections), rows_by_study)
    print(f"[scaling] {len(done)} runs in {minutes:.1f} min; wrote {stem}.md", flush=True)


if __name__ == "__main__":
    main()
