"""What a client does when the server opens a session: restore state, catch up, train, report.

Flower-free: the ClientApp converts Flower records to the plain dicts used here and stores the
returned state in ``context.state``; tests drive the same functions directly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from fl_app.batches import BatchStream, SubsetStream, eval_batches, fixed_batches, shard
from fl_app.bottom_effect import activation_change, relative_change
from fl_app.checkpoint import check_weights
from fl_app.client_party import Link, SplitClient, StepMemory
from fl_app.client_store import check_updates, load_client_state, save_client_state, saved_round
from fl_app.config import Config, DataSettings, FederationSettings, ModelSettings, RunSettings
from fl_app.data import load_examples
from fl_app.frame_auth import read_key_file, read_pem
from fl_app.records import ClientState, EvalReport, History, SessionRequest, SessionSettings, TrainReport
from fl_app.scenario import (
    TaskData,
    client_trainable,
    load_client_bottom,
    load_task_data,
    reset_client_bottom,
    split_client,
)
from fl_app.split import ClientBottom, param_counts
from fl_app.stream import StepStreamClient
from fl_app.subset import Subset, budget_batches, select_batches
from fl_app.tasks import Example
from fl_app.zo import unpack_rows

log = logging.getLogger(__name__)


def state_for_trial(state: ClientState | None, trial: int) -> ClientState | None:
    """The saved state if it belongs to ``trial``; None (start from the pristine bottom) otherwise."""
    return state if state is not None and state.trial == trial else None


@dataclass
class _Working:
    """This process's one client bottom, its trainable parameters and the scenario's task data.

    Sessions take turns on the same bottom: each restores its saved weights onto it, or resets it
    to its starting values (no untrained copy is kept in memory)."""

    bottom: ClientBottom
    data: TaskData
    params: list[torch.nn.Parameter] | None = None  # set by the first session (LoRA adapters need a client seed)
    memory: dict[Config, StepMemory] = dataclasses.field(default_factory=dict)  # step peaks, profiled once per config


@functools.lru_cache(maxsize=1)
def _working(view: Config) -> _Working:
    """The bottom (loaded alone: the top's layers are never read) and task data of a scenario."""
    loaded, bottom = load_client_bottom(view)
    return _Working(bottom, load_task_data(view, loaded))


def _load_view(config: Config) -> Config:
    """What decides this process's working bottom and data: the model settings (the bottom is
    configured, LoRA injected, once per view), the data settings, the seed and the client count;
    every other setting at its default, so a tuning trial's learning rate does not reload."""
    return Config(
        run=RunSettings(seed=config.run.seed),
        model=dataclasses.replace(
            config.model, server_params=ModelSettings.server_params, server_device=ModelSettings.server_device
        ),
        data=dataclasses.replace(config.data, batch_size=DataSettings.batch_size),  # batches are cut per session
        federation=FederationSettings(num_clients=config.federation.num_clients),
    )


def make_client(config: Config, partition_id: int, state: ClientState | None) -> tuple[SplitClient, TaskData]:
    """Client ``partition_id`` on this process's working bottom, holding ``state``'s weights, or its
    starting weights when there are none (first session, or a new tuning trial).

    The bottom is shared: a client made here is valid until the next ``make_client`` call."""
    work = _working(_load_view(config))
    if work.params is None:  # freshly loaded: untrained, adapters drawn for this client
        work.params = client_trainable(config, work.bottom, partition_id)
    elif not (state is not None and state.weights):
        reset_client_bottom(config, work.bottom, partition_id)
    for p in work.params:
        p.grad = None
    client = split_client(config, work.bottom, work.params, partition_id, work.memory.setdefault(config, StepMemory()))
    if state is not None:
        restore(client, state)
    return client, work.data


def trainable_state(client: SplitClient) -> dict[str, torch.Tensor]:
    """The client's trainable tensors by name (what must persist between rounds)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in client.bottom.named_parameters() if p.requires_grad}


def restore(client: SplitClient, state: ClientState) -> None:
    """Load trainable weights and the step counter; weights that are not the bottom's (names, shapes,
    finite floats) are an error."""
    named = {n: p for n, p in client.bottom.named_parameters() if p.requires_grad}
    if state.weights:
        check_weights(state.weights, named, "saved client state")  # names, shapes, finite values
        with torch.no_grad():
            for name, value in state.weights.items():
                named[name].copy_(value)
    client.steps = state.steps


def most_steps(config: Config, rounds: int) -> int:
    """The most steps one client can have taken in ``rounds`` rounds (its local steps per round, or with
    local-epochs its passes over the whole training set, an upper bound of its partition, per round);
    tuning trials run tune-rounds rounds each, so a study's trials count too."""
    optim, data = config.optim, config.data
    per_round = (
        optim.local_steps
        if not optim.local_epochs
        else math.ceil(optim.local_epochs * max(1, data.n_train) / data.batch_size)
    )
    trials = config.tune.trials * config.tune.rounds
    return per_round * (rounds + trials)


