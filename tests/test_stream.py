"""gRPC step stream: authenticated sessions and frames, malformed frames end one session only, rollback."""

import threading

import grpc
import pytest
import torch

from fl_app.frame_auth import (
    FROM_CLIENT,
    FROM_SERVER,
    OVERHEAD,
    FrameOpener,
    FrameRefused,
    FrameSealer,
    node_key,
    session_key,
)
from fl_app.protocol import ProtocolError
from fl_app.server_party import UpdateLedger
from fl_app.stream import StepStreamClient, StepStreamServer


def echo_handler(token, payload):
    if payload.startswith(b"bad"):
        raise ProtocolError("field 'clean' has shape [1], expected [rows, seq_len, 8]")
    return payload[::-1]


@pytest.fixture
def server():
    srv = StepStreamServer(echo_handler, port=0)
    yield srv
    srv.stop()


def test_session_exchanges_frames_and_counts_bytes(server):
    session = server.open_session("c0")
    client = StepStreamClient(server.address, session.token)
    assert client.exchange(b"abc") == b"cba"
    assert client.exchange(b"12345") == b"54321"
    client.close()
    # wire bytes: two frames and the close frame up, two replies down, each sealed (counter + MAC)
    # and the accept frame (an empty payload) down first
    assert session.steps == 2 and session.bytes_up == 8 + 3 * OVERHEAD and session.bytes_down == 8 + 3 * OVERHEAD
    assert client.bytes_down == session.bytes_down
    assert server.close_session(session).status == "done"


def test_stream_ending_without_close_frame_fails_the_session(server):
    """A half-closed stream without the close frame (as a cut connection may look) is a disconnect."""
    failed = []
    server.on_failure = failed.append
    session = server.open_session("c0")
    client = StepStreamClient(server.address, session.token)
    assert client.exchange(b"abc") == b"cba"
    client._outbox.put(None)  # half-close only
    assert list(client._responses) == []
    assert session.status == "failed" and "disconnected" in session.reason and failed == [session]
    client._channel.close()


def test_stream_without_valid_token_is_refused_before_it_is_served(server):
    session = server.open_session("c0")
    with pytest.raises(ConnectionError, match="step stream refused: unknown or closed session token"):
        StepStreamClient(server.address, "not-the-token")
    with pytest.raises(ConnectionError, match="step stream refused"):  # the right token without its key's proof
        StepStreamClient(server.address, session.token, node_key=b"k" * 32)
    assert server.refusals() == {"stream": 2} and session.status == "open" and session.context is None


def test_a_client_refused_for_lack_of_a_worker_slot_retries_until_admitted():
    """One slot, held by a session: a second session's stream is refused (RESOURCE_EXHAUSTED) and
    retries with back-off; when the first session closes, the second is admitted and served."""
    srv = StepStreamServer(echo_handler, port=0, max_workers=1)
    try:
        first, second = srv.open_session("a"), srv.open_session("b")
        holder, closed = StepStreamClient(srv.address, first.token), threading.Event()
        threading.Timer(0.5, lambda: (holder.close(), closed.set())).start()
        waiting = StepStreamClient(srv.address, second.token, admission_s=30)
        assert closed.is_set() and second.context is not None  # admitted only once the slot was free
        assert waiting.exchange(b"abc") == b"cba"
        waiting.close()
        with pytest.raises(ConnectionError, match="RESOURCE_EXHAUSTED"):  # and gives up at its deadline
            third = srv.open_session("c")
            blocker = StepStreamClient(srv.address, third.token)
            StepStreamClient(srv.address, srv.open_session("d").token, admission_s=0.3)
        blocker.close()
    finally:
        srv.stop()


def test_malformed_frame_ends_only_that_session(server):
    failed = []
    server.on_failure = failed.append
    bad, good = server.open_session("bad"), server.open_session("good")
    bad_client, good_client = StepStreamClient(server.address, bad.token), StepStreamClient(server.address, good.token)
    with pytest.raises(ConnectionError, match="INVALID_ARGUMENT.*clean"):
        bad_client.exchange(b"bad frame")
    assert good_client.exchange(b"still here") == b"ereh llits"
    assert bad.status == "failed" and "clean" in bad.reason and failed == [bad]
    assert good.status == "open"
    for c in (bad_client, good_client):
        c.close()


def test_oversized_frame_is_refused():
    srv = StepStreamServer(echo_handler, port=0, max_message_bytes=1024)
    try:
        session = srv.open_session("c")
        client = StepStreamClient(srv.address, session.token)
        with pytest.raises(ConnectionError, match="RESOURCE_EXHAUSTED"):
            client.exchange(b"x" * 4096)
        client.close()
    finally:
        srv.stop()


