"""Run a scenario under `flwr run` local simulation and return its finished results.json.

Each run gets its own FLWR_HOME (runtime dependency installation disabled) and the processes it
started (the background SuperLink, its SuperExec and simulation) are stopped afterwards, also when
the study is stopped with SIGTERM, so runs do not share an environment or outlive their study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fl_app.config import merge_scenario

ROOT = Path(__file__).resolve().parents[1]


def home_pids(flwr_home: Path, marker: bytes = b"") -> list[int]:
    """PIDs of processes started with ``FLWR_HOME=flwr_home`` (whose command line holds ``marker``):
    what one run started, and nothing of other users' runs on this machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmd and f"FLWR_HOME={flwr_home}".encode() in env and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the flower-superlink processes started with ``flwr_home``."""
    return home_pids(flwr_home, b"flower-superlink")


def stop(pids: list[int], wait: float = 10, sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to ``pids`` and wait up to ``wait`` seconds for them to exit."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.time() + wait
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise SystemExit(128 + signum)


@contextmanager
def home_stopped_on_exit(flwr_home: Path) -> Iterator[None]:
    """Stop every process started with ``FLWR_HOME=flwr_home`` when the block ends. In the main
    thread SIGTERM meanwhile exits through the block (status 143), so stopping a study with
    ``kill -TERM`` also stops the SuperLink, SuperExec and simulation its runs started in their
    own process groups."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main else None
    try:
        yield
    finally:
        stop(home_pids(flwr_home))
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_superlink_env(flwr_home: Path) -> dict[str, str]:
    """Environment for a `flwr run` whose local SuperLink is this run's alone: its own FLWR_HOME and
    ports (Flower's defaults, 39091 and 39093, are shared by every user of the machine), and no
    per-run dependency installation."""
    return {
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }


def finished_results(out: Path, log: str = "", timeout: float = 300) -> dict:
    """The run's results.json once its status is "finished" (`flwr run --stream` can return early
    when its log stream attaches late; the run itself goes on in the background). A run that says
    it failed (results.json, or Flower's log) raises at once instead of waiting out ``timeout``."""
    crashed = next((m for m in CRASH_MARKERS if m in log), None)
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "results.json"
        if path.exists():
            results = json.loads(path.read_text())
            if results.get("status") == "finished":
                return results
            if results.get("status") == "failed":
                raise RuntimeError(f"the run failed: {results.get('error')}; log tail:\n{log[-3000:]}")
        if crashed:
            raise RuntimeError(f"the run crashed ({crashed!r} in Flower's log); log tail:\n{log[-3000:]}")
        time.sleep(1)
    raise TimeoutError(f"no finished results.json in {out} within {timeout} s; log tail:\n{log[-3000:]}")


CRASH_MARKERS = ("Simulation Runtime crashed", "[hosl] error:", "Exit Code: ")


def run_simulation(
    scenario: Path,
    overrides: list[str],
    supernodes: int,
    timeout: float = 7200,
    cpus_per_client: int = 1,
    home: Path | None = None,
) -> dict:
    """`flwr run . --stream` with ``scenario`` + ``overrides`` (must set out-dir) on ``supernodes``
    simulated nodes of ``cpus_per_client`` CPUs each (Ray runs as many clients at once as the CPUs
    allow), with FLWR_HOME ``home`` (default: a new temporary folder); waits until results.json
    says "finished"."""
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("out-dir=")))
    made, home = home is None, home or Path(tempfile.mkdtemp(prefix="hosl-bench-"))
    cfg = home / "run.toml"
    cfg.write_text(merge_scenario(scenario, overrides))
    env = {**os.environ, **private_superlink_env(home)}
    federation = f"num-supernodes={supernodes} client-resources-num-cpus={cpus_per_client}"
    try:
        with home_stopped_on_exit(home):
            args = ["--run-config", str(cfg), "--federation-config", federation]
            results, _ = flwr_run_results(args, env, out, timeout)
    finally:
        if made:  # a temporary FLWR_HOME of ours (the app's copy, Flower's logs): the run folder holds the results
            shutil.rmtree(home, ignore_errors=True)
    return results


def flwr_run_results(args: list[str], env: dict[str, str], out: Path, timeout: float) -> tuple[dict, str]:
    """`flwr run . --stream *args` and its finished results.json (and log). A run that crashed before
    its first round (Ray failing to start on a loaded machine) is retried once, and says so."""
    try:
        return _flwr_run_once(args, env, out, timeout)
    except RuntimeError as err:
        if (out / "checkpoint.pt").exists() or "[hosl] error:" in str(err):
            raise
        print(f"[flower_sim] the run failed before its first round; retrying once: {str(err)[:300]}", flush=True)
        return _flwr_run_once(args, env, out, timeout)


def _flwr_run_once(args: list[str], env: dict[str, str], out: Path, timeout: float) -> tuple[dict, str]:
    proc = subprocess.run(
        ["flwr", "run", ".", "--stream", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"flwr run exited with {proc.returncode}; log tail:\n{log[-3000:]}")
    return finished_results(out, log, timeout), log
