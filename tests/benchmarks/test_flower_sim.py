"""benchmarks.flower_sim's process hygiene: a study stopped with SIGTERM leaves nothing of its runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A study in miniature: inside `home_stopped_on_exit` it starts a process under its FLWR_HOME in a
# new session (as `flwr run` starts its SuperLink), records its PID and then waits to be stopped.
STUDY = """
import os, subprocess, sys, time
from pathlib import Path
from benchmarks.flower_sim import home_stopped_on_exit
home, pid_file = Path(sys.argv[1]), Path(sys.argv[2])
with home_stopped_on_exit(home):
    env = {**os.environ, "FLWR_HOME": str(home)}
    link = subprocess.Popen(["sleep", "600"], env=env, start_new_session=True)
    pid_file.write_text(str(link.pid))
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_to_a_study_stops_the_processes_its_runs_started(tmp_path):
    """`kill -TERM -- -PGID` on a study: the study exits with status 143 through its clean-up, and the
    process it started in its own session under the run's FLWR_HOME (which the group signal never
    reaches) is stopped too. Without the handler Python dies at once and that process lives on."""
    home, pid_file = tmp_path / "home", tmp_path / "link.pid"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    study = subprocess.Popen(
        [sys.executable, "-c", STUDY, str(home), str(pid_file)], cwd=ROOT, env=env, start_new_session=True
    )
    link = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and study.poll() is None, "the study never started its process"
            time.sleep(0.05)
        link = int(pid_file.read_text())
        assert _running(link)
        os.killpg(study.pid, signal.SIGTERM)
        assert study.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 20
        while _running(link) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(link), f"process {link} under the study's FLWR_HOME outlived the study"
    finally:
        if study.poll() is None:
            study.kill()
            study.wait()
        if link is not None and _running(link):
            os.kill(link, signal.SIGKILL)
