"""Coordinator + client sessions over the real step stream (no Flower): drops roll back, synced
bottoms stay identical, a client that missed rounds catches up by replaying history."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fl_app import frame_auth
from fl_app.batches import BatchStream
from fl_app.client_session import (
    ClientSide,
    NodeSettings,
    _prepare,
    catch_up,
    make_client,
    run_eval_session,
    run_session,
)
from fl_app.config import make_config, read_scenario
from fl_app.coordinator import fedavg, stream_credentials
from fl_app.protocol import ProtocolError, StepRequest
from fl_app.records import ClientState, SessionRequest
from fl_app.stream import StepStreamClient


def config(**over):
    return make_config(
        {
            **read_scenario("sim_configs/smoke_tiny.toml"),
            "num-clients": 3,
            "local-steps": 2,
            "step-timeout": 5.0,
            **over,
        }
    )


@pytest.fixture
def coord(coordinators):
    return lambda **over: coordinators(config(**over))


def server_weights(c):
    return [p.detach().clone() for p in c.server.params]


def session_round(c, rnd, clients, states):
    """Run ``clients`` one after another as the ServerApp would; returns reports."""
    reports = []
    for pid in clients:
        session, message = c.open(pid, rnd)
        history = c.history_for(pid, states[pid].synced_round if pid in states else 0)
        report, states[pid] = run_session(
            SessionRequest(message, history=history), ClientSide(c.config, pid, 3, states.get(pid))
        )
        assert c.finish_train(session, report)
        reports.append(report)
    c.sync(rnd, reports)
    c.record_round(rnd, reports, [], None, 0.0)
    return reports


def test_session_trains_and_state_round_trips(coord):
    c = coord()
    states = {}
    before = server_weights(c)
    reports = session_round(c, 1, [0, 1], states)
    assert [r.steps for r in reports] == [2, 2] and all(r.bytes_up > 0 for r in reports)
    steps = c.results["rounds"][0]["step_seconds"]  # what a round's fixed cost is measured against
    assert steps == {"sum": sum(r.step_seconds for r in reports), "max": max(r.step_seconds for r in reports)}
    assert any(not torch.equal(a, b) for a, b in zip(before, server_weights(c)))
    assert states[0].steps == 2 and states[0].weights
    client, _ = make_client(c.config, 0, states[0])
    assert client.steps == 2
    assert all(torch.equal(p, states[0].weights[n]) for n, p in client.bottom.named_parameters() if p.requires_grad)


def test_stalled_client_is_dropped_and_its_server_updates_rolled_back(coord):
    c = coord()
    session_round(c, 1, [0], {})
    committed = server_weights(c)
    session, message = c.open(1, 2)
    client, data = make_client(c.config, 1, None)
    link = StepStreamClient(message.address, message.token)
    stream = BatchStream(data.encoder, data.client_examples(1), 8, 0)
    client.train_step(stream.batch(0), link)  # one step lands on the server ...
    assert any(not torch.equal(a, b) for a, b in zip(committed, server_weights(c)))
    session.last_activity -= 60  # ... then the client goes silent past the step timeout
    assert c.expire_idle() == [session]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(committed, server_weights(c)))
    assert not c.finish_train(session, None, "no reply")
    with pytest.raises(ConnectionError):
        client.train_step(stream.batch(1), link)
    link.close()


def test_malformed_frame_ends_one_session_and_others_continue(coord):
    c = coord()
    bad, bad_msg = c.open(2, 1)
    link = StepStreamClient(bad_msg.address, bad_msg.token)
    frame = StepRequest(
        kind="fo",
        clean=torch.full((2, 4, 32), float("nan")),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        labels=torch.tensor([0, 1]),
        score_ids=torch.tensor([[5, 6], [5, 6]]),
    ).to_bytes()
    with pytest.raises(ConnectionError, match="INVALID_ARGUMENT.*NaN"):
        link.exchange(frame)
    link.close()
    assert bad.status == "failed"
    assert [r.steps for r in session_round(c, 1, [0], {})] == [2]


STABLE = {  # rates vary per step, estimates are clipped, norms and biases stay untrained
    "client-lr-schedule": "cosine",
    "client-lr-warmup": 3,
    "zo-grad-clip": 0.05,
    "client-freeze": "norms,biases",
}


@pytest.mark.parametrize("rows, stability", [("batch", {}), ("all", {}), ("batch", STABLE)])
def test_synced_bottoms_match_and_late_client_catches_up(coord, rows, stability):
    """Synced ZO bottoms agree after replay, also when each step has its own scheduled rate and
    clipped projected gradients (the history carries what each step applied)."""
    c = coord(bottoms="synced", **{"zo-embedding-rows": rows, **stability})
    states: dict[int, ClientState] = {}
    session_round(c, 1, [0, 1], states)
    session_round(c, 2, [0, 1], states)
    assert len(c.history) == 8  # 2 rounds x 2 clients x 2 steps
    assert all(packed for packed in c.history.rows) == (rows == "batch")  # row ids travel with the history
    if stability:  # the warm-up's rates 1/3, 2/3 of the base, then the cosine decay over 2 rounds x 2 steps
        assert c.history.lrs[:2] == pytest.approx([c.config.optim.client_lr / 3, 2 * c.config.optim.client_lr / 3])
        assert len(set(c.history.lrs)) > 2 and max(abs(g) for step in c.history.grads for g in step) <= 0.05
    latest = c.history.since(0)

    def caught_up(pid):
        client, _ = make_client(c.config, pid, states.get(pid))
        catch_up(client, latest, pid, states[pid].synced_round if pid in states else 0)
        return torch.cat([p.detach().reshape(-1) for p in client.params])

    zero, one, late = caught_up(0), caught_up(1), caught_up(2)  # client 2 never trained
    assert torch.allclose(zero, one, atol=1e-6) and torch.allclose(zero, late, atol=1e-6)
    pristine, _ = make_client(c.config, 2, None)  # a process's one working bottom, reset from disk
    assert not torch.allclose(late, torch.cat([p.detach().reshape(-1) for p in pristine.params]))
    if rows == "batch":  # rows no batch used are exactly the pristine ones after replay
        original = pristine.bottom.body.get_input_embeddings().weight.detach().clone()
        replayed, _ = make_client(c.config, 2, None)
        catch_up(replayed, latest, 2, 0)
        embedding = replayed.bottom.body.get_input_embeddings().weight
        changed = (embedding != original).any(1)
        assert 0 < int(changed.sum()) < embedding.shape[0]


def test_federated_eval_shards_cover_the_split(coord):
    c = coord()
    counts = []
    for shard in range(3):
        session, message = c.open(shard, 1, split="dev", shard=shard, num_shards=3)
        counts.append(run_eval_session(SessionRequest(message), ClientSide(c.config, shard, 3, None)).count)
        c.finish_eval(session)
    assert sum(counts) == 32 and max(counts) - min(counts) <= 1


def test_fedavg_weights_by_steps():
    assert fedavg([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], [3, 1])["w"].tolist() == [0.75, 0.75]


def test_selection_is_seeded_fraction_with_minimum(coord):
    c = coord(**{"fraction-train": 0.5, "min-clients": 2})
    ids = list(range(10))
    assert len(c.select(ids, 1)) == 5 and c.select(ids, 1) == c.select(ids, 1) != c.select(ids, 2)
    c2 = coord(**{"fraction-train": 0.1, "min-clients": 3})
    assert len(c2.select(ids, 1)) == 3


def test_client_trains_on_its_own_local_data_dir(coord, tmp_path):
    import gzip

    own = tmp_path / "node0"
    (own / "sst2").mkdir(parents=True)
    rows = "sentence\tlabel\n" + "".join(f"a truly great film number {i}\t1\nan awful mess {i}\t0\n" for i in range(20))
    with gzip.open(own / "sst2" / "train.tsv.gz", "wt") as fh:
        fh.write(rows)
    c = coord()
    session, message = c.open(0, 1)
    report, state = run_session(
        SessionRequest(message), ClientSide(c.config, 0, 3, None, node=NodeSettings(data_dir=str(own)))
    )
    assert report.steps == 2 and state.steps == 2
    _, message_p = c.open(0, 1)
    partition_report, _ = run_session(SessionRequest(message_p), ClientSide(c.config, 0, 3, None))
    assert report.losses != partition_report.losses  # the node's own sentences, not its partition
    session2, message2 = c.open(1, 1)
    with pytest.raises(ValueError, match="data-dir"):
        run_session(
            SessionRequest(message2),
            ClientSide(c.config, 1, 3, None, node=NodeSettings(data_dir=str(tmp_path / "missing"))),
        )


def test_abrupt_disconnect_drops_session_and_rolls_back(coord):
    import time

    c = coord()
    committed = server_weights(c)
    session, message = c.open(0, 1)
    client, data = make_client(c.config, 0, None)
    link = StepStreamClient(message.address, message.token)
    client.train_step(BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0), link)
    assert any(not torch.equal(a, b) for a, b in zip(committed, server_weights(c)))
    link._channel.close()  # the client vanishes without ending its stream
    deadline = time.time() + 10
    while session.status in ("open", "failing") and time.time() < deadline:
        time.sleep(0.05)
    assert session.status == "failed" and "disconnected" in session.reason
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(committed, server_weights(c)))


def test_every_end_of_a_session_frees_what_the_server_buffered_for_it(coord, train_report):
    """A client that streamed perturbed parts and then closed cleanly, or failed, mid-step leaves no
    buffered activation on the server."""
    from fl_app.local_transport import InProcessLink
    from fl_app.scenario import build_client, build_server, load_split, load_task_data

    c = coord()
    loaded, bottom, top = load_split(c.config)
    data = load_task_data(c.config, loaded)
    recorder = InProcessLink(build_server(c.config, top, 2).handle_bytes, threaded=False, record=True)
    build_client(c.config, bottom, 0).train_step(
        BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0), recorder
    )
    part = recorder.frames[0]  # the step's first perturbed part: the server buffers it until its partner
    for ending in ("clean", "failed"):
        session, _ = c.open(0, 1)
        c.handle(session.token, part)
        assert session.token in c.server.pending
        c.finish_train(session, train_report(steps=0) if ending == "clean" else None, "test")
        assert session.token not in c.server.pending and session.token not in c.server.proxies


def test_with_a_server_secret_only_the_node_holding_its_key_trains(coordinators, tmp_path):
    """stream-secret-file on the server, stream-key-file on the node (both written by the CLI): a
    node without its key is told what to set, another node's key is refused and counted in
    results.json, the right key trains."""
    secret, key0, key1 = (str(tmp_path / n) for n in ("server.secret", "node0.key", "node1.key"))
    frame_auth.main(["secret", secret])
    frame_auth.main(["node-key", secret, "0", key0])
    frame_auth.main(["node-key", secret, "1", key1])
    assert Path(key0).stat().st_mode & 0o777 == 0o600
    conf = config(**{"stream-secret-file": secret})
    c = coordinators(conf, stream_credentials(conf))
    session, message = c.open(0, 1)
    wire = json.dumps(message.to_record())
    assert message.node_auth and all(Path(f).read_text().strip() not in wire for f in (secret, key0))
    with pytest.raises(ValueError, match="set node config stream-key-file"):
        run_session(SessionRequest(message), ClientSide(c.config, 0, 3, None))
    with pytest.raises(ConnectionError, match="step stream refused: .*wrong node key"):
        run_session(
            SessionRequest(message),
            ClientSide(c.config, 0, 3, None, node=NodeSettings.from_node_config({"stream-key-file": key1})),
        )
    report, _ = run_session(
        SessionRequest(message),
        ClientSide(c.config, 0, 3, None, node=NodeSettings.from_node_config({"stream-key-file": key0})),
    )
    assert c.finish_train(session, report) and report.steps == 2
    assert json.loads(c.write_results().read_text())["refused"] == {"stream": 1}


@pytest.mark.subprocess
def test_a_node_with_its_own_ca_trusts_only_it(coordinators, tmp_path):
    """Node config stream-ca replaces the certificate in the session message: a server certificate
    from another CA fails the handshake, and a plain-text stream is refused before connecting."""
    root = Path(__file__).resolve().parents[1]
    for name in ("ours", "theirs"):
        subprocess.run(
            ["bash", str(root / "scripts/make_certs.sh"), str(tmp_path / name)], check=True, capture_output=True
        )
    conf = config(
        **{"stream-tls-cert": str(tmp_path / "ours/server.pem"), "stream-tls-key": str(tmp_path / "ours/server.key")}
    )
    c = coordinators(conf, stream_credentials(conf))
    session, message = c.open(0, 1)
    wrong_ca = NodeSettings(ca=(tmp_path / "theirs/ca.crt").read_bytes())
    with pytest.raises(ConnectionError, match="UNAVAILABLE"):
        run_session(SessionRequest(message), ClientSide(c.config, 0, 3, None, node=wrong_ca))
    right_ca = NodeSettings.from_node_config({"stream-ca": str(tmp_path / "ours/ca.crt")})
    report, _ = run_session(SessionRequest(message), ClientSide(c.config, 0, 3, None, node=right_ca))
    assert c.finish_train(session, report)
    plain = coordinators(config())
    _, plain_message = plain.open(0, 1)
    with pytest.raises(ValueError, match="stream-ca is set but the server's step stream .* is not TLS"):
        run_session(SessionRequest(plain_message), ClientSide(plain.config, 0, 3, None, node=right_ca))


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def _big_part(pid: int) -> bytes:
    """A step's first perturbed part: one unpaired 32 MiB activation (the server buffers it)."""
    from fl_app.protocol import PerturbedPart

    rows, seq = 64, 4096
    return PerturbedPart(
        torch.randn(1, rows, seq, 32),
        {"client": str(pid)},
        attention_mask=torch.ones(rows, seq, dtype=torch.long),
        labels=torch.zeros(rows, dtype=torch.long),
        score_ids=torch.tensor([[5, 6]] * rows),
    ).to_bytes()


