"""``docs/results.md``, assembled from the benchmark reports in ``docs/results/`` by one command.

    python -m benchmarks.results [--docs docs]

Every section is one benchmark's own report (``results/<stem>.md``, written with its ``.json`` by
:func:`benchmarks.report.write_report`, stamped with its commit and machine) under the command
that reproduces it, with its plots; the headline figures are computed here from the reports'
JSON. A report that has not been written yet says so and names its command. Nothing in the file
is typed by hand, so it is never edited directly: rerun a benchmark, then this.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.accuracy import LEARNED, control_gaps, learned
from benchmarks.stats import standard_error
from benchmarks.tune_compare import floor_line, verdicts
from benchmarks.zo_bottom import headline as zo_bottom_headline

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Section:
    stem: str  # docs/results/<stem>.md and .json
    title: str
    command: str  # writes docs/results/<stem>.md


SECTIONS = (
    Section(
        "zo_bottom",
        "What hosl's ZO bottom adds at long budgets (all-MiniLM-L6-v2, SST-2)",
        "python -m benchmarks.zo_bottom --phase long --jobs 2",
    ),
    Section(
        "zo_gate",
        "The estimator study's gate: where first-order training of the bottom pays 3 dev points",
        "python -m benchmarks.zo_gate --jobs 2",
    ),
    Section(
        "estimator_cost_minilm",
        "ZO client estimators' cost per step (all-MiniLM-L6-v2, cut 5, Q = 4)",
        "python -m benchmarks.estimator_cost --set cut-layer=5 --queries 4 --steps 4 --repeats 2",
    ),
    Section(
        "estimator_cost_smollm2",
        "ZO client estimators' cost per step (SmolLM2-135M with LoRA, cut 10, Q = 2: its study's setting)",
        "python -m benchmarks.estimator_cost --scenario sim_configs/sst2_smollm2_lora.toml --queries 2 --steps 3 "
        "--repeats 2 --out docs/results/estimator_cost_smollm2",
    ),
    Section(
        "estimator_cost_smollm2_q4",
        "ZO client estimators' cost per step (SmolLM2-135M with LoRA, cut 10, Q = 4)",
        "python -m benchmarks.estimator_cost --scenario sim_configs/sst2_smollm2_lora.toml --queries 4 --steps 3 "
        "--repeats 2 --out docs/results/estimator_cost_smollm2_q4",
    ),
    Section(
        "accuracy",
        "Six tasks, three modes, three seeds (all-MiniLM-L6-v2; 30 steps: a pipeline check, too short to "
        "show what the ZO bottom adds)",
        "python -m benchmarks.accuracy --size full --jobs 2 --out runs/accuracy",
    ),
    Section(
        "accuracy_smollm2",
        "SmolLM2-135M with LoRA (SST-2, RTE, BoolQ; 120 steps: a short-budget check)",
        "python -m benchmarks.accuracy --size smollm2 --jobs 2 --out runs/accuracy",
    ),
    Section(
        "tuning",
        "AUTOMATA: tuning on subsets over seeds",
        "python -m benchmarks.tune_compare --out runs/tune --tasks sst2 rte --seeds 0 1 2 "
        "--selectors random gradmatch gradmatch-pc --task-selectors rte:random,gradmatch "
        "--task-set rte:max-length=128 --task-set rte:n-train=256 --docs docs/results",
    ),
    Section(
        "export_check",
        "Exported models score SST-2 as their runs did (plain transformers, no fl_app)",
        "python -m benchmarks.export_check --models minilm smollm2",
    ),
    Section(
        "client_cost", "The ZO client step against its floor", "python -m benchmarks.client_cost --steps 4 --repeats 2"
    ),
    Section(
        "client_dtype",
        "Half-precision ZO client weights",
        "python -m benchmarks.client_dtype --scenario sim_configs/sst2_minilm_full.toml --steps 3",
    ),
    Section("bytes", "Bytes per step and per round", "python -m benchmarks.bytes --out docs/results"),
    Section(
        "transport", "Step transport: stream against local runner", "python -m benchmarks.transport --out docs/results"
    ),
    Section(
        "deploy_rounds",
        "Deployment rounds: warm nodes against cold ones",
        "python -m benchmarks.deploy_rounds --repeats 2",
    ),
    Section(
        "client_allocator",
        "A client's peak memory and step time by allocator (what a node's worker runs with)",
        "python -m benchmarks.client_allocator",
    ),
    Section(
        "wire_dtype",
        "Half-precision activations on the wire",
        "python -m benchmarks.wire_dtype --out docs/results/wire_dtype",
    ),
    Section(
        "server_batching",
        "Server batching of perturbed activations",
        "python -m benchmarks.server_batching --out docs/results/server_batching",
    ),
    Section("side_by_side", "Clients side by side on the cores", "python -m benchmarks.side_by_side"),
    Section("cross_scoring", "Scoring perturbed activations across clients", "python -m benchmarks.cross_scoring"),
    Section("frame_auth", "What sealing step-stream frames costs", "python -m benchmarks.frame_auth --repeats 30"),
    Section("partitions", "Label-skewed partitions", "python -m benchmarks.partitions"),
    Section(
        "scaling", "Many-client scaling (1 to 1,024 clients)", "python -m benchmarks.scaling --size full --profile 20"
    ),
    Section("scaling_1k", "1,000 clients in one round", "python -m benchmarks.scaling --size 1k --profile 20"),
    Section("scaling_10k", "10,000 clients, 10 % per round", "python -m benchmarks.scaling --size 10k"),
)


REPORTS = "results"  # the generated reports' folder under docs/ (results.md itself stays in docs/)


def _data(docs: Path, stem: str) -> Any | None:
    path = docs / REPORTS / f"{stem}.json"
    return json.loads(path.read_text())["data"] if path.is_file() else None


def accuracy_headline(rows: dict[str, Any]) -> str:
    """Which tasks fo-fo or hosl learned (beat the majority class), and over those tasks the range of
    hosl's gaps to fo-fo and zo-zo, and to its frozen-bottom control where run (seed means, points)."""

    def mean(runs: list[dict]) -> float:
        return sum(r["test"] for r in runs) / len(runs)

    seeds = max(len(row["runs"]["hosl"]) for row in rows.values())
    known = {t: row for t, row in rows.items() if "majority" in row}
    taught = [t for t, row in known.items() if learned(row, "fo-fo") or learned(row, "hosl")]
    head = f"Over {len(rows)} task(s) ({', '.join(rows)}) and {seeds} seed(s)"  # a partial study names its tasks
    if known:
        head += (
            f", fo-fo or hosl beat the majority class (by more than {100 * LEARNED:g} points and two standard "
            "errors) on "
            f"{', '.join(taught) or 'none'} (the other tasks' gaps say nothing about HOSL)"
        )
    scope = {t: rows[t] for t in taught} if known else rows
    if not scope:
        return head + "."
    gaps = {
        other: [100 * (mean(row["runs"]["hosl"]) - mean(row["runs"][other])) for row in scope.values()]
        for other in ("fo-fo", "zo-zo")
    }
    paired = {t: control_gaps(row) for t, row in scope.items() if "control" in row}
    controlled = [statistics.fmean(d) for d in paired.values()]
    clear = [t for t, d in paired.items() if abs(statistics.fmean(d)) > 2 * standard_error(d)]
    return (
        f"{head}; there, hosl - fo-fo is between {min(gaps['fo-fo']):+.1f} and {max(gaps['fo-fo']):+.1f} "
        f"test-accuracy points and hosl - zo-zo between {min(gaps['zo-zo']):+.1f} and {max(gaps['zo-zo']):+.1f} "
        "(the HOSL paper, OPT at thousands of steps: -4.23 to -0.20 and up to +15.55)"
        + (
            f"; hosl - frozen bottom, what hosl's ZO bottom adds to its server's training, is between "
            f"{min(controlled):+.1f} and {max(controlled):+.1f} points, beyond two standard errors of zero on "
            f"{', '.join(clear) or 'none'}"
            if controlled
            else ""
        )
        + "."
    )