def test_idle_session_expires_only_once_connected(server):
    session = server.open_session("slow")
    queued = server.open_session("queued")  # never connects: bounded by the round timeout, not this one
    client = StepStreamClient(server.address, session.token)
    client.exchange(b"x")
    session.last_activity -= 100
    assert server.expire_idle(timeout=10) == [session] and queued.status == "open"
    client.close()
    assert session.status == "failed" and "timeout" in session.reason


def test_ledger_rolls_back_only_the_failed_session():
    w = torch.nn.Parameter(torch.zeros(3))
    ledger = UpdateLedger([w])
    for key, delta in (("a", 1.0), ("b", 10.0), ("a", 2.0)):
        done = ledger.track(key)
        with torch.no_grad():
            w.add_(delta)
        done()
    assert w.tolist() == [13.0] * 3
    assert ledger.rollback("a") == "subtracted" and w.tolist() == [10.0] * 3  # no replays recorded: a's deltas off
    ledger.commit("b")
    assert ledger.rollback("b") == "" and w.tolist() == [10.0] * 3


@pytest.mark.subprocess
def test_certificates_name_the_addresses_clients_use(tmp_path):
    """scripts/make_certs.sh DIR NAME...: the server certificate is valid for each given IP or DNS name
    (a second machine reaches the server at its own address, not 127.0.0.1)."""
    import subprocess
    from pathlib import Path

    from cryptography import x509

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        ["bash", str(root / "scripts/make_certs.sh"), str(tmp_path), "10.1.2.3", "server.example"],
        check=True,
        capture_output=True,
    )
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["server.example"]