def test_buffered_parts_are_bounded_per_session_and_in_total_and_freed_when_sessions_end(coordinators):
    """24 sessions each leave a 32 MiB part buffered (the burst that took a server from 431 MB to
    1.5 GB for good): every byte is freed, and RSS comes back, when the sessions end; past
    session-buffer-mb or server-buffer-mb a part is refused, failing only its own session."""
    big = {"batch-size": 64, "max-length": 4096}  # frames are bounded by the scenario's batch and length
    c = coordinators(config(**{"num-clients": 24, "n-train": 64, "server-buffer-mb": 24 * 35, **big}))
    before = _rss_mib()
    sessions = []
    for pid in range(24):
        session, _ = c.open(pid, 1)
        assert c.handle(session.token, _big_part(pid)) is None
        sessions.append(session)
    assert 24 * 32 * 2**20 < c.server.buffered_bytes() < 24 * 35 * 2**20  # the parts and their batch fields
    grown = _rss_mib()
    one_more, _ = c.open(0, 1)
    with pytest.raises(ProtocolError, match="over server-buffer-mb = 840"):
        c.handle(one_more.token, _big_part(0))
    assert one_more.token not in c.server.pending
    for session in sessions + [one_more]:
        c.finish_train(session, None, "ended mid-step")
    assert c.server.buffered_bytes() == 0
    after = _rss_mib()
    assert grown - before > 600 and after - before < 0.25 * (grown - before), (before, grown, after)
    small = coordinators(config(**{"session-buffer-mb": 16, **big}))
    session, _ = small.open(0, 1)
    with pytest.raises(ProtocolError, match="over session-buffer-mb = 16"):
        small.handle(session.token, _big_part(0))