def replay_own(client: SplitClient, updates: History) -> None:
    """Rebuild a client's bottom from its starting weights: its own ZO steps (client-state = seeds), in
    order, each the one-pass update its session applied after that step's walk."""
    if client.zo is None:
        raise ValueError("a client state kept as seeds needs a ZO client (client-state = seeds)")
    rows = updates.rows or [b""] * len(updates)
    for lr, seeds, grads, packed in zip(updates.lrs, updates.seeds, updates.grads, rows):
        client.zo.update(seeds, grads, lr=lr, rows=unpack_rows(packed, len(client.zo.params)))


def catch_up(client: SplitClient, history: History, partition_id: int, synced_round: int) -> int:
    """Apply the other clients' ZO updates (seed, projected gradient) in history order; returns count."""
    applied = 0
    rows = history.rows or [b""] * len(history)
    for rnd, who, lr, seeds, grads, packed in zip(
        history.rounds, history.clients, history.lrs, history.seeds, history.grads, rows
    ):
        if rnd <= synced_round or who == partition_id:
            continue  # already applied, or our own update (already in our weights)
        client.zo.update(seeds, grads, lr=lr, rows=unpack_rows(packed, len(client.zo.params)))
        applied += 1
    return applied


@functools.lru_cache(maxsize=4)
def local_train_examples(task: str, n_train: int, seed: int, data_dir: str) -> list[Example]:
    """A node's own training data: the task's train file(s) in ``data_dir``, seeded sample of ``n_train``."""
    examples = load_examples(task, "train", "local", data_dir)
    random.Random(seed).shuffle(examples)
    return examples[:n_train]


class SessionLink(Link, Protocol):
    """A link for one session: counts its bytes and is closed when the session ends."""

    bytes_up: int
    bytes_down: int

    def close(self) -> None: ...


RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a run id names a folder: no separators, no '..'


@dataclass(frozen=True)
class NodeSettings:
    """What a SuperNode's own config adds to a session; its key and CA never go on the wire."""

    key: bytes | None = None  # node config stream-key-file: this node's key (the server derives the same)
    ca: bytes | None = None  # node config stream-ca: the only CA the node trusts for the step stream
    state_dir: str = ""  # node config state-dir: where this node keeps client states ("" = where the session says)
    data_dir: str = (
        ""  # node config data-dir: the node's own training data (same layout as data/) instead of a partition
    )

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> NodeSettings:
        key_file, ca_file = str(node.get("stream-key-file", "")), str(node.get("stream-ca", ""))
        return cls(
            key=read_key_file(key_file, "node config stream-key-file") if key_file else None,
            ca=read_pem(ca_file, "node config stream-ca") if ca_file else None,
            state_dir=str(node.get("state-dir", "")),
            data_dir=str(node.get("data-dir", "")),
        )

    def state_folder(self, session: SessionSettings) -> Path | None:
        """Where this client's per-round states of this run go (None: the run keeps none on disk):
        ``<state-dir>/<run-id>`` with a node state-dir, else the run folder's ``clients/<run-id>`` that
        the session names. Either way the run id is a plain name and the folder ends in it: without a
        node state-dir a session can still name any absolute ``.../clients/<run id>`` (set state-dir on
        a node that does not share the server's disk)."""
        if not session.state_dir:
            return None
        if not RUN_ID.fullmatch(session.run_id):
            raise ValueError(f"session field run_id is {session.run_id[:80]!r}, expected 1-64 letters, digits, - or _")
        if self.state_dir:
            return Path(self.state_dir).expanduser() / session.run_id
        folder = Path(session.state_dir)
        if not folder.is_absolute() or ".." in folder.parts or folder.parts[-2:] != ("clients", session.run_id):
            raise ValueError(
                f"session field state_dir is {session.state_dir[:200]!r}, expected an absolute '<run folder>/clients/"
                f"{session.run_id}' (or set node config state-dir)"
            )
        return folder