@pytest.mark.subprocess
def test_tls_stream_with_self_signed_certificates(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", str(root / "scripts/make_certs.sh"), str(tmp_path)], check=True, capture_output=True)
    cert, key, ca = ((tmp_path / n).read_bytes() for n in ("server.pem", "server.key", "ca.crt"))
    srv = StepStreamServer(echo_handler, port=0, tls_cert=cert, tls_key=key)
    try:
        session = srv.open_session("c")
        secure = StepStreamClient(srv.address, session.token, root_certificate=ca)
        assert secure.exchange(b"tls") == b"slt"
        secure.close()
        with pytest.raises(ConnectionError, match="UNAVAILABLE"):
            StepStreamClient(srv.address, session.token)
    finally:
        srv.stop()


def test_ledger_without_replays_subtracts_an_interleaved_sessions_optimizer_state():
    """With another session's steps in between and nothing to replay them with (the fallback once
    the journal overflows), rollback subtracts the failed session's own deltas from the weights and
    from Adam's state: its step count goes back to the other session's."""
    w = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([w], lr=0.1)
    ledger = UpdateLedger([w], adam)
    for key in ("a", "b", "a"):
        done = ledger.track(key)
        w.grad = torch.ones(3)
        adam.step()
        done()
    assert float(adam.state[w]["step"]) == 3
    weights_before = w.detach().clone()
    assert ledger.rollback("a") == "subtracted"  # not exact: b stepped in between
    assert float(adam.state[w]["step"]) == 1 and not torch.equal(w.detach(), weights_before)
    # b's snapshot holds a's first step, which was subtracted since: b cannot be restored from it either
    assert ledger.rollback("b") == "subtracted" and ledger.rollback("b") == ""
    assert float(adam.state[w]["step"]) == 0 and ledger.journal == []


def test_ledger_replays_the_other_sessions_steps_exactly_and_forgets_a_session_with_no_completed_step():
    """a, b, a, b with Adam, then a fails: b's steps are replayed from a's snapshot, so the weights,
    Adam's state and the owner's step counter equal b's steps alone; c, whose first step never
    completed, has nothing left to undo."""

    def adam_steps(grads: list[float]) -> tuple[torch.nn.Parameter, torch.optim.Adam]:
        w = torch.nn.Parameter(torch.ones(3))
        adam = torch.optim.Adam([w], lr=0.1)
        for g in grads:
            w.grad = torch.full((3,), g)
            adam.step()
        return w, adam

    w = torch.nn.Parameter(torch.ones(3))
    adam, count = torch.optim.Adam([w], lr=0.1), {"n": 0}
    ledger = UpdateLedger([w], adam, counter=lambda: count["n"])

    def step(g: float):
        def apply() -> None:
            w.grad = torch.full((3,), g)
            adam.step()
            count["n"] += 1

        return apply

    for key, g in (("a", 1.0), ("b", 2.0), ("a", 3.0), ("b", 4.0)):
        apply = step(g)
        done = ledger.track(key, apply, size=12)
        apply()
        done()
    ledger.track("c")  # its step raised before completing: no done()
    assert ledger.rollback("a", restore=lambda n: count.update(n=n)) == "exact"
    alone, alone_adam = adam_steps([2.0, 4.0])
    assert torch.equal(w, alone) and count["n"] == 2
    assert torch.equal(adam.state[w]["exp_avg"], alone_adam.state[alone]["exp_avg"])
    assert ledger.rollback("c") == "" and ledger.rollback("b", restore=lambda n: count.update(n=n)) == "exact"
    assert w.tolist() == [1.0] * 3 and count["n"] == 0 and ledger.journal == []


class _LedgerOwner:
    """A toy server: one parameter, Adam (or plain SGD on a linear loss, where subtracting is exact),
    and a step counter the loss depends on, as the ZO server's seeds do."""

    def __init__(self, optimizer: str, journal_bytes: int | None):
        self.p = torch.nn.Parameter(torch.linspace(-1, 1, 4))
        self.linear = optimizer == "sgd"
        self.opt = torch.optim.SGD([self.p], lr=0.1) if self.linear else torch.optim.Adam([self.p], lr=0.05)
        self.steps = 0
        self.ledger = UpdateLedger([self.p], self.opt, journal_bytes, counter=lambda: self.steps)

    @torch.enable_grad()
    def apply(self, op: tuple[str, int]) -> None:
        self.steps += 1
        self.opt.zero_grad()
        target = torch.tensor([float(hash((*op, j)) % 7 - 3) for j in range(4)])
        loss = (self.p * target).sum() if self.linear else ((self.p - target) ** 2 * (1 + self.steps % 3)).sum()
        loss.backward()
        self.opt.step()

    def step(self, session: str, index: int) -> None:
        done = self.ledger.track(session, lambda op=(session, index): self.apply(op), size=10)
        self.apply((session, index))
        done()

    def rollback(self, session: str) -> str:
        return self.ledger.rollback(session, restore=lambda counter: setattr(self, "steps", counter))


@pytest.mark.parametrize("optimizer, journal_bytes", [("adam", None), ("sgd", 15)])
def test_ledger_rollbacks_of_random_interleavings_equal_replaying_only_the_surviving_sessions(optimizer, journal_bytes):
    """Up to 4 sessions open, random steps, commits and rollbacks: the state always equals a server
    that applied only the steps of sessions that did not fail (the step counter too, unless a
    rollback had to subtract); with a small journal some rollbacks subtract, exact for SGD here."""
    import random

    modes: set[str] = set()
    for seed in range(60):
        rng, owner = random.Random(seed), _LedgerOwner(optimizer, journal_bytes)
        history, failed, open_, counts, mine = [], set(), [], {}, set()
        for n in range(40):
            r = rng.random()
            if (r < 0.25 or not open_) and len(open_) < 4:
                open_.append(f"s{n}")
                counts[f"s{n}"] = 0
                continue
            session = rng.choice(open_)
            if r < 0.75:
                owner.step(session, counts[session])
                history.append((session, counts[session]))
                counts[session] += 1
            else:
                open_.remove(session)
                if r < 0.87:
                    owner.ledger.commit(session)
                else:
                    failed.add(session)
                    mine.add(owner.rollback(session))
        reference = _LedgerOwner(optimizer, None)
        for op in history:
            if op[0] not in failed:
                reference.apply(op)
        assert torch.allclose(owner.p, reference.p, atol=1e-5), (seed, owner.p, reference.p)
        assert owner.steps == reference.steps or "subtracted" in mine
        modes |= mine
    assert "exact" in modes and ("subtracted" in modes) == (journal_bytes is not None)


def test_a_session_token_opens_one_stream_only(server):
    """A copied token cannot open a second stream beside the client's, nor a new one after it closed."""
    session = server.open_session("c0")
    client = StepStreamClient(server.address, session.token)
    assert client.exchange(b"abc") == b"cba"
    with pytest.raises(ConnectionError, match="step stream refused"):
        StepStreamClient(server.address, session.token)
    assert client.exchange(b"xyz") == b"zyx" and session.status == "open"  # the client's stream goes on
    client.close()
    with pytest.raises(ConnectionError, match="step stream refused"):
        StepStreamClient(server.address, session.token)
    assert session.steps == 2 and server.refusals() == {"stream": 2}


def _rpc_code(client: StepStreamClient) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        next(client._responses)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("attack", ["replayed", "out-of-order", "altered", "counter-altered"])
def test_a_replayed_reordered_or_altered_frame_fails_the_session_and_is_counted(server, attack):
    """Frames carry a counter and a MAC: the same frame twice, a skipped counter or a flipped byte is
    refused, logged and counted, and the session is failed (so its updates are rolled back)."""
    failed = []
    server.on_failure = failed.append
    session = server.open_session("c0")
    client = StepStreamClient(server.address, session.token)
    first = client._sealer.seal(b"abc")
    client._outbox.put(first)
    assert client._opener.open(next(client._responses)) == b"cba"
    if attack == "replayed":
        client._outbox.put(first)
    elif attack == "out-of-order":
        client._sealer.counter += 1
        client.send(b"skips one")
    else:  # flip a payload byte, or the counter's last byte (a replay relabelled as the next frame)
        frame = bytearray(first if attack == "counter-altered" else client._sealer.seal(b"abc"))
        frame[7 if attack == "counter-altered" else 9] ^= 1
        client._outbox.put(bytes(frame))
    code, details = _rpc_code(client)
    assert code == grpc.StatusCode.UNAUTHENTICATED and ("bad MAC" if "altered" in attack else attack) in details
    assert session.status == "failed" and failed == [session] and session.steps == 1
    assert server.refusals() == {"frame": 1}
    client.close()


def test_with_node_keys_a_token_alone_opens_nothing(server):
    """When the server authenticates nodes, the session key needs the node's key: a token read off
    the wire (or another node's key) is refused without taking the session's stream slot."""
    secret = b"s" * 32
    session = server.open_session("0", node_key=node_key(secret, 0))
    for thief_key in (None, node_key(secret, 1)):
        with pytest.raises(ConnectionError, match="step stream refused: .*wrong node key"):
            StepStreamClient(server.address, session.token, node_key=thief_key)
    client = StepStreamClient(server.address, session.token, node_key=node_key(secret, 0))
    assert client.exchange(b"mine") == b"enim" and session.status == "open"
    client.close()
    assert server.refusals() == {"stream": 2} and session.steps == 1


def test_surplus_streams_on_one_token_do_not_starve_other_clients():
    """Eight streams on one token against a server with two workers: all refused before they take a
    worker, and another client is still served (surplus streams used to hold every worker)."""
    srv = StepStreamServer(echo_handler, port=0, max_workers=2)
    try:
        victim, other = srv.open_session("a"), srv.open_session("b")
        owner = StepStreamClient(srv.address, victim.token)
        assert owner.exchange(b"a") == b"a"
        for _ in range(8):
            with pytest.raises(ConnectionError, match="step stream refused"):
                StepStreamClient(srv.address, victim.token)
        answers = []
        worker = threading.Thread(target=lambda: answers.append(StepStreamClient(srv.address, other.token)))
        worker.start()
        worker.join(60)
        client = answers[0]
        done = threading.Thread(target=lambda: answers.append(client.exchange(b"served")))
        done.start()
        done.join(60)
        assert answers[1:] == [b"devres"]
        client.close()
        owner.close()
        assert srv.refusals() == {"stream": 8}
    finally:
        srv.stop()


def test_frames_are_bound_to_their_direction_key_and_order():
    """A client frame reflected back as a server reply, a reply sealed with another session's key,
    and a reply out of order are all refused by the opener (the client then drops the stream)."""
    key, other = session_key("t1"), session_key("t2")
    client_frame = FrameSealer(key, FROM_CLIENT).seal(b"activations")
    with pytest.raises(FrameRefused, match="bad MAC"):
        FrameOpener(key, FROM_SERVER).open(client_frame)
    with pytest.raises(FrameRefused, match="bad MAC"):
        FrameOpener(key, FROM_SERVER).open(FrameSealer(other, FROM_SERVER).seal(b"losses"))
    sealer, opener = FrameSealer(key, FROM_SERVER), FrameOpener(key, FROM_SERVER)
    first, second = sealer.seal(b"1"), sealer.seal(b"2")
    with pytest.raises(FrameRefused, match="out-of-order frame: counter 1, expected 0"):
        opener.open(second)
    assert opener.open(first) == b"1" and opener.open(second) == b"2"
    with pytest.raises(FrameRefused, match="shorter"):
        opener.open(b"x" * 10)


def test_streams_beyond_the_worker_count_are_refused_at_once_not_queued():
    """With stream-workers = 2 and two streams being served, a third is refused with
    RESOURCE_EXHAUSTED (it used to wait for a worker, as long as the others idled); its client retries
    until its admission deadline, then says so."""
    srv = StepStreamServer(echo_handler, port=0, max_workers=2)
    try:
        sessions = [srv.open_session(f"c{i}") for i in range(3)]
        busy = [StepStreamClient(srv.address, s.token) for s in sessions[:2]]
        assert [c.exchange(b"ab") for c in busy] == [b"ba", b"ba"]
        errors = []

        def try_third() -> None:
            try:
                StepStreamClient(srv.address, sessions[2].token, admission_s=0.5)
            except ConnectionError as err:
                errors.append(str(err))

        attempt = threading.Thread(target=try_third, daemon=True)
        attempt.start()
        attempt.join(60)  # queued, it would wait until a busy stream ends
        assert len(errors) == 1 and "RESOURCE_EXHAUSTED" in errors[0]
        for c in busy:
            c.close()
    finally:
        srv.stop()
