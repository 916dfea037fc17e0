"""A node's warm worker (client_app.worker) behind the thin ClientApp (client_app.app / warm): the
same sessions as the node itself, bound to its node config and code, reported when down."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supernode import start_client_internal

import client_app.app
from client_app import warm
from client_app.app import _session, handle
from client_app.sessions import _load_state
from client_app.supernode import ShortWaits, shorten_idle_poll, split_idle_poll
from client_app.worker import _claim, config_mismatch
from fl_app.config import make_config, read_scenario
from fl_app.records import SessionRequest, TrainReport
from server_app.app import session_content

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG = {**read_scenario(str(ROOT / "sim_configs/smoke_tiny.toml")), "num-clients": 3, "local-steps": 2}
NODE = {"partition-id": 0, "num-partitions": 3}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A worker process for node 0 on a private socket: (socket path, its node config, the process)."""
    folder = tmp_path_factory.mktemp("node") / "run"
    folder.mkdir(mode=0o700)
    path = str(folder / "worker.sock")
    node = {**NODE, "worker-socket": path}
    args = f"partition-id=0 num-partitions=3 worker-socket='{path}'"
    log = open(folder.parent / "worker.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "client_app.worker", "--socket", path, "--node-config", args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(path), (folder.parent / "worker.log").read_text()
    yield path, node, proc
    proc.terminate()
    proc.wait(30)


def _context(node: dict, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=state or RecordDict(), run_config=RUN_CONFIG)


def _train_content(coordinator, rnd: int) -> tuple[object, RecordDict]:
    session, message = coordinator.open(0, rnd)
    return session, session_content(SessionRequest(message))


def test_the_worker_trains_a_node_exactly_as_the_node_itself_and_keeps_its_state_in_flowers_context(
    worker, coordinators
):
    path, node, proc = worker
    here, there = coordinators(make_config(RUN_CONFIG)), coordinators(make_config(RUN_CONFIG))
    local, remote = _context(NODE), _context(node)
    for rnd in (1, 2):  # round 2 starts from the state round 1 left in each context
        session, content = _train_content(here, rnd)
        mine = handle("train", content, local)
        session_w, content_w = _train_content(there, rnd)
        theirs = handle("train", content_w, remote)
        a, b = dict(mine.config_records["report"]), dict(theirs.config_records["report"])
        assert a["ok"] and b["ok"], (a, b)
        assert a["losses"] == b["losses"] and a["seeds"] == b["seeds"] and a["grads"] == b["grads"]
        assert here.finish_train(session, TrainReport.from_record(a))
        assert there.finish_train(session_w, TrainReport.from_record(b))
    mine_state, their_state = _load_state(local), _load_state(remote)
    assert mine_state.steps == their_state.steps == 4
    assert set(mine_state.weights) == set(their_state.weights)
    assert all(torch.equal(mine_state.weights[k], their_state.weights[k]) for k in mine_state.weights)
    assert proc.poll() is None  # one process served both rounds
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"  # only this user may hand it sessions


def test_the_worker_refuses_another_nodes_config_and_other_code_and_the_context_is_left_as_it_was(worker, monkeypatch):
    path, node, _ = worker
    stranger = _context({**node, "stream-key-file": "/keys/other-node.key"})
    state = stranger.state
    with pytest.raises(warm.WorkerUnavailable, match="bound to another node config .*stream-key-file: worker None"):
        handle("query", RecordDict(), stranger)
    assert stranger.state is state  # nothing of a refused message is applied
    monkeypatch.setattr(warm, "code_fingerprint", lambda root=None: "0" * 64)
    with pytest.raises(warm.WorkerUnavailable, match="runs other code than this run's app"):
        handle("query", RecordDict(), _context(node))
    monkeypatch.undo()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as garbage:  # frames that are no request at all
        garbage.connect(path)
        warm.send_frames(garbage, [b"[1]", b"\xff" * 64, b"not a protobuf"])
        garbage.settimeout(60)
        assert garbage.recv(1) == b""  # the worker drops it ...
    reply = handle("query", RecordDict(), _context(node))  # ... and still serves, after refusing and garbage
    assert dict(reply.config_records["node"])["partitions"] == "0"


def test_a_node_whose_worker_is_down_reports_it_to_the_server_and_never_runs_the_session_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "CONNECT_SECONDS", 0.5)
    path = str(tmp_path / "worker.sock")
    msg = SimpleNamespace(content=RecordDict({"session": ConfigRecord({"client": 0})}))
    ran = []
    monkeypatch.setattr("client_app.sessions.train", lambda *a: ran.append(a))
    monkeypatch.setattr(client_app.app, "Message", lambda content, reply_to: content)  # Flower's needs a run
    reply = _session("train", msg, _context({**NODE, "worker-socket": path}))
    report = dict(reply.config_records["report"])
    assert report["ok"] is False and report["partition-id"] == 0 and not ran
    assert f"worker-socket = {path!r}) did not answer for 0 s" in report["error"]
    assert "scripts/start_node.sh" in report["error"]