def test_a_step_after_its_session_failed_is_refused_and_each_run_keeps_its_own_client_states(coord):
    """A frame that arrives after its session was failed (and rolled back) is refused rather than
    applied; two runs into one folder name different client-state folders."""
    c = coord()
    session, _ = c.open(0, 1)
    c.stream.fail(session, "step timeout")
    frame = StepRequest(
        kind="fo",
        clean=torch.zeros(2, 4, 32),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        labels=torch.tensor([0, 1]),
        score_ids=torch.tensor([[5, 6], [5, 6]]),
    ).to_bytes()
    before = server_weights(c)
    with pytest.raises(ProtocolError, match="no longer open"):
        c.handle(session.token, frame)
    assert all(torch.equal(a, b) for a, b in zip(before, server_weights(c)))
    assert c.open(0, 1)[1].state_dir != coord().open(0, 1)[1].state_dir


def test_evaluation_after_a_restart_scores_the_bottom_trained_this_round(coord):
    """A client with no state in memory (a restarted node) evaluates with the state it saved after
    this round's training, exactly as if it had kept it in memory."""
    c = coord()
    states = {}
    session_round(c, 1, [0], states)
    _, message = c.open(0, 1, split="dev", shard=0, num_shards=1)
    kept = run_eval_session(SessionRequest(message), ClientSide(c.config, 0, 3, states[0]))
    _, message = c.open(0, 1, split="dev", shard=0, num_shards=1)
    reloaded = run_eval_session(SessionRequest(message), ClientSide(c.config, 0, 3, None))
    _, message = c.open(0, 1, split="dev", shard=0, num_shards=1)
    untrained = run_eval_session(
        SessionRequest(dataclasses.replace(message, state_dir="", base="")), ClientSide(c.config, 0, 3, None)
    )
    assert reloaded == dataclasses.replace(kept, bytes_up=reloaded.bytes_up, bytes_down=reloaded.bytes_down)
    assert reloaded.loss != untrained.loss


