"""Run a scenario under `flwr run` local simulation and return its finished results.json.

Each run gets its own FLWR_HOME (runtime dependency installation disabled) and its background
SuperLink is stopped afterwards, so runs do not share an environment.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from fl_app.config import merge_scenario

ROOT = Path(__file__).resolve().parents[1]


def _superlinks_of(home: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flower-superlink" in cmd and f"FLWR_HOME={home}".encode() in env:
            pids.append(int(proc.name))
    return pids


def run_simulation(scenario: Path, overrides: list[str], supernodes: int, timeout: float = 7200) -> dict:
    """`flwr run . --stream` with ``scenario`` + ``overrides`` (must set out-dir) on ``supernodes``
    simulated nodes of one CPU each; waits until results.json says "finished"."""
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("out-dir=")))
    home = Path(tempfile.mkdtemp(prefix="hosl-bench-"))
    cfg = home / "run.toml"
    cfg.write_text(merge_scenario(scenario, overrides))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    deadline = time.time() + timeout
    try:
        subprocess.run(["flwr", "run", ".", "--stream", "--run-config", str(cfg), "--federation-config",
                        f"num-supernodes={supernodes} client-resources-num-cpus=1"], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=timeout)
        while time.time() < deadline:  # --stream may return before the run ends
            path = out / "results.json"
            if path.exists() and json.loads(path.read_text()).get("status") == "finished":
                return json.loads(path.read_text())
            time.sleep(2)
        raise TimeoutError(f"run in {out} did not finish within {timeout} s")
    finally:
        for pid in _superlinks_of(home):
            os.kill(pid, signal.SIGTERM)
