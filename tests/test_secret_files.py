"""Key files must be private and random; a session message cannot send a client's state outside
the node's state folder (or the run folder's clients/<run-id>)."""

import dataclasses
import os

import pytest

from fl_app import frame_auth
from fl_app.client_session import NodeSettings
from fl_app.frame_auth import read_key_file
from fl_app.records import SessionSettings


def key_file(tmp_path, hex_text: str, mode: int = 0o600) -> str:
    path = tmp_path / "node.key"
    path.write_text(hex_text + "\n")
    os.chmod(path, mode)
    return str(path)


def test_a_written_secret_is_accepted_and_a_readable_or_patterned_one_refused(tmp_path):
    secret = str(tmp_path / "server.secret")
    frame_auth.main(["secret", secret])
    assert len(read_key_file(secret, "stream-secret-file")) == 32
    os.chmod(secret, 0o644)
    with pytest.raises(ValueError, match=r"stream-secret-file '.*' is readable by others \(mode 644\).*chmod 600"):
        read_key_file(secret, "stream-secret-file")
    for pattern in ("00" * 32, "ab" * 32, "0102" * 16):
        with pytest.raises(ValueError, match="distinct byte values in 32 bytes: not a random key"):
            read_key_file(key_file(tmp_path, pattern), "node config stream-key-file")
    with pytest.raises(ValueError, match="holds 8 bytes; a key needs at least 16"):
        read_key_file(key_file(tmp_path, os.urandom(8).hex()), "node config stream-key-file")


def session(**over) -> SessionSettings:
    base = SessionSettings(client=0, round=1, token="t", address="127.0.0.1:1", local_steps=1)
    return dataclasses.replace(base, **{"run_id": "0123abcd", "state_dir": "/runs/a/clients/0123abcd", **over})


@pytest.mark.parametrize(
    "over, field",
    [
        ({"run_id": "../../etc"}, "run_id"),
        ({"run_id": "a/b"}, "run_id"),
        ({"state_dir": "/etc/cron.d"}, "state_dir"),
        ({"state_dir": "runs/a/clients/0123abcd"}, "state_dir"),  # relative: to wherever the node runs
        ({"state_dir": "/runs/a/clients/../../../home/clients/0123abcd"}, "state_dir"),
    ],
)
def test_a_session_cannot_place_client_states_outside_their_folder(over, field):
    with pytest.raises(ValueError, match=f"session field {field} is"):
        NodeSettings().state_folder(session(**over))


def test_state_folders_the_node_or_the_run_chooses(tmp_path):
    assert str(NodeSettings().state_folder(session())) == "/runs/a/clients/0123abcd"
    mine = NodeSettings(state_dir=str(tmp_path))
    assert mine.state_folder(session(state_dir="/anywhere/else")) == tmp_path / "0123abcd"  # the node's folder wins
    with pytest.raises(ValueError, match="session field run_id"):
        mine.state_folder(session(run_id=".."))
    assert NodeSettings().state_folder(session(state_dir="")) is None