def test_an_intruder_with_a_stolen_token_leaves_no_update_behind(coord):
    """Without node keys a token read off the wire opens the session's stream before its client:
    the intruder's steps land, but the real client is refused, its failure drops the session, and
    the rollback leaves the server as it was; the refusal is counted."""
    c = coord()
    before = server_weights(c)
    session, message = c.open(0, 1)
    intruder, data = make_client(c.config, 1, None)
    link = StepStreamClient(message.address, message.token)
    stream = BatchStream(data.encoder, data.client_examples(1), 8, 0)
    for i in range(3):
        intruder.train_step(stream.batch(i), link)
    assert any(not torch.equal(a, b) for a, b in zip(before, server_weights(c)))
    with pytest.raises(ConnectionError, match="step stream refused: .*a second stream for it"):
        run_session(SessionRequest(message), ClientSide(c.config, 0, 3, None))
    assert not c.finish_train(session, None, "client error: refused stream")  # as the ClientApp's error reply
    assert all(torch.equal(a, b) for a, b in zip(before, server_weights(c)))  # exactly as before
    with pytest.raises(ConnectionError):
        intruder.train_step(stream.batch(3), link)  # its stream was cut with the session
    link.close()
    assert c.stream.refusals() == {"stream": 1}


@pytest.mark.parametrize("examples, dev", [(0, [0, 1, 2, 3]), (3, [0, 1, 2])])
def test_evaluation_asks_only_clients_whose_shard_can_hold_an_example(tmp_path, monkeypatch, examples, dev):
    """The dev and test splits are sharded over the round's clients; with more clients than examples
    the rest would score nothing, so they get no evaluation session (training still asks all)."""
    from fl_app import train

    asked = []
    original = train.InProcessFederation.run_sessions

    def recording(self, kind, requests, window, timeout, tick, failed):
        def logged():
            for request in requests:
                asked.append((kind, request.partition_id))
                yield request

        return original(self, kind, logged(), window, timeout, tick, failed)

    monkeypatch.setattr(train.InProcessFederation, "run_sessions", recording)
    over = {"num-clients": 6, "n-dev": 4, "eval-examples": examples, "n-test": 2, "num-rounds": 1}
    results = train.run(config(**over, **{"eval-untrained": False}), tmp_path)
    assert sorted(pid for kind, pid in asked if kind == "train") == list(range(6))
    assert [pid for kind, pid in asked if kind == "evaluate"] == [*dev, 0, 1]  # dev, then test
    assert results["eval"]["history"][-1]["count"] == len(dev) and results["eval"]["test"]["count"] == 2