def gate_headline(rows: dict[str, Any]) -> str:
    """Per gate setting: its dev headroom (± per-example SE) and whether it cleared, or how far it ran."""
    parts = []
    for setting, row in rows.items():
        v = row["verdict"]
        if v is None:
            done = sum(r is not None for r in row["runs"].values())
            parts.append(f"{setting} {done} of {len(row['runs'])} runs finished")
        else:
            h, verdict = v["headroom"], "cleared" if v["cleared"] else "not cleared"
            parts.append(f"{setting} {h['points']:+.1f} ± {h['se']:.1f} SE dev points ({verdict})")
    return "first-order headroom over the frozen bottom on dev: " + "; ".join(parts)


def cost_headline(rows: list[dict[str, Any]]) -> str:
    """One-sided against two-point per step: bytes up, server scorings and the whole step's time."""
    by = {r["variant"]: r for r in rows}
    two, one = by["two-point"], by["one-sided"]
    return (
        f"one-sided sends {one['bytes_up'] / two['bytes_up']:.3f}x two-point's bytes up with "
        f"{one['server_scorings'] / two['server_scorings']:.2f}x its server scorings and "
        f"{one['client_forwards']:.0f} client forwards against {two['client_forwards']:.0f}; its whole step takes "
        f"{one['step'] / two['step']:.2f}x the time (measured side by side)"
    )