@dataclass(frozen=True)
class ClientSide:
    """What the client brings to a session: the run's config (before a tuning trial's overrides, which
    the request carries), its partition, the state it kept and its node's own settings."""

    config: Config
    partition_id: int
    num_partitions: int
    state: ClientState | None = None
    node: NodeSettings = NodeSettings()


def connect(session: SessionSettings, config: Config, node: NodeSettings | None = None) -> StepStreamClient:
    """The step stream named in a session message, with the scenario's frame size limit.

    The node's own CA (``stream-ca``) replaces the certificate the message carries, and a node
    with one refuses a plain-text stream; a server that authenticates nodes needs the node's key."""
    node = node or NodeSettings()
    offered = session.root_certificate.encode() or None
    if node.ca is not None and offered is None:
        raise ValueError(
            f"node config stream-ca is set but the server's step stream at {session.address} is not TLS "
            "(set stream-tls-cert / stream-tls-key on the server)"
        )
    if session.node_auth and node.key is None:
        raise ValueError(
            "the server authenticates nodes (stream-secret-file): set node config stream-key-file to this "
            "node's key file (python -m fl_app.frame_auth writes one)"
        )
    return StepStreamClient(
        session.address,
        session.token,
        node.ca or offered,
        max_message_bytes=config.stream.max_frame_mb * 2**20,
        node_key=node.key,
        admission_s=config.federation.step_timeout,  # a server short of worker slots: retried for this long
    )


@dataclass
class _Prepared:
    """A session's client, ready: its config (the trial's overrides and the partition count applied),
    the client on the working bottom, the task data, the state it started from, updates caught up."""

    config: Config
    client: SplitClient
    data: TaskData
    state: ClientState
    caught_up: int
    restored_round: int = 0  # the round of the state read from disk (a restarted node, a resumed run); 0: none
    seconds: float = 0.0  # reading the state, restoring its weights or replaying its steps (client-state)


def _prepare(request: SessionRequest, side: ClientSide, upto_round: int) -> _Prepared:
    """The session's client: the state its last committed session wrote (``session.base``; none: the
    pristine bottom), from memory or else the node's state folder on disk (a resumed run, a restarted
    node, a client that moved between nodes, a session the server rolled back), refused when neither
    holds it; the synced ``average`` (FO) as its weights, the synced ``history`` (ZO) applied."""
    started = time.perf_counter()
    session, partition_id = request.session, side.partition_id
    if session.client != partition_id:
        raise ValueError(f"the session is for client {session.client}, but this node holds partition-id {partition_id}")
    if not 0 <= partition_id < side.num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {side.num_partitions})")
    config = side.config.updated({**request.overrides, "num-clients": side.num_partitions})
    state, folder, base = side.state, side.node.state_folder(session), session.base
    if state is not None and state.session != base:  # memory holds a rolled-back or superseded session's state
        state = None
    restored = 0
    if state is None and folder is not None and base:
        state = load_client_state(folder, partition_id, upto_round, session.run_id, session=base)
        restored = saved_round(folder, partition_id, upto_round, session=base)
    if base and state is None:
        raise ValueError(
            f"client {partition_id}'s state from its last committed session ({base}) is not on this node, neither "
            f"in memory nor in {folder or 'a client store (client-checkpoints = false)'}: every node that serves a "
            "client must share its state folder (node config state-dir)"
        )
    state = state_for_trial(state, session.trial) or ClientState(trial=session.trial)
    if request.average:
        state = dataclasses.replace(state, weights=dict(request.average))
    if config.federation.client_state == "seeds" and state.weights:
        raise ValueError(
            f"client {partition_id}'s saved state holds weights, but this run keeps states as seeds (client-state)"
        )
    if state.updates:  # bounded by the steps the run can have taken by then, before any is replayed
        check_updates(state, f"client {partition_id}'s state up to round {upto_round}", most_steps(config, upto_round))
    client, data = make_client(config, partition_id, state)
    if state.updates:
        replay_own(client, state.updates)
    seconds = time.perf_counter() - started
    caught_up = 0
    if request.history is not None and client.zo is not None:
        caught_up = catch_up(client, request.history, partition_id, state.synced_round)
    return _Prepared(config, client, data, state, caught_up, restored, seconds)


