"""hosl-export (fl_app.export): a run's trained model saved in Hugging Face format loads with plain
transformers, in a process that never imports fl_app, and gives the split model's logits (bottom,
then top); which bottom is exported is the user's choice, checked against what the run kept."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fl_app import export, export_cli
from fl_app.config import make_config, read_scenario
from fl_app.scenario import load_split
from fl_app.train import run

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    **read_scenario(ROOT / "sim_configs" / "smoke_tiny.toml"),
    "num-rounds": 1,
    "local-steps": 2,
    "eval-swap": "none",
    "eval-test": False,
}

LOAD_AND_SCORE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
path, out = sys.argv[1], sys.argv[2]
loader = AutoModelForSequenceClassification if "{encoder}" == "True" else AutoModelForCausalLM
model = loader.from_pretrained(path).eval()
if len(sys.argv) > 4:  # path is the base model; these are the run's adapters
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, sys.argv[4]).eval()
else:
    AutoTokenizer.from_pretrained(path)
ids, mask = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids, attention_mask=mask).logits, out)
assert not any(name == "fl_app" or name.startswith("fl_app.") for name in sys.modules)
"""


def _train(tmp_path: Path, name: str, **overrides) -> Path:
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run(make_config({**TINY, **overrides, "out-dir": str(out)}), out)
    return out


