"""The bad-input table: each case is one line naming the field and value, exit code 2, before any
training (the output folder stays empty), from both command-line entry points."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app import config_cli
from fl_app import train as train_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "sim_configs/smoke_tiny.toml")


@pytest.fixture
def corrupt_data(tmp_path) -> Path:
    """A copy of the SST-2 files with the dev file cut short (a broken download)."""
    shutil.copytree(ROOT / "data/sst2", tmp_path / "data/sst2")
    dev = tmp_path / "data/sst2/dev.tsv.gz"
    dev.write_bytes(dev.read_bytes()[:3000])
    return tmp_path / "data"


CASES = [
    (["task=foo"], "unknown task 'foo' (field 'task')"),
    (["model=tiny-gpt"], "unknown tiny model 'tiny-gpt' (field 'model')"),
    (["model=package:nope"], "unknown packaged model 'package:nope' (field 'model')"),
    (["cut-layer=5"], "cut-layer must be an integer in [0, 4] for this model, got 5"),
    (["num-clients=100"], "num-clients 100 needs at least 100 examples, have 64 (n-train)"),
    (["zo-queries=x"], "config key 'zo-queries' expects int, got 'x'"),
    (["mode=zo-fo"], "config key 'mode' must be one of"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["batch-size=0"], "config key 'batch-size' must be in [1, 65536], got 0"),
    (["stream-host=0.0.0.0"], "'stream-host' = '0.0.0.0' listens on every interface, but clients need an address"),
    (["stream-tls-cert=server.pem"], "'stream-tls-cert' and 'stream-tls-key' go together"),
]


def one_line_error(capsys, run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("overrides, message", CASES, ids=[c[0][0] for c in CASES])
def test_config_check_and_local_runner_refuse_bad_input_in_one_line(capsys, tmp_path, overrides, message):
    assert message in one_line_error(capsys, lambda: config_cli.main([SMOKE, *overrides]))
    out = tmp_path / "run"
    args = [SMOKE, "--out", str(out)] + [a for o in overrides for a in ("--set", o)]
    assert message in one_line_error(capsys, lambda: train_cli.main(args))
    assert not out.exists()  # refused before anything ran


@pytest.mark.subprocess
def test_argument_and_key_errors_are_answered_before_torch_loads():
    """hosl-config and hosl-export answer a mistyped key or a missing argument in a fraction of a
    second: torch and transformers are imported only for what needs them (issue 45)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from fl_app import config_cli, export_cli\n"
        "for main, args in ((config_cli.main, [{smoke!r}, 'cut_layer=2']), (export_cli.main, [])):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 2, exit.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    ).format(smoke=SMOKE)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stderr
    assert "did you mean 'cut-layer'?" in proc.stderr and "the following arguments are required: run_dir" in proc.stderr


def test_missing_scenario_file_and_corrupt_data_file_are_named(capsys, tmp_path, corrupt_data):
    assert "scenario file not found: nope.toml" in one_line_error(capsys, lambda: config_cli.main(["nope.toml"]))
    err = one_line_error(capsys, lambda: config_cli.main([SMOKE, f"data-dir={corrupt_data}"]))
    assert f"cannot read data file(s) ['{corrupt_data}/sst2/dev.tsv.gz'] (field 'data-dir'): EOFError" in err
    missing = tmp_path / "empty"
    missing.mkdir()
    assert "data file(s) not found" in one_line_error(capsys, lambda: config_cli.main([SMOKE, f"data-dir={missing}"]))


def test_output_that_is_a_file_is_refused_before_training(capsys, tmp_path):
    taken = tmp_path / "results"
    taken.write_text("an earlier run's notes")
    err = one_line_error(capsys, lambda: train_cli.main([SMOKE, "--out", str(taken)]))
    assert err == f"error: --out '{taken}' is an existing file, not a folder"
    assert taken.read_text() == "an earlier run's notes"


def test_help_and_a_good_scenario(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_cli.main(["--help"])
    assert exit_info.value.code == 0 and "KEY=VALUE" in capsys.readouterr().out
    config_cli.main([SMOKE, "zo-queries=3"])
    assert "zo-queries = 3\n" in capsys.readouterr().out


@pytest.mark.slow
def test_unknown_hub_model_offline_is_one_line_without_a_traceback():
    """As a user runs it: a subprocess, offline, for a model name that is neither tiny, packaged, a
    folder nor in the local hub cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fl_app.config_cli", SMOKE, "model=no-such-model"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: cannot load model 'no-such-model' (field 'model')"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
