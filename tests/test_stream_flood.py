"""Streams that prove nothing cost the server no worker slot: a flood of them during a round (TLS and
node keys on) leaves every legitimate session of the round to complete, and is logged in a few lines."""

import logging
import secrets
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from fl_app import frame_auth
from fl_app.client_session import ClientSide, NodeSettings, run_session
from fl_app.config import make_config, read_scenario
from fl_app.coordinator import stream_credentials
from fl_app.records import SessionRequest
from fl_app.stream import METHOD, PROOF_KEY, TOKEN_KEY

ROOT = Path(__file__).resolve().parents[1]
FLOODERS = 16


def _flood(address: str, ca: bytes, stop: threading.Event, codes: list[grpc.StatusCode]) -> None:
    """Open streams with made-up tokens, one after another, until told to stop."""
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
    call = channel.stream_stream(METHOD)
    while not stop.is_set():
        metadata = ((TOKEN_KEY, secrets.token_hex(16)), (PROOF_KEY, secrets.token_hex(32)))
        try:
            for _ in call(iter([b"x" * 64]), metadata=metadata, timeout=5):
                pass
        except grpc.RpcError as err:
            codes.append(err.code())
    channel.close()


@pytest.mark.subprocess
def test_a_flood_of_unauthenticated_streams_leaves_every_session_of_the_round_to_complete(
    coordinators, tmp_path, caplog
):
    subprocess.run(
        ["bash", str(ROOT / "scripts/make_certs.sh"), str(tmp_path / "certs")], check=True, capture_output=True
    )
    secret = str(tmp_path / "server.secret")
    frame_auth.main(["secret", secret])
    conf = make_config(
        {
            **read_scenario("sim_configs/smoke_tiny.toml"),
            "num-clients": 4,
            "local-steps": 3,
            "stream-workers": 2,  # few slots: before pre-stream authentication the flood held them all
            "stream-tls-cert": str(tmp_path / "certs/server.pem"),
            "stream-tls-key": str(tmp_path / "certs/server.key"),
            "stream-secret-file": secret,
        }
    )
    c = coordinators(conf, stream_credentials(conf))
    ca = (tmp_path / "certs/ca.crt").read_bytes()
    stop, codes = threading.Event(), []
    flooders = [threading.Thread(target=_flood, args=(c.advertised_address, ca, stop, codes)) for _ in range(FLOODERS)]
    caplog.set_level(logging.WARNING, logger="fl_app.stream")
    for t in flooders:
        t.start()
    try:
        while len(codes) < 2 * FLOODERS:  # the flood is under way before the round starts
            time.sleep(0.01)
        done = []
        for pid in range(4):
            key = str(tmp_path / f"node{pid}.key")
            frame_auth.main(["node-key", secret, str(pid), key])
            session, message = c.open(pid, 1)
            node = NodeSettings.from_node_config({"stream-key-file": key, "stream-ca": str(tmp_path / "certs/ca.crt")})
            report, _ = run_session(SessionRequest(message), ClientSide(c.config, pid, 4, None, node=node))
            done.append(c.finish_train(session, report) and report.steps == 3)
    finally:
        stop.set()
        for t in flooders:
            t.join()
    assert done == [True] * 4
    refused = c.stream.refusals()["stream"]
    assert refused >= 2 * FLOODERS and set(codes) == {grpc.StatusCode.UNIMPLEMENTED}
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(lines) <= 5 and refused > 5 * len(lines)  # counted every time, logged once per interval