@pytest.mark.subprocess
def test_the_worker_socket_folder_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert "open to other users (mode 755" in warm.socket_dir_problem(str(shared / "w.sock"))
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert warm.socket_dir_problem(str(private / "w.sock")) == ""
    assert "Unix sockets take at most 100" in warm.socket_dir_problem(str(private / ("w" * 120)))
    with pytest.raises(warm.WorkerUnavailable, match="is not private .*open to other users"):
        warm.forward(str(shared / "w.sock"), "query", RecordDict(), _context(NODE), wait=0)
    (private / "not-a-socket").write_text("x")
    with pytest.raises(SystemExit, match="exists and is not a socket"):
        _claim(str(private / "not-a-socket"))
    done = subprocess.run(
        [sys.executable, "-m", "client_app.worker", "--socket", str(shared / "w.sock"), "--node-config",
         f"partition-id=0 worker-socket='{shared / 'w.sock'}'"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "open to other users" in done.stderr and "Traceback" not in done.stderr


def test_the_code_fingerprint_covers_the_node_side_code(tmp_path):
    for package in ("client_app", "fl_app"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = warm.code_fingerprint(tmp_path)
    assert before == warm.code_fingerprint(tmp_path)
    (tmp_path / "fl_app" / "a.py").write_text("x = 2\n")
    assert warm.code_fingerprint(tmp_path) != before
    mismatch = config_mismatch({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4})
    assert mismatch == "b: worker 2, message 3; c: worker None, message 4"


def test_the_supernodes_idle_poll_is_shortened_and_flowers_wait_is_still_where_it_is_shortened(monkeypatch):
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert shorten_idle_poll(0.05)  # False would mean Flower moved its 3 s wait: the patch would do nothing
    assert isinstance(start_client_internal.time, ShortWaits)
    started = time.monotonic()
    start_client_internal.time.sleep(3)  # the SuperNode's idle wait
    start_client_internal.time.sleep(0.5)  # its wait for the ClientApp's reply
    assert time.monotonic() - started < 2.5
    assert os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"
    assert start_client_internal.time.monotonic() > 0  # everything else is the time module's
    assert split_idle_poll(["--insecure", "--idle-poll", "0.2", "--port", "1"]) == (0.2, ["--insecure", "--port", "1"])
    assert split_idle_poll(["--insecure"]) == (0.5, ["--insecure"])
    with pytest.raises(SystemExit, match="give 0.01 to 3 seconds"):
        split_idle_poll(["--idle-poll", "10"])


@pytest.mark.subprocess
def test_the_clientapp_launcher_runs_flowers_own_flwr_clientapp_without_the_supernode_command():
    probe = (
        "import sys; sys.path.insert(0, 'client_app'); import clientapp_process as c; f = c.load_flwr_clientapp(); "
        "print(f.__name__, 'flwr.supernode.cli.flower_supernode' in sys.modules, 'client_app' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["flwr_clientapp", "False", "False"], done.stderr[-2000:]
    helped = subprocess.run(
        [sys.executable, "client_app/clientapp_process.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert (
        helped.returncode == 0 and "usage: flwr-clientapp" in helped.stdout and "--runtime-api-address" in helped.stdout
    )


def test_a_peer_trickling_a_request_is_cut_at_the_whole_requests_deadline():
    """Issue 44 item 9: the worker's request timeout holds for the whole request, not per read: a
    peer sending one byte every 0.2 s is cut at the deadline, not held for as long as it keeps trickling."""
    import threading

    reader, writer = socket.socketpair()
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                writer.send(b"\x00")
            except OSError:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):  # at the check between reads, or in the read the deadline cut short
            warm.recv_frames(reader, 3, within=1.0)
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        reader.close()
        writer.close()
        thread.join()


def test_connecting_to_a_worker_whose_backlog_is_full_gives_up_after_its_wait(tmp_path):
    """Issue 44 item 9: with the listener's backlog full of idle connections, a message waits at most its
    connect wait (and says so), instead of blocking in connect() before any timeout is set."""
    path = str(tmp_path / "w.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # never accepts
    idle = []
    try:
        for _ in range(8):  # fill the backlog; connects beyond it would block
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            idle.append(s)
        started = time.monotonic()
        with pytest.raises(warm.WorkerUnavailable, match="did not answer for 1 s"):
            warm._connect(path, 1.0)
        assert time.monotonic() - started < 4.0
    finally:
        for s in idle:
            s.close()
        listener.close()