@pytest.mark.parametrize("across", [True, False])
def test_concurrent_sessions_over_the_stream_with_and_without_scoring_across_clients(
    coord, train_report, across, monkeypatch
):
    """Three clients (each its own bottom, as in separate processes) stream their steps at once:
    every session commits and each job of perturbed pairs is scored exactly once (together with
    other sessions' jobs when they wait at the same time)."""
    import contextlib
    import threading
    import types

    import fl_app.client_party as client_party
    from fl_app.client_session import connect
    from fl_app.scenario import build_client, load_client_bottom, load_task_data

    # torch's profiler is per process: clients in separate processes each run it, threads here cannot
    no_profile = contextlib.contextmanager(lambda device=None: (yield types.SimpleNamespace(transient_bytes=0)))
    monkeypatch.setattr(client_party, "track_peak_memory", no_profile)

    c = coord(**{"score-across-clients": across, "zo-queries": 3})
    loaded, bottom = load_client_bottom(c.config)
    data = load_task_data(c.config, loaded)
    clients = [build_client(c.config, bottom, pid) for pid in range(3)]
    losses, errors = {}, []

    def client(pid):
        try:
            session, message = c.open(pid, 1)
            link = connect(message, c.config)
            stream = BatchStream(data.encoder, data.client_examples(pid), 8, pid)
            losses[pid] = [clients[pid].train_step(stream.batch(step), link).loss for step in range(2)]
            link.close()
            assert c.finish_train(session, train_report(partition_id=pid, queries=3))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=client, args=(pid,)) for pid in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(losses) == [0, 1, 2] and c.server.steps == 6
    if across:
        assert sum(c.scorer.forwards) >= 3 * 2  # at least one job per client step, each scored once
    else:
        assert c.scorer is None