def run_session(
    request: SessionRequest, side: ClientSide, link: SessionLink | None = None
) -> tuple[TrainReport, ClientState]:
    """Run one training session over the step stream; returns the report and the state to keep.

    The request's ``history`` (synced ZO) is applied first, its ``average`` (synced FO) replaces the
    weights first; its session's ``subset`` plan (:data:`fl_app.subset.PLANS`) says what data the
    steps use. A node's own ``data_dir`` replaces its partition. ``link`` reaches the server
    (default: the step stream the session names, reached with the node's secrets). Synced FO clients
    also report their ``weights`` (for the server's average).
    """
    started = time.perf_counter()
    session, partition_id = request.session, side.partition_id
    ready = _prepare(request, side, session.round - 1)
    config, client, data, state = ready.config, ready.client, ready.data, ready.state
    plan = session.subset
    if plan == "keep" and not state.subset_ids:  # not selected when the others chose theirs: choose now
        if config.subset.selector == "full":
            raise ValueError("session asks to keep a subset, but subset-selector is 'full' (field 'subset')")
        plan = config.subset.selector
    own_data = side.node.data_dir
    examples = (
        local_train_examples(config.data.task, config.data.n_train, config.run.seed, own_data)
        if own_data
        else data.client_examples(partition_id)
    )
    link = link or connect(session, config, side.node)
    try:
        source, subset, selection = _training_source(
            client, partition_id, examples, data.encoder, config, session, plan, state, link
        )
        client.lr_horizon = schedule_horizon(config, state.trial, len(source))
        stats, progress = [], _Progress(len(source))
        for indices, weight in source:
            stats.append(client.train_step(data.encoder([examples[i] for i in indices]), link, weight))
            _progress(partition_id, session, stats, len(source), progress)
    finally:
        link.close()
    counts = param_counts(client.bottom)
    report = TrainReport(
        partition_id=partition_id,
        losses=[s.loss for s in stats],
        seeds=[s.seeds for s in stats],
        grads=[s.projected_grads for s in stats],
        rows=[s.rows for s in stats],
        step_lrs=[s.lr for s in stats],
        lr=client.lr,
        bytes_up=link.bytes_up,
        bytes_down=link.bytes_down,
        peak_memory_bytes=max(s.peak_memory_bytes for s in stats),
        step_seconds=sum(s.seconds for s in stats),
        session_seconds=time.perf_counter() - started,
        caught_up_updates=ready.caught_up,
        device=str(client.device),
        max_length=data.encoder.max_length,
        truncated=dict(data.truncated),
        subset_plan=plan,
        subset_batches=len(subset.batch_ids) if subset else 0,
        **selection,
        bottom_params=counts["params"],
        bottom_trainable=counts["trainable"],
        restored_round=ready.restored_round,
        state_seconds=ready.seconds,
    )
    updates = None
    if config.federation.client_state == "seeds":  # the steps, not the weights they led to
        updates = state.updates.copy() if state.updates is not None else History()
        updates.extend(session.round, partition_id, report.step_lrs, report.seeds, report.grads, report.rows)
    new_state = ClientState(
        weights=trainable_state(client) if updates is None else {},
        steps=client.steps,
        synced_round=session.round - 1,
        trial=state.trial,
        subset_ids=list(subset.batch_ids) if subset else [],
        subset_weights=list(subset.weights) if subset else [],
        updates=updates,
        session=session.session_id,
    )
    if config.federation.bottoms == "synced" and config.client_order == "fo":  # FO clients sync by FedAvg
        report.weights = new_state.weights
    folder = side.node.state_folder(session)
    if folder is not None:
        try:
            started_from = saved_round(folder, partition_id, 0, session=session.base) if session.base else session.round
            save_client_state(folder, partition_id, session.round, new_state, keep_from=started_from)
        except OSError as err:  # the session's work stands; only a later resume or restart cannot use it
            log.warning(
                "cannot keep client %d's state in %s (set node config state-dir): %s", partition_id, folder, err
            )
    return report, new_state


