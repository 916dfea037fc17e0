"""What crosses between rounds and processes, and its flat form: the synced ZO history, a client's
saved state and a training session's report.

Flower records hold scalars and flat lists of scalars, so nested per-step lists are flattened here,
once, for both apps (``client_app`` stores and sends them, ``server_app`` sends and reads them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from fl_app.checkpoint import SESSION_ID
from fl_app.subset import PLANS


@dataclass
class History:
    """ZO updates of successful sessions, as scalars: one entry per client step."""

    rounds: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seeds: list[list[int]] = field(default_factory=list)
    grads: list[list[float]] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)  # packed embedding-row selection per step (b"": all rows)

    def extend(
        self,
        rnd: int,
        client: int,
        lr: float | list[float],
        seeds: list[list[int]],
        grads: list[list[float]],
        rows: list[bytes] | None = None,
    ) -> None:
        """Add one session's steps; ``lr`` is one rate for all of them, or each step's (a schedule's)."""
        rows = rows if rows is not None else [b""] * len(seeds)
        lrs = [float(x) for x in lr] if isinstance(lr, (list, tuple)) else [float(lr)] * len(seeds)
        if not len(seeds) == len(grads) == len(rows) == len(lrs):
            raise ValueError(
                f"history needs seeds, grads, rows and rates per step, got {len(seeds)}, {len(grads)}, "
                f"{len(rows)}, {len(lrs)}"
            )
        for step_seeds, step_grads, step_rows, step_lr in zip(seeds, grads, rows, lrs):
            self.rounds.append(rnd)
            self.clients.append(client)
            self.lrs.append(step_lr)
            self.seeds.append(step_seeds)
            self.grads.append(step_grads)
            self.rows.append(step_rows)

    def since(self, rnd: int, exclude_client: int | None = None) -> History:
        """Entries of rounds after ``rnd``, leaving out ``exclude_client``'s own (it already applied them)."""
        keep = [i for i, r in enumerate(self.rounds) if r > rnd and self.clients[i] != exclude_client]
        return History(
            [self.rounds[i] for i in keep],
            [self.clients[i] for i in keep],
            [self.lrs[i] for i in keep],
            [self.seeds[i] for i in keep],
            [self.grads[i] for i in keep],
            [self.rows[i] for i in keep],
        )

    def copy(self) -> History:
        """A history with its own lists (extending it leaves this one as it is)."""
        return History(
            list(self.rounds), list(self.clients), list(self.lrs), list(self.seeds), list(self.grads), list(self.rows)
        )

    def __len__(self) -> int:
        return len(self.rounds)


@dataclass
class ClientState:
    """Everything a client keeps between rounds: trainable weights, step count, sync position, the
    tuning trial they belong to and the subset of batches it trains on (ids and weights). A ZO client
    with ``client-state = seeds`` keeps ``updates`` instead of weights: its own (seed, projected
    gradient) steps from its starting bottom, which a session replays to rebuild the weights."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    synced_round: int = 0
    trial: int = 0
    subset_ids: list[int] = field(default_factory=list)
    subset_weights: list[float] = field(default_factory=list)
    updates: History | None = None
    session: str = ""  # the id of the training session that wrote it ("": none); see SessionSettings.base


SPLITS = ("", "dev", "test")  # "" for a training session


def session_id(token: str) -> str:
    """The public id of the session with secret ``token``: 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SessionSettings:
    """What the server asks one client to do in a session: where its step stream is and how to prove
    itself there, which round (and tuning trial) it is, and either the data plan of a training session
    or the shard of an evaluation. A Flower message carries it as a flat record (:meth:`to_record`)."""

    client: int  # the partition id the session is for (the client checks it is its own)
    round: int
    token: str  # the session's bearer token on the step stream
    address: str  # host:port of the step stream
    local_steps: int
    root_certificate: str = ""  # PEM of the stream's TLS certificate ("": plain text)
    node_auth: bool = False  # the server authenticates nodes: the client needs its node key
    trial: int = 0  # a state saved in another tuning trial is dropped
    run_id: str = ""
    state_dir: str = ""  # where clients keep per-round states ("": none)
    base: str = ""  # the id of the client's last committed training session of this trial ("": none yet)
    subset: str = "full"  # a training session's data plan (fl_app.subset.PLANS)
    split: str = ""  # an evaluation's split (dev or test); "" for training
    shard: int = 0  # the evaluation's contiguous shard of the split ...
    num_shards: int = 1  # ... of this many

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), {"int": int, "str": str, "bool": bool}[str(f.type)]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"field '{_record_key(f.name)}' of the session is {value!r}, expected {f.type}")
        if self.subset not in PLANS:
            raise ValueError(f"field 'subset' of the session is {self.subset!r}, expected one of {PLANS}")
        if self.base and not SESSION_ID.fullmatch(self.base):
            raise ValueError(f"field 'base' of the session is {self.base[:40]!r}, expected a session id or ''")
        if self.split not in SPLITS or not 0 <= self.shard < self.num_shards:
            raise ValueError(
                f"fields 'split', 'shard', 'num-shards' of the session are {self.split!r}, {self.shard}, "
                f"{self.num_shards}: expected dev or test (or none), and 0 <= shard < num-shards"
            )

    @property
    def session_id(self) -> str:
        """This session's public id (a hash of its secret token): names the client state it writes."""
        return session_id(self.token)

    def to_record(self) -> dict[str, Any]:
        """The flat record a Flower ConfigRecord holds (hyphenated keys)."""
        return {_record_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SessionSettings:
        """Inverse of :meth:`to_record`; a missing, unknown or mistyped field is an error naming it."""
        known = {_record_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise ValueError(f"session message has unknown fields {unknown}")
        try:
            return cls(**{known[k]: v for k, v in record.items()})
        except TypeError as err:
            raise ValueError(f"session message is incomplete: {err}") from err


def _record_key(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class SessionRequest:
    """What one client needs for a session: the server's settings, the tuning trial's overrides, and
    the synced state to apply first."""

    session: SessionSettings
    overrides: dict[str, int | float | str | bool] = field(default_factory=dict)  # a tuning trial's run-config keys
    history: History | None = None  # synced ZO: the other clients' (seed, projected gradient) steps
    average: dict[str, torch.Tensor] | None = None  # synced FO: the averaged bottom

    @property
    def partition_id(self) -> int:
        return self.session.client


@dataclass
class EvalReport:
    """What a client reports after an evaluation session: its shard's outcomes (``correct``: 1 per
    example scored right, in split order) and, after training, its bottom's drift from its start and
    the swap evaluation (the same top over the initial bottom; ``swap_*`` None when not asked). A
    Flower MetricRecord carries it (:meth:`to_record`)."""

    partition_id: int
    count: int = 0
    accuracy: float | None = None
    loss: float | None = None
    correct: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    drift_params: float | None = None
    drift_activations: float | None = None
    swap_accuracy: float | None = None
    swap_loss: float | None = None
    swap_correct: list[int] | None = None

    def to_record(self) -> dict[str, Any]:
        """Numbers and 0/1 lists, the fields that are set (a MetricRecord holds no None)."""
        return {_record_key(f.name): getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_record`; unknown fields are an error naming them."""
        known = {_record_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(record) - set(known))
        if unknown:
            raise ValueError(f"evaluation report has unknown fields {unknown}")
        values = {}
        for key, value in record.items():
            kind = str(known[key].type)
            if kind.startswith("list"):
                values[known[key].name] = [int(v) for v in value]
            elif kind.startswith("int"):
                values[known[key].name] = int(value)
            else:
                values[known[key].name] = float(value)
        return cls(**values)


@dataclass
class SessionReply:
    """A client's report (training) or metrics (evaluation), or why there is none."""

    report: TrainReport | EvalReport | None
    reason: str = ""


def _flatten(steps: list[list[Any]]) -> tuple[int, list[Any]]:
    """(entries per step, the entries in order); every step must have the same number."""
    width = len(steps[0]) if steps else 0
    if any(len(step) != width for step in steps):
        raise ValueError(f"per-step lists differ in length: {sorted({len(s) for s in steps})}")
    return width, [x for step in steps for x in step]


def _unflatten(flat: list[Any], width: int, count: int) -> list[list[Any]]:
    if len(flat) != width * count:
        raise ValueError(f"expected {count} steps of {width} entries, got {len(flat)} entries")
    return [list(flat[i * width : (i + 1) * width]) for i in range(count)]


def history_to_record(history: History) -> dict[str, Any]:
    """The history as scalars and flat lists."""
    queries, seeds = _flatten(history.seeds)
    _, grads = _flatten(history.grads)
    return {
        "h-rounds": list(history.rounds),
        "h-clients": list(history.clients),
        "h-lrs": list(history.lrs),
        "h-queries": queries,
        "h-seeds": [int(s) for s in seeds],
        "h-grads": [float(g) for g in grads],
        "h-rows": [bytes(r) for r in history.rows],
    }


def history_from_record(record: Mapping[str, Any]) -> History:
    """Inverse of :func:`history_to_record`."""
    count, queries = len(record["h-rounds"]), int(record["h-queries"])
    return History(
        rounds=[int(r) for r in record["h-rounds"]],
        clients=[int(c) for c in record["h-clients"]],
        lrs=[float(lr) for lr in record["h-lrs"]],
        seeds=_unflatten([int(s) for s in record["h-seeds"]], queries, count),
        grads=_unflatten([float(g) for g in record["h-grads"]], queries, count),
        rows=[bytes(r) for r in record["h-rows"]],
    )


def state_to_records(state: ClientState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, counters) of a client state. bfloat16 weights become float32 (numpy, under Flower's
    ArrayRecord, has no bfloat16): exact, and restoring copies them back into the bfloat16 bottom."""
    weights = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.weights.items()}
    return weights, {
        "steps": state.steps,
        "synced-round": state.synced_round,
        "trial": state.trial,
        "subset-ids": list(state.subset_ids),
        "subset-weights": list(state.subset_weights),
        "session": state.session,
        **(history_to_record(state.updates) if state.updates is not None else {}),
    }


def state_from_records(weights: Mapping[str, torch.Tensor], counters: Mapping[str, Any]) -> ClientState:
    """Inverse of :func:`state_to_records` (weights stay float32 until restored into the bottom)."""
    return ClientState(
        weights=dict(weights),
        steps=int(counters["steps"]),
        synced_round=int(counters["synced-round"]),
        trial=int(counters["trial"]),
        subset_ids=[int(i) for i in counters["subset-ids"]],
        subset_weights=[float(w) for w in counters["subset-weights"]],
        updates=history_from_record(counters) if "h-rounds" in counters else None,
        session=str(counters.get("session", "")),
    )


@dataclass
class TrainReport:
    """What a client reports after a training session: per step its loss, ZO seeds, projected
    gradients, embedding-row selection and rate (what synced clients replay), and what the session
    cost. A Flower message carries it flat (:meth:`to_record`); synced FO clients' ``weights`` travel
    beside it as arrays."""

    partition_id: int
    losses: list[float]
    seeds: list[list[int]]  # per step, its Q direction seeds (ZO clients; empty lists otherwise)
    grads: list[list[float]]  # per step, the projected gradients applied
    rows: list[bytes]  # per step, its packed embedding-row selection (b"": all rows)
    step_lrs: list[float]  # per step, the rate it applied (a schedule's)
    lr: float  # the client's base rate
    bytes_up: int
    bytes_down: int
    peak_memory_bytes: int
    step_seconds: float
    session_seconds: float
    caught_up_updates: int  # synced ZO: other clients' steps replayed first
    device: str
    max_length: int
    truncated: dict[str, int]  # per split: examples that did not fit whole
    subset_plan: str
    subset_batches: int
    selection_seconds: float
    selection_bytes_up: int
    selection_bytes_down: int
    bottom_params: int
    bottom_trainable: int
    restored_round: int = 0  # the round of the state on disk the session started from (restarted node, resume)
    state_seconds: float = 0.0  # getting the client's state ready: read (memory or disk), restored or replayed
    weights: dict[str, torch.Tensor] | None = None  # synced FO clients: the bottom, for the server's average
    message_bytes_up: int = 0  # under Flower, set by the server: the session messages' own sizes
    message_bytes_down: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def train_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    def problem(self, client: int, queries: int) -> str | None:
        """Why the server must not commit this report of client ``client``'s session, or None: it
        names another client, its per-step lists disagree, a ZO step (``queries`` > 0) has other than
        ``queries`` seeds and gradients (an FO one has any), or a number is not finite."""
        if self.partition_id != client:
            return f"the report names client {self.partition_id}, the session is client {client}'s"
        steps = self.steps
        lengths = {
            "seeds": len(self.seeds),
            "grads": len(self.grads),
            "rows": len(self.rows),
            "step-lrs": len(self.step_lrs),
        }
        if any(n != steps for n in lengths.values()):
            return f"per-step lists differ from its {steps} losses: {lengths}"
        widths = {len(s) for s in self.seeds} | {len(g) for g in self.grads}
        if steps and widths != {queries}:
            return f"each step must carry {queries} seeds and projected gradients, got {sorted(widths)}"
        numbers = [*self.losses, *self.step_lrs, *(g for step in self.grads for g in step)]
        if not all(math.isfinite(x) for x in numbers):
            return "a loss, rate or projected gradient is not finite"
        if self.weights and not all(bool(torch.isfinite(w).all()) for w in self.weights.values()):
            return "its bottom's weights are not finite"
        return None

    def to_record(self) -> dict[str, Any]:
        """The flat record a Flower ConfigRecord holds (no weights; per-step lists flattened)."""
        queries, seeds = _flatten(self.seeds)
        _, grads = _flatten(self.grads)
        skip = {"seeds", "grads", "weights", "truncated", "message_bytes_up", "message_bytes_down"}
        flat = {_record_key(f.name): getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {
            **flat,
            **{f"truncated-{split}": count for split, count in self.truncated.items()},
            "queries": queries,
            "seeds": [int(x) for x in seeds],
            "grads": [float(g) for g in grads],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainReport:
        """Inverse of :meth:`to_record`; a missing field is an error naming it."""
        lists = {"seeds", "grads", "truncated", "losses", "rows", "step_lrs"}
        names = {f.name for f in fields(cls)} - lists - {"weights", "message_bytes_up", "message_bytes_down"}
        missing = sorted(_record_key(n) for n in names | lists - {"truncated"} if _record_key(n) not in record)
        if missing or "queries" not in record:
            raise ValueError(f"training report lacks fields {missing or ['queries']}")
        steps = len(record["losses"])
        return cls(
            **{name: record[_record_key(name)] for name in names},
            losses=[float(x) for x in record["losses"]],
            rows=[bytes(r) for r in record["rows"]],
            step_lrs=[float(x) for x in record["step-lrs"]],
            seeds=_unflatten([int(x) for x in record["seeds"]], int(record["queries"]), steps),
            grads=_unflatten([float(g) for g in record["grads"]], int(record["queries"]), steps),
            truncated={k.removeprefix("truncated-"): int(v) for k, v in record.items() if k.startswith("truncated-")},
        )