def test_a_lone_client_gets_the_same_losses_with_scoring_across_clients(coord):
    runs = []
    for across in (True, False):
        c = coord(**{"score-across-clients": across})
        session, message = c.open(0, 1)
        report, _ = run_session(SessionRequest(message), ClientSide(c.config, 0, 3, None))
        assert c.finish_train(session, report)
        runs.append((report.losses, report.grads))
    assert runs[0] == runs[1]


def test_a_round_that_breaks_off_leaves_no_session_open(coord):
    """The federation raises with two sessions opened (the grid went away): both are failed and
    closed, so nothing of theirs can land later."""
    from fl_app import rounds

    c = coord()
    sessions = []

    class Breaking:
        def partitions(self):
            return [0, 1, 2]

        def run_sessions(self, kind, requests, window, timeout, tick, failed):
            pending = iter(requests)
            sessions.extend(c.stream.sessions[next(pending).session.token] for _ in range(2))
            raise ConnectionError("the grid went away")
            yield  # a generator, as a federation's run_sessions is

    with pytest.raises(ConnectionError):
        rounds.train_round(Breaking(), c, 1)
    assert len(sessions) == 2 and all(s.status != "open" for s in sessions)


def test_long_phases_print_a_line_at_least_every_progress_interval(coord, monkeypatch, capsys):
    """A slow training session or a long evaluation is never silent for more than PROGRESS_SECONDS
    (here 0: every step and every scored batch prints), on top of the four lines per session."""
    from fl_app import client_session

    c = coord(**{"local-steps": 8})
    session, message = c.open(0, 1)
    run_session(SessionRequest(message), ClientSide(c.config, 0, 3))
    quarters = [line for line in capsys.readouterr().out.splitlines() if "client 0: step" in line]
    assert [line.split("step ")[1].split(",")[0] for line in quarters] == ["2/8", "4/8", "6/8", "8/8"]
    monkeypatch.setattr(client_session, "PROGRESS_SECONDS", 0.0)
    session, message = c.open(0, 2)
    run_session(SessionRequest(message), ClientSide(c.config, 0, 3))
    _, message = c.open(0, 2, split="dev", shard=0, num_shards=1)
    run_eval_session(SessionRequest(message), ClientSide(c.config, 0, 3))
    out = capsys.readouterr().out
    assert sum("client 0: step" in line for line in out.splitlines()) == 8
    assert "round 2 client 0: dev: 8/32 examples scored" in out and "dev: 32/32 examples scored" in out


def test_a_report_that_does_not_hold_up_is_rolled_back_and_its_client_dropped(coord, train_report):
    """The server commits a session only on a report that names the session's client, carries Q
    seeds and gradients per step and finite numbers; anything else rolls the session back."""
    import math

    c = coord()
    q = c.config.zo.queries
    cases = {
        "names client 1, the session is client 0's": train_report(partition_id=1, queries=q),
        "per-step lists differ": train_report(queries=q, step_lrs=[1e-3]),
        f"must carry {q} seeds": train_report(queries=q + 1),
        "not finite": train_report(queries=q, grads=[[math.nan] * q, [0.5] * q]),
    }
    for expected, report in cases.items():
        session, _ = c.open(0, 1)
        assert c.finish_train(session, report) is False
        assert expected in session.reason and session.reason.startswith("bad report: ")
    session, _ = c.open(0, 1)
    assert c.finish_train(session, train_report(queries=q)) is True  # a sound report commits


