"""The Flower apps for real: `flwr run` simulation, a loopback deployment, 100 simulated clients.

Each test uses its own FLWR_HOME with runtime dependency installation disabled, and stops the
background SuperLink that `flwr run` starts for local simulation (found by its FLWR_HOME).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks.flower_sim import (
    finished_results,
    flwr_run_results,
    free_port,
    home_pids,
    private_superlink_env,
    stop,
    superlink_pids,
)
from fl_app.config import make_config, merge_scenario, read_scenario
from fl_app.train import run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.flower


@pytest.fixture
def flwr_env(tmp_path):
    """Its own FLWR_HOME and its own local SuperLink ports, so it never meets (or stops) a SuperLink
    that other runs on this machine started; afterwards the SuperLink it started is stopped."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    env = {**os.environ, **private_superlink_env(home)}
    yield env
    stop(superlink_pids(home))


def run_config_file(env, scenario: str, overrides: list[str]) -> Path:
    path = Path(env["FLWR_HOME"]) / "run.toml"
    path.write_text(merge_scenario(ROOT / scenario, overrides))
    return path


def flwr_run(env, scenario: str, overrides: list[str], extra: list[str], timeout: int) -> dict:
    """The finished results of `flwr run` (out-dir set in ``overrides``); a run that crashes before its
    first round is retried once, and a failed one raises at once."""
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("out-dir=")))
    run_config = run_config_file(env, scenario, overrides)
    results, _ = flwr_run_results(["--run-config", str(run_config), *extra], env, out, timeout)
    return results