def headlines(docs: Path) -> list[str]:
    """One computed sentence per report that has a headline and exists."""
    found = []
    if (study := _data(docs, "zo_bottom")) is not None:
        found += [f"**zo_bottom**: {line}" for line in zo_bottom_headline(study)]
    if (gate := _data(docs, "zo_gate")) is not None:
        found.append(f"**zo_gate**: {gate_headline(gate)}")
    for stem in ("estimator_cost_minilm", "estimator_cost_smollm2", "estimator_cost_smollm2_q4"):
        if (rows := _data(docs, stem)) is not None:
            found.append(f"**{stem}**: {cost_headline(rows)}")
    budgets = {"accuracy": "30 steps, a pipeline check", "accuracy_smollm2": "120 steps, a short-budget check"}
    for stem in ("accuracy", "accuracy_smollm2"):
        if (rows := _data(docs, stem)) is not None:
            found.append(f"**{stem}** ({budgets[stem]}): {accuracy_headline(rows)}")
    if (tuning := _data(docs, "tuning")) is not None:
        floors = [floor_line(tuning["aggregate"], tuning["constant_answer"])] if tuning.get("constant_answer") else []
        found += [f"**tuning**: {line}" for line in [*floors, *verdicts(tuning["study"])]]
    return found


def section_text(docs: Path, section: Section) -> str:
    """The report under its title and command, headings one level down, its plots shown."""
    md, js = docs / REPORTS / f"{section.stem}.md", docs / REPORTS / f"{section.stem}.json"
    head = f"## {section.title}\n\n"
    if not (md.is_file() and js.is_file()):
        return head + f"Not measured yet: `{section.command}` writes `docs/{REPORTS}/{section.stem}.md`.\n"
    record = json.loads(js.read_text())  # older reports are a bare list
    command = (record.get("command") if isinstance(record, dict) else None) or section.command  # as it was run
    lines = md.read_text().rstrip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = "\n".join("#" + line if line.startswith("#") else line for line in lines).strip()
    plots = [p for p in dict.fromkeys(re.findall(r"[\w.-]+\.png", body)) if (docs / REPORTS / p).is_file()]
    shown = "".join(f"\n\n![{p}]({REPORTS}/{p})" for p in plots)
    return head + f"Reproduce: `{command}` (report: `docs/{REPORTS}/{section.stem}.md`).\n\n{body}{shown}\n"


def build(docs: Path) -> str:
    """The whole of results.md for the reports in ``docs``."""
    top = (
        "# Measured results\n\n"
        "Generated by `python -m benchmarks.results` from the benchmark reports in `docs/results/`: each section is "
        "one benchmark's report, stamped with the commit and machine it ran on, under the command that reproduces "
        "it. Do not edit this file; rerun a benchmark, then the generator. Seconds come from shared 2-core "
        "machines and are indicative; the ratios inside each report were measured side by side in one run.\n"
    )
    found = headlines(docs)
    summary = "\n## Headlines\n\n" + "\n".join(f"- {h}" for h in found) + "\n" if found else ""
    return top + summary + "".join("\n" + section_text(docs, s) for s in SECTIONS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    path = args.docs / "results.md"
    path.write_text(build(args.docs))
    print(f"[results] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
