"""Checkpoints and results are replaced atomically (a crash mid-write never leaves a corrupt file),
and a killed run resumes to the result it would have had."""

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fl_app import train as train_cli
from fl_app.checkpoint import (
    CheckpointRefused,
    RunFolderBusy,
    RunFolderLock,
    WriteFailed,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from fl_app.config import make_config, read_scenario


def test_checkpoint_round_trip_and_crash_mid_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "server": {"w": torch.ones(3)}})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"round": 2, "server": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["round"] == 1 and torch.equal(loaded["server"]["w"], torch.ones(3))


def _failing_save(fail: Callable[[str], bool]):
    """torch.save that writes part of the file and then fails as torch does on a full disk, for the
    files whose path ``fail`` picks (the path read back from the open file)."""
    save = torch.save

    def failing(obj, fh, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{fh.fileno()}")
        if not fail(path):
            return save(obj, fh, *args, **kwargs)
        fh.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nsecond line")

    return failing


def test_a_failed_write_raises_naming_the_file_keeps_the_old_one_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "server": {"w": torch.ones(3)}})
    monkeypatch.setattr(torch, "save", _failing_save(lambda _: True))
    with pytest.raises(WriteFailed, match=r"could not write .*checkpoint.pt: RuntimeError: \[enforce fail.*0$"):
        save_checkpoint(path, {"round": 2, "server": {"w": torch.zeros(3)}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["round"] == 1


def test_a_full_disk_fails_the_run_in_one_line_marks_it_failed_and_leaves_no_temporary_files(
    tmp_path, monkeypatch, capsys, caplog
):
    """Client 0's state and the round-1 checkpoint cannot be written (torch's RuntimeError, as on a
    full disk): client 0's session stands with a warning (it used to be dropped), the run stops with
    one line and exit code 1, and results.json says failed naming the file (it used to be missing)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.fail("this test reads the path of an open file from /proc (Linux)")
    monkeypatch.setattr(torch, "save", _failing_save(lambda path: "client-0" in path or "checkpoint" in path))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([SMOKE, "--out", str(out), "--set", "client-checkpoints=true"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: could not write .*checkpoint\.pt: RuntimeError: ", err[0])
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and "checkpoint.pt" in results["error"]
    assert results["rounds"][0]["dropped"] == [] and results["rounds"][0]["clients"] == [0, 1]
    assert any(
        "cannot keep client 0's state" in r.getMessage() and "client-0" in r.getMessage() for r in caplog.records
    )
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_results_json_is_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"round": 1})
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError):
        write_json_atomic(path, {"round": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"round": 1}


ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sim_configs/smoke_tiny.toml")


def _per_round(results: dict) -> tuple[list, list]:
    steps = [(h["round"], h["client"], h["train_loss"]) for h in results["history"]]
    rounds = [(r["round"], r["train_loss"], r["accuracy"], r["clients"]) for r in results["rounds"]]
    return steps, rounds


@pytest.mark.slow
def test_a_run_killed_after_round_2_of_4_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL the local runner once round 2 is checkpointed; a new run into the same folder is
    refused, ``resume = true`` continues from the last finished round, and every per-step loss,
    round loss and dev accuracy equals those of a run that was never interrupted."""
    sets = ["num-rounds=4", "server-optimizer=adam", "server-lr=1e-3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train_cli.main([SMOKE, "--out", str(whole), *(a for s in sets for a in ("--set", s))])
    cmd = [sys.executable, "-m", "fl_app.train", SMOKE, "--out", str(killed), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if len(json.loads((killed / "results.json").read_text())["rounds"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    before = json.loads((killed / "results.json").read_text())
    assert before["status"] == "running" and 2 <= len(before["rounds"]) < 4
    with pytest.raises(SystemExit):  # a new run would overwrite the unfinished one
        train_cli.main([SMOKE, "--out", str(killed), *(a for s in sets for a in ("--set", s))])
    train_cli.main([SMOKE, "--out", str(killed), *(a for s in [*sets, "resume=true"] for a in ("--set", s))])
    resumed, uninterrupted = (json.loads((d / "results.json").read_text()) for d in (killed, whole))
    assert resumed["status"] == "finished" and resumed["resumed"][0]["after_round"] == len(before["rounds"])
    assert _per_round(resumed) == _per_round(uninterrupted)
    assert resumed["eval"]["history"] == uninterrupted["eval"]["history"]
    assert resumed["eval"]["test"] == uninterrupted["eval"]["test"]


@pytest.mark.subprocess
def test_a_run_killed_between_its_first_checkpoint_and_results_resumes_and_exports(tmp_path):
    """results.json (status running, the config) is written before round 1, so a run killed right
    after its first checkpoint.pt, before that round's results.json, leaves a folder that resume and
    export can read: the round it finished is not lost."""
    from fl_app.export import read_run

    out = tmp_path / "killed"
    kill_after_checkpoint = (
        "import os, sys; import fl_app.coordinator as c; save = c.save_checkpoint\n"
        "def save_then_die(*a, **k):\n    save(*a, **k); os._exit(9)\n"
        "c.save_checkpoint = save_then_die; from fl_app.train import main; main(sys.argv[1:])"
    )
    args = [SMOKE, "--out", str(out), "--set", "num-rounds=2"]
    done = subprocess.run([sys.executable, "-c", kill_after_checkpoint, *args], cwd=ROOT, capture_output=True)
    assert done.returncode == 9, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "running" and results["rounds"] == [] and results["config"]["num-rounds"] == 2
    assert read_run(out).round == 1  # export reads the round the checkpoint holds
    train_cli.main([*args, "--set", "resume=true"])
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed"][0]["after_round"] == 1
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]


def test_resume_refuses_a_folder_trained_with_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    train_cli.main([SMOKE, "--out", str(out), "--set", "num-rounds=1", "--set", "eval-test=false"])
    with pytest.raises(SystemExit):
        train_cli.main([SMOKE, "--out", str(out), "--set", "resume=true", "--set", "client-lr=0.5"])
    assert "trained with other settings (client-lr: 0.001 -> 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.main([SMOKE, "--set", f"resume={tmp_path / 'nothing'}"])
    assert "holds no checkpoint.pt" in capsys.readouterr().err


def test_client_states_on_disk_keep_what_a_resume_needs(tmp_path):
    """A client's states, one file per session: a session loads the one its last committed session
    wrote (not merely the newest: a rolled-back session's file is never loaded), a file goes once a
    session starting from a later round saves, and a finished run keeps the committed files only."""
    from fl_app.client_store import keep_committed_states, load_client_state, save_client_state, saved_round
    from fl_app.records import ClientState

    def state(steps, session):
        return ClientState(
            weights={"w": torch.full((2,), float(steps))},
            steps=steps,
            subset_ids=[1],
            subset_weights=[0.5],
            session=session,
        )

    a, b, c, d = (f"{i:016x}" for i in (10, 11, 12, 13))
    save_client_state(tmp_path, 3, 1, state(3, a), keep_from=1)
    save_client_state(tmp_path, 3, 2, state(6, b), keep_from=1)  # started from round 1's: it stays
    save_client_state(tmp_path, 3, 4, state(9, c), keep_from=2)  # rolled back by the server later
    files = sorted(p.name for p in (tmp_path / "client-3").iterdir())
    assert files == [f"round-00002-{b}.pt", f"round-00004-{c}.pt"]
    back = load_client_state(tmp_path, 3, upto_round=9, session=b)  # the committed one, not the newest
    assert back.steps == 6 and torch.equal(back.weights["w"], torch.full((2,), 6.0)) and back.subset_weights == [0.5]
    assert saved_round(tmp_path, 3, 9, session=b) == 2 and load_client_state(tmp_path, 3, 9).steps == 9
    assert (
        load_client_state(tmp_path, 3, 9, session=a) is None and load_client_state(tmp_path, 3, 9, session="") is None
    )
    assert load_client_state(tmp_path, 4, 9, session=b) is None
    save_client_state(tmp_path, 5, 2, state(2, d), keep_from=2)
    (tmp_path / "client-notes").mkdir()  # not a client's folder: left alone
    assert keep_committed_states(tmp_path, {3: b, 5: d}) == 1  # the run finished: each client's committed state
    assert [p.name for p in (tmp_path / "client-3").iterdir()] == [f"round-00002-{b}.pt"]
    assert [p.name for p in (tmp_path / "client-5").iterdir()] == [f"round-00002-{d}.pt"]
    assert keep_committed_states(tmp_path / "none", {}) == 0
    (tmp_path / "client-3" / f"round-00002-{b}.pt").rename(tmp_path / "client-3" / f"round-00002-{a}.pt")
    with pytest.raises(CheckpointRefused, match=f"holds the state of session '{b}', not {a}"):
        load_client_state(tmp_path, 3, 9, session=a)


def test_a_finished_run_keeps_each_clients_final_state_only(tmp_path):
    config = make_config({**read_scenario("sim_configs/smoke_tiny.toml"), "num-rounds": 3, "eval-test": False})
    train_cli.run(config, tmp_path)
    (folder,) = (tmp_path / "clients").iterdir()  # the run's own
    committed = read_checkpoint(tmp_path / "checkpoint.pt")["committed"]
    assert sorted(committed) == [0, 1]
    for client in (0, 1):
        assert [p.name for p in (folder / f"client-{client}").iterdir()] == [f"round-00003-{committed[client]}.pt"]


def test_a_checkpoint_with_empty_byte_strings_loads_as_a_synced_lora_run_writes_it(tmp_path):
    """A synced ZO history with no embedding rows holds b"" per step, which pickle writes as a call to
    ``bytes``: the checkpoint must load (a resume of such a run failed here before)."""
    out = tmp_path / "run"
    train_cli.main([SMOKE, "--out", str(out), "--set", "bottoms=synced", "--set", "client-params=lora"])
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["history"]["rows"] and set(saved["history"]["rows"]) == {b""}


def test_a_second_run_into_a_folder_in_use_is_refused_before_training(tmp_path, capsys):
    """A run holds its folder (an OS lock, released however the run ends): a second run into the same
    folder is refused with one line and exit code 2 before it trains or writes anything."""
    out = tmp_path / "run"
    holder = RunFolderLock(out)  # a run already going there, as far as the lock is concerned
    try:
        with pytest.raises(SystemExit) as refused:
            train_cli.main([SMOKE, "--out", str(out)])
        assert refused.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {os.getpid()})" in err[0]
        assert not (out / "results.json").exists() and not (out / "checkpoint.pt").exists()
        with pytest.raises(RunFolderBusy):
            RunFolderLock(out)
    finally:
        holder.release()
    train_cli.main([SMOKE, "--out", str(out), "--set", "num-rounds=1"])  # free again: the run goes ahead
    assert json.loads((out / "results.json").read_text())["status"] == "finished"
    RunFolderLock(out).release()  # and the finished run let go of it


class _NotPlain:  # pickled into a checkpoint, it needs code to load: refused unread
    pass


def _tamper_cases():
    def scalar(saved):
        name = next(iter(saved["server"]))
        saved["server"][name] = torch.tensor(0.5)
        return f"{name} is (), expected a float tensor of shape"

    def nan(saved):
        name = next(iter(saved["server"]))
        saved["server"][name] = torch.full_like(saved["server"][name], float("nan"))
        return f"{name} holds values that are not finite"

    def far_round(saved):
        saved["round"] = 999
        return "the checkpoint says round 999, its results end at round 1"

    def unknown_keys(saved):
        saved["extra"] = 1
        return "is not a checkpoint of this project"

    return {"scalar": scalar, "nan": nan, "far-round": far_round, "unknown-keys": unknown_keys}


@pytest.mark.parametrize("case", ["scalar", "nan", "far-round", "unknown-keys", "truncated", "empty", "pickled"])
def test_a_tampered_checkpoint_is_refused_with_one_line_and_the_run_marked_failed(tmp_path, capsys, case):
    out = tmp_path / "run"
    train_cli.main([SMOKE, "--out", str(out), "--set", "num-rounds=1"])
    path = out / "checkpoint.pt"
    if case in _tamper_cases():
        saved = load_checkpoint(path)
        expected = _tamper_cases()[case](saved)
        save_checkpoint(path, saved)
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        expected = "is not a readable checkpoint"
    elif case == "empty":
        path.write_bytes(b"")
        expected = "is not a readable checkpoint"
    else:
        torch.save({"round": _NotPlain()}, path)
        expected = "holds objects other than tensors and plain values (not read)"
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train_cli.main([SMOKE, "--out", str(out), "--set", "num-rounds=1", "--set", "resume=true"])
    assert refused.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "weights_only" not in err[0], err
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and expected in results["error"]
    assert results["rounds"] and results["rounds"][0]["round"] == 1  # what the run had is kept


def test_a_client_state_that_is_not_the_bottoms_is_refused(tmp_path):
    from fl_app.client_session import restore
    from fl_app.records import ClientState
    from fl_app.scenario import build_client, load_split

    config = make_config(read_scenario(SMOKE))
    _, bottom, _ = load_split(config)
    client = build_client(config, bottom, 0)
    named = {n: p for n, p in client.bottom.named_parameters() if p.requires_grad}
    name = next(iter(named))
    with pytest.raises(ValueError, match=f"saved client state: {name} is \\(\\), expected a float tensor"):
        restore(client, ClientState(weights={**{n: p.detach() for n, p in named.items()}, name: torch.tensor(0.0)}))
    nan = {n: torch.full_like(p, float("nan")) for n, p in named.items()}
    with pytest.raises(ValueError, match="holds values that are not finite"):
        restore(client, ClientState(weights=nan))


def test_the_final_test_evaluation_says_it_is_running_before_it_runs(tmp_path, capsys):
    """Issue 45: no silence after the last round: a line says the test split (and the swap
    evaluation) is being scored before the scores come."""
    config = make_config({**read_scenario("sim_configs/smoke_tiny.toml"), "num-rounds": 1})
    train_cli.run(config, tmp_path)
    out = capsys.readouterr().out
    said = out.index("[hosl] testing: 2 clients score the test split with the final model, and the final top over")
    assert said < out.index("[hosl] test accuracy") and out.index("[hosl] round 1:") < said