def _logits_elsewhere(
    model_dir: Path, tmp_path: Path, encoder: bool, adapters: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the exported model's logits on the probe batch, computed in a fresh process; the mask). With
    ``adapters``, ``model_dir`` is the base model they are loaded on."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids, mask = export.probe_batch(vocab, seed=1)
    torch.save((ids, mask), tmp_path / "probe.pt")
    script = LOAD_AND_SCORE.replace("{encoder}", str(encoder))
    args = [str(model_dir), str(tmp_path / "logits.pt"), str(tmp_path / "probe.pt")]
    subprocess.run(
        [sys.executable, "-c", script, *args, *([str(adapters)] if adapters else [])],
        check=True,
        cwd=tmp_path,
        timeout=300,
    )
    return torch.load(tmp_path / "logits.pt"), mask


CASES = [
    ("tiny-opt", "full", "full", "personal"),
    ("tiny-llama", "lora", "lora", "personal"),
    ("tiny-bert", "full", "lora", "personal"),
    ("tiny-llama", "full", "full", "synced"),
    ("tiny-bert", "lora", "full", "synced"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "client_params", "server_params", "bottoms"), CASES)
def test_the_exported_model_gives_the_split_models_logits_in_plain_transformers(
    tmp_path, model, client_params, server_params, bottoms
):
    folder = _train(
        tmp_path,
        "run",
        model=model,
        **{"client-params": client_params, "server-params": server_params},
        bottoms=bottoms,
    )
    choice = {"synced": True} if bottoms == "synced" else {"client": 1}
    out = export.export_run(folder, tmp_path / "model", **choice)
    got, mask = _logits_elsewhere(out, tmp_path, encoder=model == "tiny-bert")
    bottom, top, _, which = export.trained_split(export.read_run(folder), **choice)
    ids, _ = export.probe_batch(json.loads((out / "config.json").read_text())["vocab_size"], seed=1)
    expected = export.split_logits(bottom, top, ids, mask)
    assert export._max_gap(got.float(), expected, mask) <= 1e-5
    assert which["bottom"] == bottoms.replace("personal", "client")
    rebuilt = export.split_logits(*export.trained_split(export.read_run(folder), **choice)[:2], ids, mask)
    assert torch.equal(rebuilt, expected)  # built the same way twice: deterministic
    card = (out / "README.md").read_text()
    assert "Exported from run" in card and f"after round 1, bottom: {which['bottom']}" in card
    recorded = json.loads((out / "config.json").read_text())["hosl_export"]
    assert recorded["round"] == 1 and recorded["bottom"] == which["bottom"]
    assert ("LoRA merged into the weights" in card) == ("lora" in (client_params, server_params))
    if model == "tiny-bert":  # a classifier: the task's class names, not LABEL_0 / LABEL_1, in pipelines
        saved = json.loads((out / "config.json").read_text())
        assert saved["id2label"] == {"0": "negative", "1": "positive"} and saved["label2id"]["positive"] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {
        p.name: 0o666 & ~umask for p in out.rglob("*") if p.is_file()
    }  # model.safetensors too (its writer makes it 0600)


@pytest.mark.slow
def test_a_personal_bottom_is_the_clients_own(tmp_path):
    folder = _train(tmp_path, "run")
    run_ = export.read_run(folder)
    zero, top, _, _ = export.trained_split(run_, client=0)
    one, _, _, _ = export.trained_split(run_, client=1)
    _, pristine, _ = load_split(run_.config)
    ids, mask = export.probe_batch(top.model.config.vocab_size)
    with torch.no_grad():
        assert not torch.equal(zero(ids, mask), one(ids, mask))  # two clients, two bottoms
        assert not torch.equal(zero(ids, mask), pristine(ids, mask))  # each trained


@pytest.mark.subprocess
def test_bad_requests_are_one_line_errors_with_exit_2_and_nothing_written(tmp_path, capsys):
    folder = _train(tmp_path, "run")
    cases = [
        ([str(tmp_path / "nowhere")], "is not a run folder (no results.json)"),
        ([str(folder), "--client", "7"], "no state of client 7 up to round 1; choose --client 0 / 1"),
        ([str(folder)], "the run trained its bottoms: choose one: --client 0 / 1"),
        ([str(folder), "--synced"], "the run kept personal bottoms"),
    ]
    (tmp_path / "nocheckpoint").mkdir()
    (tmp_path / "nocheckpoint" / "results.json").write_text("{}")
    cases.append(([str(tmp_path / "nocheckpoint")], "has no checkpoint.pt yet"))
    for index, (args, message) in enumerate(cases):
        if index == 0:  # the installed command line, once: a process that exits 2 with one line
            proc = subprocess.run(
                [sys.executable, "-m", "fl_app.export_cli", *args, "--out", str(tmp_path / "out")],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=300,
            )
            code, stderr = proc.returncode, proc.stderr
        else:  # the same main() in this process (each interpreter start costs seconds of imports)
            with pytest.raises(SystemExit) as exited:
                export_cli.main([*args, "--out", str(tmp_path / "out")])
            code, stderr = exited.value.code, capsys.readouterr().err
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hosl-export: error: ") and message in lines[0], lines
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_frozen_bottom_exports_the_pristine_one_and_refuses_a_client(tmp_path):
    folder = _train(tmp_path, "run", **{"client-params": "frozen"})
    with pytest.raises(export.ExportError, match="never trained"):
        export.export_run(folder, tmp_path / "model", client=0)
    out = export.export_run(folder, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["hosl_export"]["bottom"] == "pristine"
    with pytest.raises(export.ExportError, match="exists and is not an empty folder"):
        export.export_run(folder, out)


def test_export_never_removes_a_folder_it_did_not_make(tmp_path, monkeypatch):
    """Issue 44 item 7: a user's mymodel.partial/ survives an export to mymodel, one that fails included;
    the export's own work folder is gone either way."""
    folder = _train(tmp_path, "run", **{"client-params": "frozen"})
    mine = tmp_path / "mymodel.partial"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    monkeypatch.setattr(export, "_write_parts", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export.export_run(folder, tmp_path / "mymodel")
    monkeypatch.undo()
    out = export.export_run(folder, tmp_path / "mymodel")
    assert (mine / "important.txt").read_text() == "keep me" and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mymodel", "mymodel.partial", "run"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "client_params", "server_params"), [("tiny-bert", "lora", "lora"), ("tiny-opt", "frozen", "lora")]
)
def test_lora_runs_also_export_peft_adapters_that_load_on_the_base_model(tmp_path, model, client_params, server_params):
    folder = _train(tmp_path, "run", model=model, **{"client-params": client_params, "server-params": server_params})
    choice = {} if client_params == "frozen" else {"client": 0}
    out = export.export_run(folder, tmp_path / "model", **choice)  # a LoRA run: the model and its adapters
    assert (out / "model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    config = make_config({**TINY, "model": model})
    base = tmp_path / "base"
    export.load_model(model, 2, config.run.seed).model.save_pretrained(base)  # the pristine base model
    got, mask = _logits_elsewhere(base, tmp_path, encoder=model == "tiny-bert", adapters=out / "adapter")
    bottom, top, _, _ = export.trained_split(export.read_run(folder), **choice)
    ids, _ = export.probe_batch(json.loads((base / "config.json").read_text())["vocab_size"], seed=1)
    assert export._max_gap(got.float(), export.split_logits(bottom, top, ids, mask), mask) <= 1e-5
    only = export.export_run(folder, tmp_path / "adapters-only", parts="adapters", **choice)
    assert (only / "adapter_model.safetensors").is_file() and not (only / "model.safetensors").exists()
    merged = export.export_run(folder, tmp_path / "merged-only", parts="model", **choice)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter").exists()


def test_adapters_are_refused_for_a_run_that_trained_full_parameters(tmp_path):
    folder = _train(tmp_path, "run", **{"server-params": "lora"})  # client: full parameters
    with pytest.raises(export.ExportError, match="adapters hold LoRA runs only"):
        export.export_run(folder, tmp_path / "model", client=0, parts="adapters")
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()
    out = export.export_run(folder, tmp_path / "model", client=0)  # auto: the merged model alone
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_an_exported_minilm_scores_the_shipped_sst2_test_split_as_the_run_did(tmp_path):
    """Plain transformers code (benchmarks/plain_sst2.py, no fl_app) over every row of an SST-2
    validation file gives the run's own test accuracy exactly (one client: the run scored the whole
    split with its bottom). The file is the shipped one's first 256 rows (a data-dir of the shipped
    training file and that shorter test file), so the test is about exactness, not the file's length."""
    import gzip
    import shutil

    data_dir = tmp_path / "data" / "sst2"
    data_dir.mkdir(parents=True)
    shutil.copy(ROOT / "data" / "sst2" / "train.tsv.gz", data_dir / "train.tsv.gz")
    with gzip.open(ROOT / "data" / "sst2" / "dev.tsv.gz", "rt") as fh:
        lines = fh.read().splitlines(keepends=True)
    with gzip.open(data_dir / "dev.tsv.gz", "wt") as fh:
        fh.writelines(lines[:257])  # the header and 256 rows
    scenario = read_scenario(ROOT / "sim_configs" / "quick_minilm.toml")
    overrides = {"num-clients": 1, "num-rounds": 1, "local-steps": 24, "server-lr": 2e-4, "n-test": 256}
    overrides["eval-swap"] = "none"  # a top that learned something: its predictions are not all one class
    overrides.update({"data-dir": str(tmp_path / "data"), "eval-untrained": False, "eval-examples": 64})
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run(make_config({**scenario, **overrides, "out-dir": str(out)}), out)
    model = export.export_run(out, tmp_path / "model")  # one client: its bottom, without --client
    max_length = str(results["data"]["max_length"])
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "plain_sst2.py"),
            str(model),
            str(data_dir / "dev.tsv.gz"),
            max_length,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    count, accuracy = proc.stdout.split()
    assert int(count) == results["eval"]["test"]["count"] == 256
    assert float(accuracy) == results["eval"]["test"]["accuracy"] > 0.6


@pytest.mark.slow
def test_a_run_still_going_exports_its_latest_checkpoint(tmp_path):
    """A run killed (as if still going) after its first checkpoint exports that round: its top with the
    client's state up to the same round (client states past the checkpoint are never read)."""
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fl_app.train", str(ROOT / "sim_configs" / "smoke_tiny.toml"), "--out", str(out)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen([*cmd, "--set", "num-rounds=6"], cwd=ROOT, **quiet)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            (out / "checkpoint.pt").exists() and (out / "results.json").exists()
        ):
            time.sleep(0.02)  # round 1's checkpoint and the results.json that follows it
        proc.kill()
    finally:
        proc.wait()
    run_ = export.read_run(out)
    assert json.loads((out / "results.json").read_text())["status"] == "running" and run_.round < 6
    model = export.export_run(out, tmp_path / "model", client=0)  # checked against the split model inside
    assert json.loads((model / "config.json").read_text())["hosl_export"]["round"] == run_.round


@pytest.mark.parametrize("case", ["scalar", "missing", "integer", "far-round", "nan"])
def test_export_refuses_in_one_line_every_checkpoint_resume_refuses(tmp_path, capsys, case):
    """Issue 44 item 6: the checkpoint's server weights go through resume's checks (names, shapes, float
    dtypes, finite values, a round its results reached) before export copies them."""
    folder = _train(tmp_path, "run")
    path = folder / "checkpoint.pt"
    saved = torch.load(path, weights_only=False)
    name = next(iter(saved["server"]))
    if case == "scalar":
        saved["server"][name] = torch.tensor(0.5)
    elif case == "missing":
        del saved["server"][name]
    elif case == "integer":
        saved["server"][name] = saved["server"][name].to(torch.int64)
    elif case == "far-round":
        saved["round"] = 999
    else:
        saved["server"][name] = torch.full_like(saved["server"][name], float("nan"))
    torch.save(saved, path)
    with pytest.raises(SystemExit) as stop:
        export_cli.main([str(folder), "--out", str(tmp_path / "model"), "--client", "0"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("hosl-export: error: export:")
    assert not (tmp_path / "model").exists()