def test_simulation_killed_mid_run_resumes_and_matches_local_runner(flwr_env, tmp_path):
    """SIGKILL the simulation's ServerApp process once round 1 of 3 is checkpointed: results.json
    still says "running"; `flwr run` with resume = true continues from the last finished round
    and every per-step loss equals the local runner's uninterrupted run. The clients' bottoms are
    synced: each session carries the (seed, projected gradient) history the client has not applied
    yet, which the checkpoint must keep."""
    out = tmp_path / "sim"
    overrides = [
        "max-concurrent-clients=1",
        "eval-test=false",
        "num-rounds=3",
        "bottoms=synced",
        "client-lr=0.001",
        "eval-swap=every",
    ]
    for attempt in (1, 2):  # a run whose Ray fails to start on a loaded machine never checkpoints: once more
        env = flwr_env if attempt == 1 else {**flwr_env, **private_superlink_env(tmp_path / "home-2")}
        home = Path(env["FLWR_HOME"])
        home.mkdir(exist_ok=True)
        run_config = run_config_file(env, "sim_configs/smoke_tiny.toml", [f"out-dir={out}", *overrides])
        first = subprocess.Popen(
            ["flwr", "run", ".", "--stream", "--run-config", str(run_config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        stop(home_pids(home, b"flwr-simulation"), sig=signal.SIGKILL)
        stop(home_pids(home, b"/ray/") + home_pids(home, b"ray::"))  # its Ray processes, orphaned
        first.kill()  # the `flwr run` we started, still streaming the dead run's log
        first.wait()
        if (out / "checkpoint.pt").exists():
            break
        print(f"[test] attempt {attempt}: no checkpoint within 180 s; starting the run again", flush=True)
        stop(superlink_pids(home))
        shutil.rmtree(out, ignore_errors=True)
    killed = json.loads((out / "results.json").read_text())
    assert killed["status"] == "running" and 1 <= len(killed["rounds"]) < 3
    try:
        results = flwr_run(env, "sim_configs/smoke_tiny.toml", [f"out-dir={out}", *overrides, "resume=true"], [], 400)
    finally:
        if env is not flwr_env:
            stop(superlink_pids(home))
    assert results["resumed"][0]["after_round"] == len(killed["rounds"])
    assert results["num_clients"] == 2  # the federation's count (2 SuperNodes), recorded by the ServerApp
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["clients"] == [0, 1] and r["dropped"] == [] and r["accuracy"] is not None for r in rounds)
    settings = rounds[0]["message_bytes_down"]  # round 1: session settings only (a few hundred bytes each)
    assert settings < 2 * 1000
    for r in rounds[1:]:  # then also the other client's 3 steps x (3 + 2Q) scalars
        assert r["message_bytes_down"] - settings >= 2 * 3 * (3 + 2 * 2) * 8
    scenario = read_scenario(ROOT / "sim_configs/smoke_tiny.toml")
    settings = {k: v for k, v in (o.split("=", 1) for o in overrides)}
    local = run(make_config({**scenario, **settings}), tmp_path / "local")
    sim_losses = [h["train_loss"] for h in results["history"]]
    local_losses = [h["train_loss"] for h in local["history"]]
    assert sim_losses == pytest.approx(local_losses, abs=1e-6)
    # what the bottom adds crosses Flower's records: drift and the per-example swap, as the local runner's
    sim_evals, local_evals = results["eval"]["history"], local["eval"]["history"]
    assert [e["round"] for e in sim_evals] == [e["round"] for e in local_evals] == [0, 1, 2, 3]
    for sim_eval, local_eval in zip(sim_evals[1:], local_evals[1:]):
        assert sim_eval["drift"]["params"] == pytest.approx(local_eval["drift"]["params"], rel=1e-4)
        assert sim_eval["correct"] == local_eval["correct"] and sim_eval["swap"] == pytest.approx(
            local_eval["swap"], rel=1e-4
        )


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.append(pid)
    return chain


def _still_running(pids: list[int], home: Path, grace: float = 20.0) -> list[int]:
    """Of ``pids`` and the processes with FLWR_HOME ``home``, those still running (not exited, not a
    zombie) after ``grace`` seconds: a process that was sent SIGTERM may take a moment to go."""
    deadline = time.time() + grace
    while True:
        left = []
        for pid in [*pids, *home_pids(home)]:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                left.append(pid)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


def test_synced_fo_bottoms_on_a_two_node_ray_cluster(tmp_path):
    """scripts/ray_cluster.sh: the simulation runs on a Ray head plus a second Ray node, with
    ClientApp actors on both (each found under its node's `ray start`) reaching the step stream at
    the advertised address; afterwards the cluster's processes are gone. Synced FO clients receive
    the averaged trainable bottom each round (synced ZO clients: see the resume test above)."""
    out, home, log = tmp_path / "fo-fo", tmp_path / "home", tmp_path / "script.log"
    sets = f"out-dir={out} mode=fo-fo bottoms=synced eval-test=false client-lr=0.001"
    command = ["bash", "scripts/ray_cluster.sh", "--flwr-home", str(home), "--set", sets]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    nodes_used, ray_pids, actors, deadline = set(), {}, set(), time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:  # which node each ClientApp actor runs on
            if (home / "ray-pids").exists():
                ray_pids = {int(pid): node for node, pid in (line.split() for line in (home / "ray-pids").open())}
            for actor in home_pids(home, b"ClientAppActor"):
                actors.add(actor)
                nodes_used.update(ray_pids[p] for p in _ancestors(actor) if p in ray_pids)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    text = log.read_text()
    rounds = finished_results(out, text, timeout=5)["rounds"]
    assert proc.returncode == 0 and "Ray cluster at" in text, text[-3000:]
    assert nodes_used == {"head", "node"}, (nodes_used, ray_pids)
    left = _still_running([*ray_pids, *actors], home)
    assert len(ray_pids) == 2 and not left, left  # the cluster, its actors and the SuperLink are gone
    assert [r["dropped"] for r in rounds] == [[], []] and all(r["accuracy"] is not None for r in rounds)
    settings = rounds[0]["message_bytes_down"]  # round 1: session settings only (a few hundred bytes each)
    assert settings < 2 * 1000
    assert rounds[1]["message_bytes_down"] - settings > 2 * 50_000  # round 2: also the averaged bottom, to each


def deploy_command(tmp_path: Path, scenario: str, sets: str, security: list[str]) -> list[str]:
    """scripts/deploy_local.sh running ``scenario`` on a loopback SuperLink + 2 SuperNodes."""
    return [
        "bash",
        "scripts/deploy_local.sh",
        *security,
        "--nodes",
        "2",
        "--port",
        str(free_port()),
        "--flwr-home",
        str(tmp_path / "home"),
        "--run-config",
        scenario,
        "--set",
        f"out-dir={tmp_path / 'deploy'} {sets}",
    ]


def test_tuning_study_in_a_tls_deployment_with_supernode_auth_survives_a_supernode_restart(tmp_path):
    """deploy_local.sh --tls-dir (TLS on Flower's links and on the step stream, SuperNode
    authentication, node keys for the step stream) running the tuning study over SuperNodes in
    separate processes: subsets persist in each node across messages (a new trial resets them:
    test_tuning.py), the best config is retrained and tested. Node 1 (scripts/start_node.sh: SuperNode
    and warm worker) is stopped once round 1 of the final run's 3 is checkpointed and started again
    with its own command line: Flower forgot its in-memory state, so it rejoins a later round from its
    state on disk (the round's ``restored``) and trains to the end. Node 0's worker is killed then:
    start_node.sh restarts it and node 0 trains to the end too."""
    subprocess.run(["bash", "scripts/make_certs.sh", str(tmp_path / "tls")], cwd=ROOT, check=True, capture_output=True)
    out, home = tmp_path / "deploy", tmp_path / "home"
    sets = (
        "tune-trials=1 tune-rounds=2 tune-pruner=none num-rounds=3 eval-untrained=false eval-every=3 round-timeout=120"
    )
    command = deploy_command(tmp_path, "sim_configs/tune_tiny.toml", sets, ["--tls-dir", str(tmp_path / "tls")])
    with open(tmp_path / "deploy.log", "w") as log:
        script = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not _final_run_round(out) and script.poll() is None:
                time.sleep(0.2)
            scripts = [p for p in home_pids(home, b"start_node.sh") if b"partition-id=1" in _cmdline(p)]
            (node,) = [p for p in scripts if _ancestors(p)[0] not in scripts]  # not its worker's supervising subshell
            argv, env = _cmdline(node).split(b"\0")[:-1], _environ(node)
            stop([node])  # SIGTERM: after a SIGKILL the SuperLink refuses its key until the node's heartbeat lapses
            killed_after = _final_run_round(out)
            restarted = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            os.kill(int((home / "nodes/0/run/worker.pid").read_text()), signal.SIGKILL)  # node 0's worker dies
            try:
                script.wait(900)
                assert restarted.poll() is None  # the restarted node served until the end
            finally:
                stop([restarted.pid])
        finally:
            stop([script.pid])
    results = finished_results(out, (tmp_path / "deploy.log").read_text())
    tuning = results["tuning"]
    assert [t["state"] for t in tuning["trials"]] == ["complete"]
    for trial in tuning["trials"]:
        assert [r["plan"] for r in trial["rounds"]] == ["random", "gradmatch"]
        for r in trial["rounds"]:  # 2 of each client's 8 batches
            assert r["clients"] == [0, 1] and r["steps"] == 4
        assert trial["rounds"][1]["selection_bytes"] > 0 and trial["rounds"][1]["selection_quality"]
    final = results["rounds"]  # best config, full data: 8 steps per client
    assert killed_after < 3 and [r["round"] for r in final] == [3, 4, 5] and final[0]["clients"] == [0, 1]
    rejoined = [r for r in final[killed_after:] if 1 in r["clients"]]  # rounds after the kill
    assert rejoined and rejoined[0]["restored"].get("1", 0) >= 1, final  # from its state file on disk
    assert final[-1]["clients"] == [0, 1] and final[-1]["steps"] == 16 and final[0]["restored"] == {}
    assert tuning["final"]["params"] == tuning["best"]["params"] and tuning["final"]["test_accuracy"] is not None
    assert results["refused"] == {} and results["config"]["stream-secret-file"] and results["config"]["stream-tls-cert"]
    assert "SuperNode authentication is disabled" not in (home / "logs/superlink.log").read_text()
    worker_log = (home / "nodes/0/logs/worker.log").read_text()
    assert "worker exited (137); restarting" in worker_log  # and came back
    assert worker_log.count("allocator mimalloc") == 2 and "allocator glibc" not in worker_log  # start_node's default


def _netns_available() -> str:
    """Why network namespaces cannot be made here ('' when they can)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns) to put the nodes on separate network namespaces"
    name = f"hosl-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def _rounds_done(out: Path) -> list[dict]:
    try:
        return json.loads((out / "results.json").read_text()).get("rounds", [])
    except (OSError, ValueError):
        return []


def test_separate_hosts_with_tls_and_node_auth_survive_a_node_losing_its_network(tmp_path):
    """deploy_local.sh --netns: the SuperLink and ServerApp on one network namespace (10.77.0.1), each
    SuperNode on its own, joined by a bridge, with TLS (the certificate names 10.77.0.1), SuperNode
    authentication and node keys, the step stream bound and advertised at 10.77.0.1. Node 1's link is
    cut in the middle of its round-1 session: the session is dropped (its steps rolled back on the server)
    and the round ends without it, as soon as Flower reports the node unavailable; the link comes back
    and the node rejoins a later round and trains to the end."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    subprocess.run(
        ["bash", "scripts/make_certs.sh", str(tmp_path / "tls"), "10.77.0.1"], cwd=ROOT, check=True, capture_output=True
    )
    out, home = tmp_path / "deploy", tmp_path / "home"
    sets = "num-rounds=4 local-steps=20 eval-untrained=false eval-test=false eval-every=4 step-timeout=6"
    command = [
        *deploy_command(
            tmp_path, "sim_configs/smoke_tiny.toml", f"{sets} round-timeout=90", ["--tls-dir", str(tmp_path / "tls")]
        ),
        "--netns",
    ]
    with open(tmp_path / "deploy.log", "w") as log:
        script = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            node_log, deadline = home / "nodes/1/logs/worker.log", time.monotonic() + 600
            while time.monotonic() < deadline and script.poll() is None:  # until node 1 reports steps (each 5th)
                if node_log.exists() and "round 1 client 1: step " in node_log.read_text(errors="replace"):
                    break
                time.sleep(0.05)
            namespaces = (home / "netns").read_text().split("\n")
            _, _, ns, link = next(line for line in namespaces if line.startswith("node 1 ")).split()
            subprocess.run(["ip", "-n", ns, "link", "set", link, "down"], check=True)
            while time.monotonic() < deadline and not _rounds_done(out) and script.poll() is None:
                time.sleep(0.2)
            subprocess.run(["ip", "-n", ns, "link", "set", link, "up"], check=True)
            script.wait(900)
        finally:
            stop([script.pid])
    results = finished_results(out, (tmp_path / "deploy.log").read_text())
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    cut = rounds[0]  # the link went down mid-session: its session dropped, its steps rolled back
    assert [d["client"] for d in cut["dropped"]] == [1] and cut["clients"] == [0], cut
    assert any(1 in r["clients"] for r in rounds[1:]), rounds  # back on the network, it rejoined
    assert rounds[-1]["clients"] == [0, 1] and rounds[-1]["dropped"] == []
    assert results["refused"] == {} and results["config"]["stream-host"] == "10.77.0.1"
    assert "SuperNode authentication is disabled" not in (home / "logs/superlink.log").read_text()


def _final_run_round(out: Path) -> int:
    """Rounds of a tuning run's final run recorded so far (0 while tuning, or before results.json)."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(results["rounds"]) if "tuning" in results else 0


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def test_deployment_refuses_to_run_insecure_unless_asked():
    proc = subprocess.run(
        ["bash", "scripts/deploy_local.sh", "--nodes", "1"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr
    node = ["bash", "scripts/start_node.sh", "--superlink", "127.0.0.1:1", "--dir", "/nonexistent/node"]
    proc = subprocess.run([*node, "--node-config", "partition-id=0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "give --root-certificates CA (TLS) or ask for --insecure explicitly" in proc.stderr
    proc = subprocess.run([*node, "--insecure"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--node-config" in proc.stderr and not Path("/nonexistent/node").exists()
    proc = subprocess.run([*node, "--insecure", "--node-config", "node.toml"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "give key=value pairs, not a TOML file" in proc.stderr


def test_a_node_folder_serves_one_node_at_a_time(tmp_path):
    """start_node.sh locks its --dir: a second node on a folder in use gives up (after 10 s) and says why."""
    import fcntl

    (tmp_path / "node").mkdir(mode=0o700)
    with open(tmp_path / "node" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        command = ["bash", "scripts/start_node.sh", "--superlink", "127.0.0.1:1", "--dir", str(tmp_path / "node")]
        proc = subprocess.run(
            [*command, "--insecure", "--node-config", "partition-id=0"], cwd=ROOT, capture_output=True, text=True
        )
    assert proc.returncode == 3 and "another node already runs from" in proc.stderr
    assert not (tmp_path / "node" / "pids").exists()


def _final_client_states(out: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Each client's newest state in the run's client store: client id -> its bottom's weights."""
    states = {}
    for own in out.glob("clients/*/client-*"):
        newest = max(own.glob("round-*.pt"))
        states[int(own.name.removeprefix("client-"))] = torch.load(newest, weights_only=True)["weights"]
    return states


@pytest.mark.parametrize("estimator", ["one-sided-sparse"])
def test_each_estimator_shape_trains_under_flower_as_in_the_local_runner(tmp_path, estimator):
    """A one-sided estimate over the step stream (Q + 1 activations, Q scored) and a sparse mask read in
    the ClientApp's process: the simulation's per-step losses and dev outcomes are the local runner's.
    (Low-rank z is a function of its seed alone, which the synced history carries as for two-point; its
    replay is exact in tests/test_zo_estimators.py.)"""
    from benchmarks.flower_sim import run_simulation

    smoke = ROOT / "sim_configs/smoke_tiny.toml"
    common = ["num-rounds=2", "bottoms=synced", "max-concurrent-clients=1", "eval-test=false"]
    common += [f"zo-estimator={estimator}", "zo-subspace-steps=2"]
    sim = run_simulation(smoke, [f"out-dir={tmp_path / 'sim'}", *common], supernodes=2, timeout=600)
    settings = {**read_scenario(smoke), **{k: v for k, v in (o.split("=", 1) for o in common)}}
    local = run(make_config(settings), tmp_path / "local")
    assert sim["config"]["zo-estimator"] == estimator
    assert [h["train_loss"] for h in sim["history"]] == pytest.approx(
        [h["train_loss"] for h in local["history"]], abs=1e-6
    )
    assert [e["correct"] for e in sim["eval"]["history"]] == [e["correct"] for e in local["eval"]["history"]]


def test_four_virtual_clients_on_two_nodes_train_exactly_as_four_nodes(tmp_path):
    """virtual-clients: 4 clients on 2 simulated nodes sample the same clients, get the same per-step
    losses and end with bit-identical personal bottoms as 4 clients on 4 nodes, although their
    states move between the nodes (loaded from the client store by whichever node serves them)."""
    from benchmarks.flower_sim import run_simulation

    smoke = ROOT / "sim_configs/smoke_tiny.toml"
    common = ["num-clients=4", "fraction-train=0.5", "max-concurrent-clients=1", "eval-test=false", "num-rounds=2"]
    common += ["seed=5", "eval-every=2"]  # samples [0, 2], then [2, 3]: client 2 goes second, then first
    four = run_simulation(smoke, [f"out-dir={tmp_path / 'four'}", *common], supernodes=4, timeout=600)
    two = run_simulation(
        smoke, [f"out-dir={tmp_path / 'two'}", *common, "virtual-clients=true"], supernodes=2, timeout=600
    )
    assert two["num_clients"] == four["num_clients"] == 4
    sampled = [r["clients"] for r in two["rounds"]]
    assert sampled == [r["clients"] for r in four["rounds"]] and all(len(c) == 2 for c in sampled)
    assert all(r["dropped"] == [] for r in two["rounds"])
    assert [h["train_loss"] for h in two["history"]] == [h["train_loss"] for h in four["history"]]
    # a round's two sessions go to the two nodes in turn (the first to the lower node id): a client
    # that is first in one round and second in another moved between the nodes (client 2 in round 2)
    nodes_of = {c: {clients.index(c) for clients in sampled if c in clients} for c in range(4)}
    assert any(len(nodes) == 2 for nodes in nodes_of.values())
    moved, stayed = _final_client_states(tmp_path / "two"), _final_client_states(tmp_path / "four")
    assert set(moved) == set(stayed) == {c for clients in sampled for c in clients}
    for client, weights in moved.items():
        assert weights.keys() == stayed[client].keys()
        assert all(torch.equal(weights[k], stayed[client][k]) for k in weights)


def test_hundred_simulated_clients_complete_and_are_measured(tmp_path):
    """One point of the scaling study (benchmarks.scaling): 100 clients in each of 2 rounds, none
    dropped, and every figure the study reports measured, memory from this run's processes only."""
    from benchmarks.scaling import TINY, Point, run_point

    row = run_point(Point(TINY, 100), tmp_path / "c100")
    assert len(row["round_seconds"]) == 2 and row["clients_per_round"] == 100 and row["dropped"] == 0
    assert row["steps_per_second"] > 0 and row["bytes_per_round"] > 0 and row["client_step_peak"] > 0
    assert row["server_peak_rss"] > 2**27 and row["actor_peak_rss"] > 2**27  # torch alone takes more than 128 MiB
    assert row["accuracy"][-1] is not None and row["test_accuracy"] is not None


def test_virtual_clients_beyond_the_node_count_keep_their_seeds_states_on_disk(tmp_path):
    """A virtual point of the scaling study in miniature: 300 clients on 3 nodes, 4 % per round, each
    bottom kept as seeds: nobody dropped, every round's sessions done, a client's state some KiB."""
    from benchmarks.scaling import TINY, Point, run_point

    row = run_point(Point(TINY, 300, fraction=0.04, nodes=3, client_state="seeds"), tmp_path / "v300")
    assert row["supernodes"] == 3 and row["clients_per_round"] == 12 and row["dropped"] == 0
    assert len(row["round_seconds"]) == 2 and row["server_peak_rss"] > 2**27
    assert 0 < row["client_state_bytes"] < 20 * 2**10  # 1 step of 2 queries per round: a few KiB
    trained = {int(p.name.removeprefix("client-")) for p in (tmp_path / "v300").glob("clients/*/client-*")}
    assert len(trained) >= 12 and max(trained) < 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_client_state_round_trips_through_the_node_context(dtype):
    """The ClientApp keeps its bottom in ``context.state`` between rounds; half-precision bottoms
    (client-dtype) survive it exactly (bfloat16 is stored as float32: numpy has no bfloat16)."""
    from flwr.app import Context, RecordDict

    from client_app.sessions import _load_state, _save_state
    from fl_app.records import ClientState

    weights = {"embed.weight": torch.randn(5, 3).to(dtype), "layer.bias": torch.randn(3).to(dtype)}
    state = ClientState(weights=weights, steps=7, synced_round=2, trial=1, subset_ids=[0, 3], subset_weights=[0.5, 1.5])
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    _save_state(context, state)
    back = _load_state(context)
    assert (back.steps, back.synced_round, back.trial, back.subset_ids, back.subset_weights) == (
        7,
        2,
        1,
        [0, 3],
        [0.5, 1.5],
    )
    assert set(back.weights) == set(weights)
    assert all(torch.equal(back.weights[k].to(dtype), v) for k, v in weights.items())


def test_a_superlink_with_a_database_keeps_its_supernodes_across_a_restart(tmp_path):
    """flower-superlink --database: stopped and started again, it still knows its SuperNode, which
    reconnects and keeps running (without a database the new SuperLink does not know the node, and
    the node stops)."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    port, logs = free_port(), tmp_path / "logs"
    logs.mkdir()
    link_cmd = ["flower-superlink", "--insecure", "--database", str(tmp_path / "state.db")]
    link_cmd += ["--host", "127.0.0.1", "--port", str(port)]

    def start(cmd, name):
        return subprocess.Popen(cmd, env=env, stdout=open(logs / name, "w"), stderr=subprocess.STDOUT)

    def wait_for(name, text, count=1, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (logs / name).read_text().count(text) < count:
            time.sleep(0.2)
        return (logs / name).read_text().count(text) >= count

    link = start(link_cmd, "link-1.log")
    node_cmd = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
    node = start([*node_cmd, "--node-config", "partition-id=0 num-partitions=1"], "node.log")
    try:
        assert wait_for("node.log", "Starting Flower SuperExec")
        connected = (logs / "node.log").read_text().count("Connection successful")
        stop([link.pid])
        link = start(link_cmd, "link-2.log")
        assert wait_for("node.log", "Connection successful", connected + 1)  # back on the restarted SuperLink
        time.sleep(5)
        assert node.poll() is None and "terminated" not in (logs / "node.log").read_text()
    finally:
        stop([node.pid, link.pid])