def schedule_horizon(config: Config, trial: int, steps: int) -> int:
    """The client steps a decaying rate schedule spans: the phase's rounds (a tuning trial's, or the
    run's) times this session's ``steps``. A client sampled in fewer rounds ends above the last rate."""
    rounds = config.tune.rounds if 0 < trial <= config.tune.trials else config.federation.num_rounds
    return rounds * steps


PROGRESS_SECONDS = 30.0  # a long phase prints at least this often


class _Progress:
    """When a session prints a line: about four times per session, at its end, and whenever
    :data:`PROGRESS_SECONDS` passed without one (a slow step or a long evaluation never goes silent)."""

    def __init__(self, total: int):
        self.total, self.last = total, time.monotonic()

    def due(self, done: int) -> bool:
        quarter = done == self.total or done % max(1, self.total // 4) == 0
        return self.overdue() or quarter

    def overdue(self) -> bool:
        """Whether PROGRESS_SECONDS passed since the last line; if so, a line is printed now."""
        if time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.last = time.monotonic()
            return True
        return False


def _progress(partition_id: int, session: SessionSettings, stats: list, steps: int, progress: _Progress) -> None:
    """A training session's line: steps done, mean loss and seconds per step of the recent steps."""
    done = len(stats)
    if progress.due(done):
        recent = stats[-max(1, steps // 4) :]
        print(
            f"[hosl] round {session.round} client {partition_id}: step {done}/{steps}, "
            f"loss {sum(s.loss for s in recent) / len(recent):.4f}, "
            f"{sum(s.seconds for s in recent) / len(recent):.2f} s/step",
            flush=True,
        )


def _scored_with_progress(
    batches: Iterator[dict[str, torch.Tensor]], label: str, total: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` as they are scored, with a line of progress at least every PROGRESS_SECONDS."""
    progress, done = _Progress(total), 0
    for batch in batches:
        yield batch
        done += int(batch["labels"].shape[0])  # examples (a multi-token task has a row per candidate)
        if progress.overdue():
            print(f"[hosl] {label}: {done}/{total} examples scored", flush=True)


def _training_source(
    client: SplitClient,
    partition_id: int,
    examples: list[Example],
    encoder,
    config: Config,
    session: SessionSettings,
    plan: str,
    state: ClientState,
    link: SessionLink,
):
    """(the session's (example indices, loss weight) per step, its subset or None, what choosing it cost).

    Full data continues its epochs across rounds (from the client's global step); a subset's passes
    start with the session. Steps per session: ``local-epochs`` passes, or ``local-steps``."""
    seed, batch_size = config.client_seed(partition_id), config.data.batch_size
    batches = fixed_batches(len(examples), batch_size, seed)
    budget = budget_batches(config.subset.fraction, len(examples), batch_size)
    round_seed = seed * 1_009 + session.round
    subset, selection = _choose_subset(
        client, [[examples[i] for i in b] for b in batches], encoder, budget, plan, state, round_seed, link
    )
    source = (
        SubsetStream(batches, subset, round_seed, [ex.label for ex in examples])
        if subset
        else BatchStream(encoder, examples, batch_size, seed)
    )
    first = 0 if subset else client.steps
    per_pass = budget if plan == "warm" else len(source)
    steps = math.ceil(config.optim.local_epochs * per_pass) if config.optim.local_epochs > 0 else session.local_steps
    return [source.weighted_indices(step) for step in range(first, first + steps)], subset, selection


def _choose_subset(
    client: SplitClient,
    batches: list[list[Example]],
    encoder,
    budget: int,
    plan: str,
    state: ClientState,
    seed: int,
    link: SessionLink,
) -> tuple[Subset | None, dict[str, float]]:
    """The subset of ``batches`` this session trains on (None: full data) and what choosing it cost."""
    started, up, down = time.perf_counter(), link.bytes_up, link.bytes_down
    if plan in ("gradmatch", "gradmatch-pc"):
        per_class = plan == "gradmatch-pc"
        subset = client.select_subset((encoder(batch) for batch in batches), budget, seed, link, per_class)
    elif plan == "random":
        subset = select_batches("random", None, len(batches), budget, torch.Generator().manual_seed(seed))
    elif plan == "keep":
        subset = Subset(state.subset_ids, state.subset_weights)
    else:
        subset = None
    return subset, {
        "selection_seconds": time.perf_counter() - started,
        "selection_bytes_up": link.bytes_up - up,
        "selection_bytes_down": link.bytes_down - down,
    }


def wants_swap(config: Config, session: SessionSettings) -> bool:
    """Whether this evaluation also scores the initial bottom (``eval-swap``; never the untrained round 0)."""
    if session.round == 0 or config.eval.swap == "none":
        return False
    return config.eval.swap == "every" or session.split == "test"


def measure_bottom(
    client: SplitClient, config: Config, partition_id: int, probe: dict[str, torch.Tensor], evaluate_initial
) -> dict[str, Any]:
    """The bottom's drift from its starting values (trainable tensors; cut activations on ``probe``)
    and, if ``evaluate_initial`` is given, its result with the initial bottom in place (the swap
    evaluation), as :class:`EvalReport` fields. The trained weights are back in place afterwards,
    whatever happens."""
    named = {n: p for n, p in client.bottom.named_parameters() if p.requires_grad}
    trained = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        after = client.cut_activations(probe)
        try:
            reset_client_bottom(config, client.bottom, partition_id)
            before = client.cut_activations(probe)
            effect: dict[str, Any] = {
                "drift_params": relative_change(trained, {n: p.detach() for n, p in named.items()}),
                "drift_activations": activation_change(after, before, probe["attention_mask"]),
            }
            if evaluate_initial is not None:
                initial = evaluate_initial()
                effect.update(swap_accuracy=initial["accuracy"], swap_loss=initial["loss"])
                effect["swap_correct"] = initial["correct"]
        finally:
            for name, value in trained.items():
                named[name].copy_(value)
    return effect


def run_eval_session(request: SessionRequest, side: ClientSide, link: SessionLink | None = None) -> EvalReport:
    """Evaluate this client's bottom on its shard of the session's split (dev or test), after
    applying the synced ``history`` (ZO) or taking the ``average`` bottom (FO); after training, also
    the bottom's drift and, where ``eval-swap`` asks, the swap evaluation (:func:`measure_bottom`)."""
    session, partition_id = request.session, side.partition_id
    if session.split not in ("dev", "test"):
        raise ValueError(f"field 'split' of an evaluation session is {session.split!r}, expected dev or test")
    ready = _prepare(request, side, session.round)  # evaluation follows the round's training
    config, client, data = ready.config, ready.client, ready.data
    examples = data.splits[session.split]
    if session.split == "dev" and config.eval.examples:
        examples = examples[: config.eval.examples]
    part = shard(examples, session.shard, session.num_shards)
    if not part:
        return EvalReport(partition_id)
    link = link or connect(session, config, side.node)

    label = f"round {session.round} client {partition_id}: {session.split}"

    def score() -> dict[str, Any]:
        batches = eval_batches(data.encoder, part, config.data.batch_size)
        return client.evaluate(_scored_with_progress(batches, label, len(part)), link)

    try:
        result = score()
        traffic = {"bytes_up": link.bytes_up, "bytes_down": link.bytes_down}  # the swap's pass is not the run's
        swap = wants_swap(config, session)
        if session.round > 0 and not client.params:  # nothing trained: nothing moved, no second pass needed
            result.update(drift_params=0.0, drift_activations=0.0)
            if swap:
                result.update(
                    swap_accuracy=result["accuracy"], swap_loss=result["loss"], swap_correct=result["correct"]
                )
        elif session.round > 0:
            probe = data.encoder((data.splits["dev"] or part)[: config.data.batch_size])  # fixed: the drift's probe
            result.update(measure_bottom(client, config, partition_id, probe, score if swap else None))
    finally:
        link.close()
    return EvalReport(partition_id, **result, **traffic)
