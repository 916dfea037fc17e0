"""Hyper-parameter tuning over the federation (AUTOMATA): an Optuna study whose trials train the
split model for a few rounds on each client's data subsets, reporting dev accuracy every round
so a Hyperband or ASHA pruner can stop poor trials early.

Flower-free: :func:`fl_app.rounds.tune` passes a function that runs one round of the federation.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from fl_app.config import DEFAULTS, Config, make_config
from fl_app.subset import round_plan

PARAM_KINDS = ("log", "float", "int", "choice")


class TrialFailed(RuntimeError):
    """A trial that produced no evaluation (every client dropped, or training diverged)."""


@dataclass(frozen=True)
class Param:
    """One searched config key: ``log`` / ``float`` / ``int`` ranges or a ``choice`` of values."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def parse_space(text: str) -> list[Param]:
    """Parse ``tune-space``: whitespace-separated ``key=log:LOW:HIGH``, ``key=float:LOW:HIGH``,
    ``key=int:LOW:HIGH`` or ``key=choice:A|B|C`` over config keys, e.g.
    ``client-lr=log:1e-5:1e-3 zo-queries=int:2:8 lora-r=choice:4|8|16``."""
    space = []
    for item in text.split():
        key, sep, spec = item.partition("=")
        kind, _, rest = spec.partition(":")
        if not sep or kind not in PARAM_KINDS or not rest:
            raise ValueError(
                f"config key 'tune-space': cannot parse {item!r}; expected key=KIND:ARGS with KIND in {PARAM_KINDS}"
            )
        if key not in DEFAULTS or key.startswith(("tune-", "subset-")):
            raise ValueError(f"config key 'tune-space' searches {key!r}, which is not a tunable config key")
        if kind == "choice":
            choices = tuple(make_config({key: value})[key] for value in rest.split("|"))
            space.append(Param(key, kind, choices=choices))
            continue
        try:
            low, high = (float(v) for v in rest.split(":"))
        except ValueError as err:
            raise ValueError(f"config key 'tune-space': {item!r} needs two numbers LOW:HIGH") from err
        if not low < high or (kind == "log" and low <= 0):
            raise ValueError(f"config key 'tune-space': {item!r} needs LOW < HIGH (and LOW > 0 for log)")
        make_config({key: int(low) if kind == "int" else low})  # the key accepts values of this kind
        space.append(Param(key, kind, low, high))
    if not space:
        raise ValueError("config key 'tune-space' is empty: name at least one key to search")
    if len({p.key for p in space}) != len(space):
        raise ValueError(f"config key 'tune-space' names a key twice: {text!r}")
    return space


def make_study(config: Config) -> optuna.Study:
    """A maximising study with the configured sampler and pruner, seeded by the scenario seed.

    TPE starts from a third of the trials sampled at random (at least 2, at most Optuna's 10), so a
    short study is still guided. The study name is fixed because Hyperband assigns trials to
    brackets by hashing it: the same seed then gives the same brackets.
    """
    seed = config.run.seed
    startup = min(10, max(2, config.tune.trials // 3))
    sampler = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if config.tune.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    rounds = config.tune.rounds
    pruner = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=rounds, reduction_factor=3),
        "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        "none": optuna.pruners.NopPruner,
    }[config.tune.pruner]()
    return optuna.create_study(study_name="hosl-tuning", direction="maximize", sampler=sampler, pruner=pruner)


def warm_rounds(config: Config, rounds: int) -> int:
    """Rounds of a run of ``rounds`` rounds that warm-start on full data: floor(kappa x rounds)."""
    return math.floor(config.subset.warm_start * rounds)


RoundRunner = Callable[[int, int, Mapping[str, Any], str], dict[str, Any]]


def run_study(config: Config, run_round: RoundRunner) -> tuple[optuna.Study, dict[str, Any]]:
    """Run ``tune-trials`` trials. ``run_round(trial_id, round_in_trial, params, plan)`` resets the
    federation to its starting weights when ``round_in_trial == 1``, trains one round on the data
    ``plan`` says (:func:`fl_app.subset.round_plan`), evaluates on dev and returns the round's entry
    (with ``accuracy``). Returns the study and a JSON-able record of every trial."""
    space = parse_space(config.tune.space)
    study = make_study(config)
    records: list[dict[str, Any]] = []
    warm = warm_rounds(config, config.tune.rounds)

    def objective(trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in space}
        record = {"number": trial.number, "params": params, "rounds": [], "state": "running"}
        records.append(record)
        started = time.perf_counter()
        try:
            accuracy = None
            for rnd in range(1, config.tune.rounds + 1):
                plan = round_plan(config.subset.selector, rnd, config.subset.reselect_every, warm)
                entry = run_round(trial.number + 1, rnd, params, plan)
                record["rounds"].append({**entry, "plan": plan})
                accuracy = entry["accuracy"]
                if accuracy is None:
                    raise TrialFailed(f"trial {trial.number} round {rnd}: no client finished the round")
                trial.report(accuracy, rnd)
                if trial.should_prune():
                    record["state"] = "pruned"
                    raise optuna.TrialPruned()
            record["state"] = "complete"
            return accuracy
        except TrialFailed as err:
            record["state"], record["error"] = "failed", str(err)
            raise
        finally:
            record["seconds"] = time.perf_counter() - started
            record["accuracy"] = record["rounds"][-1]["accuracy"] if record["rounds"] else None

    started = time.perf_counter()
    study.optimize(objective, n_trials=config.tune.trials, catch=(TrialFailed,))
    complete = [r for r in records if r["state"] == "complete"]
    summary = {
        "selector": config.subset.selector,
        "fraction": config.subset.fraction,
        "sampler": config.tune.sampler,
        "pruner": config.tune.pruner,
        "space": config.tune.space,
        "trials": records,
        "seconds": time.perf_counter() - started,
        "pruned": sum(r["state"] == "pruned" for r in records),
        "failed": sum(r["state"] == "failed" for r in records),
        "best": {"number": study.best_trial.number, "params": study.best_params, "accuracy": study.best_value}
        if complete
        else None,
    }
    return study, summary


def plot_history(study: optuna.Study, path: Path) -> Path | None:
    """Save Optuna's optimisation-history plot as a PNG (None if no trial completed)."""
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = plot_optimization_history(study)
    axes.set_ylabel("dev accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    axes.figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(axes.figure)
    tmp.replace(path)
    return path