def _first_round_committed(c, side):
    """Client 0 trains round 1 on ``side`` and the server commits it: (its session, the state it kept)."""
    session, message = c.open(0, 1)
    report, kept = run_session(SessionRequest(message), side)
    assert c.finish_train(session, report)
    c.record_round(1, [report], [], None, 0.0)
    return session, kept


def test_a_dropped_virtual_client_is_rolled_back_and_the_next_node_starts_from_its_last_kept_state(coord):
    """A client served by a node that keeps nothing in memory (virtual clients): a session that breaks
    off mid-way leaves the server as it was and no state in the client store for its round, so the
    node that serves the client next starts from the state of its last finished round, exactly."""
    c = coord()
    side = ClientSide(c.config, 0, 3, None, NodeSettings())  # state: from the client store only
    session, kept = _first_round_committed(c, side)
    committed = server_weights(c)

    class BreaksOff:
        """The step stream, until the session's second exchange: then the node dies."""

        def __init__(self, link):
            self.link, self.exchanges = link, 0
            self.bytes_up = self.bytes_down = 0

        def send(self, payload):
            self.link.send(payload)

        def exchange(self, payload):
            self.exchanges += 1
            if self.exchanges == 2:
                raise ConnectionError("the node died")
            return self.link.exchange(payload)

        def close(self):
            self.link.close()

    session, message = c.open(0, 2)
    with pytest.raises(ConnectionError):
        run_session(SessionRequest(message), side, BreaksOff(StepStreamClient(message.address, message.token)))
    assert not c.finish_train(session, None, "the node died")
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(committed, server_weights(c)))
    store = Path(message.state_dir) / "client-0"
    assert [p.name for p in store.iterdir()] == [f"round-00001-{kept.session}.pt"]  # nothing of the broken round
    _, message = c.open(0, 3)
    again = _prepare(SessionRequest(message), side, 2)  # what the next node's session starts from
    assert again.restored_round == 1 and again.state.steps == kept.steps
    assert all(torch.equal(again.state.weights[k], v) for k, v in kept.weights.items())


def test_two_sessions_of_one_client_at_once_commit_one_and_every_node_loads_that_one(coord):
    """Issue 44 item 4: two nodes serving one client run a session each in one round (both start from
    the client's last committed state). The server commits the first to report and rolls the other
    back; the next session loads the committed one's state wherever it runs, never the newest file
    or the rolled-back state a node still holds in memory, and a node that lacks it refuses to train."""
    from fl_app.records import session_id

    c = coord()
    side = ClientSide(c.config, 0, 3, None, NodeSettings())  # state: from the client store only
    session, _ = _first_round_committed(c, side)
    (first, first_msg), (second, second_msg) = c.open(0, 2), c.open(0, 2)  # one client, two nodes
    first_report, first_state = run_session(SessionRequest(first_msg), side)
    second_report, second_state = run_session(SessionRequest(second_msg), side)  # its file is written last
    assert first_msg.base == second_msg.base == session_id(session.token)
    assert c.finish_train(first, first_report)
    assert not c.finish_train(second, second_report)
    assert "another session of client 0 was committed after this one opened" in second.reason
    assert c.committed == {0: first_state.session} and first_state.session != second_state.session
    _, message = c.open(0, 3)
    assert message.base == first_state.session
    elsewhere = _prepare(SessionRequest(message), side, 2)  # a node with nothing in memory
    holding = _prepare(SessionRequest(message), ClientSide(c.config, 0, 3, second_state, NodeSettings()), 2)
    for ready in (elsewhere, holding):
        assert ready.state.session == first_state.session and ready.state.steps == first_state.steps
        assert all(torch.equal(ready.state.weights[k], v) for k, v in first_state.weights.items())
    assert any(not torch.equal(first_state.weights[k], v) for k, v in second_state.weights.items())
    no_store = dataclasses.replace(message, state_dir="")  # a node on another disk, holding the other state
    with pytest.raises(ValueError, match=f"last committed session \\({first_state.session}\\) is not on this node"):
        _prepare(SessionRequest(no_store), ClientSide(c.config, 0, 3, second_state), 2)
