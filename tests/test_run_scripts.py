"""The run scripts' own checks, without Flower running. scripts/flwr_run.sh, the README's run command:
`flwr run` of the checkout with its own FLWR_HOME, no per-run dependency installation and a local
SuperLink on ports of its own, kept for later runs while that SuperLink lives (a stand-in `flwr` on
PATH prints what it was given). scripts/deploy_local.sh refuses a SuperLink port already in use."""

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "flwr_run.sh"


def _fake_flwr(bin_dir: Path) -> None:
    bin_dir.mkdir()
    fake = bin_dir / "flwr"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "ARGS $*"\n'
        'echo "HOME $FLWR_HOME"\n'
        'echo "NODEPS $FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"\n'
        'echo "PORTS $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT $FLWR_LOCAL_CONTROL_API_PORT"\n'
        '[ -z "${FAKE_LOG:-}" ] || echo "$FAKE_LOG"\n'  # what the run's ServerApp would print last
    )
    fake.chmod(0o755)


def _results(tmp_path: Path, status: str) -> str:
    path = tmp_path / f"results-{status}.json"
    path.write_text(json.dumps({"status": status}))
    return f"[hosl] results written to {path}"


def _run(tmp_path: Path, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    env = {"FAKE_LOG": _results(tmp_path, "finished"), **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**base, "PATH": path, "FLWR_HOME": str(tmp_path / "home"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def _seen(proc: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if not line.startswith("["))


def test_the_run_gets_its_own_home_no_dependency_installation_and_private_ports(tmp_path):
    _fake_flwr(tmp_path / "bin")
    got = _seen(_run(tmp_path, "--stream", "--run-config", "sim_configs/smoke_tiny.toml"))
    assert got["ARGS"] == f"run {ROOT} --stream --run-config sim_configs/smoke_tiny.toml"
    assert got["HOME"] == str(tmp_path / "home") and got["NODEPS"] == "1"
    http, control = (int(p) for p in got["PORTS"].split())
    assert http != control and not {http, control} & {39091, 39093}  # never Flower's shared defaults
    assert (tmp_path / "home" / "local-superlink-ports").read_text().split() == [str(http), str(control)]


def test_ports_you_export_are_used_as_they_are(tmp_path):
    _fake_flwr(tmp_path / "bin")
    got = _seen(_run(tmp_path, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="40001", FLWR_LOCAL_CONTROL_API_PORT="40003"))
    assert got["PORTS"] == "40001 40003"


@pytest.mark.subprocess
def test_stop_with_no_superlink_of_this_home_stops_nothing(tmp_path):
    _fake_flwr(tmp_path / "bin")
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--stop"],
        env={**os.environ, "FLWR_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == f"no SuperLink running with FLWR_HOME={tmp_path / 'home'}"


@pytest.mark.subprocess
def test_a_live_superlink_of_this_home_keeps_its_ports_and_stop_stops_only_it(tmp_path):
    _fake_flwr(tmp_path / "bin")
    first = _seen(_run(tmp_path))["PORTS"]
    stand_in = tmp_path / "bin" / "flower-superlink"  # a process named like the SuperLink, of this home
    stand_in.write_text("#!/usr/bin/env bash\nsleep 120\n")
    stand_in.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    ours = subprocess.Popen([str(stand_in)], env={**base, "FLWR_HOME": str(tmp_path / "home")})
    other = subprocess.Popen([str(stand_in)], env={**base, "FLWR_HOME": str(tmp_path / "other")})
    try:
        assert _seen(_run(tmp_path))["PORTS"] == first  # the running SuperLink's ports, read back
        subprocess.run(["bash", str(SCRIPT), "--stop"], env={**base, "FLWR_HOME": str(tmp_path / "home")}, check=True)
        assert ours.wait(timeout=30) != 0  # stopped
        assert other.poll() is None  # another home's SuperLink is left running
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


@pytest.mark.subprocess
def test_deploy_refuses_a_superlink_port_already_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "deploy_local.sh"), "--insecure", "--port", str(port)],
            env={**os.environ, "FLWR_HOME": str(tmp_path / "home")},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"--port {port}: something already listens on 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "home").exists()  # refused before anything started


def test_a_streamed_run_exits_non_zero_unless_it_says_it_finished(tmp_path):
    """flwr run exits 0 when the ServerApp fails: with --stream the script reads the run's last line
    and its results.json, and exits 1 saying why when the run did not finish (issue 45)."""
    _fake_flwr(tmp_path / "bin")
    assert _run(tmp_path, "--stream").returncode == 0
    cases = {
        _results(tmp_path, "failed"): "the run did not finish: .*results-failed.json says status 'failed'",
        "[hosl] error: unknown task 'sst3'": "the run failed: \\[hosl\\] error: unknown task 'sst3'",
        "": "the log ended before the run's last line",
    }
    for log, message in cases.items():
        proc = _run(tmp_path, "--stream", check=False, FAKE_LOG=log)
        assert proc.returncode == 1 and re.search(message, proc.stderr), proc.stderr
    assert _run(tmp_path, check=False, FAKE_LOG="").returncode == 0  # without --stream: flwr run's own status
