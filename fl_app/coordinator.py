"""Server-side state of one run, shared by the Flower ServerApp and the local runner: the shared
top, the sessions (served over gRPC, or in process), client selection, commit / roll back, synced
history, checkpoints and results.json. The round loop that drives it is :mod:`fl_app.rounds`.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import random
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fl_app.bottom_effect import divergence
from fl_app.checkpoint import (
    CheckpointRefused,
    RunFolderLock,
    check_run_checkpoint,
    mark_failed,
    read_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from fl_app.client_store import keep_committed_states
from fl_app.config import Config
from fl_app.cross_scoring import CrossClientScorer
from fl_app.frame_auth import node_key, read_key_file, read_pem
from fl_app.metrics import pool_eval, release_freed_memory
from fl_app.plots import plot_results
from fl_app.protocol import ProtocolError
from fl_app.records import EvalReport, History, SessionSettings, TrainReport, session_id
from fl_app.scenario import build_server, load_server_top
from fl_app.server_party import ScoreJob
from fl_app.split import param_counts
from fl_app.stream import Session, SessionTable, StepStreamServer
from fl_app.tasks import get_task
from fl_app.tracking import Tracker, eval_values, open_tracker, round_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamCredentials:
    """What the step stream's server holds: its TLS certificate and key, and the secret node keys
    derive from (None: no TLS / no node authentication)."""

    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    secret: bytes | None = None


def stream_credentials(config: Config) -> StreamCredentials:
    """Read the files the stream settings name (on the server's machine), or raise naming the field."""
    s = config.stream
    return StreamCredentials(
        tls_cert=read_pem(s.tls_cert, "stream-tls-cert") if s.tls_cert else None,
        tls_key=read_pem(s.tls_key, "stream-tls-key") if s.tls_key else None,
        secret=read_key_file(s.secret_file, "stream-secret-file") if s.secret_file else None,
    )


class Coordinator:
    """Owns the server party and the step stream for one run."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        credentials: StreamCredentials | None = None,
        serve_stream: bool = True,
    ):
        """``serve_stream=False``: no gRPC server; clients in this process reach :meth:`handle` directly.
        ``credentials``: see :func:`stream_credentials` (default: none, a plain stream)."""
        credentials = credentials or StreamCredentials()
        self.folder_lock = RunFolderLock(out_dir)  # first: a second run into the folder stops here
        self.config = config  # this run segment's (a tuning trial's overrides applied)
        self.base_config = config
        self.out_dir = out_dir
        self.trial = 0  # which trial (tuning) or run segment client sessions belong to; 0 = a plain run
        self.overrides: dict[str, Any] = {}
        torch.manual_seed(config.run.seed)
        self.num_classes = get_task(config.data.task).num_classes
        _loaded, top = load_server_top(config)  # the server never loads the bottom's layers
        self.pristine_top = copy.deepcopy(top) if config.tune.trials else None  # trials restart from it
        self.server = build_server(config, top, self.num_classes)
        self.client_order = config.client_order
        self.lock = threading.Lock()
        self.scorer = CrossClientScorer(self.lock) if config.federation.score_across_clients else None
        self.stream: SessionTable = (
            StepStreamServer(
                self.handle,
                host=config.stream.host,
                port=config.stream.port,
                max_workers=config.stream.workers or max(4, 2 * config.federation.max_concurrent_clients),
                max_message_bytes=config.stream.max_frame_mb * 2**20,
                tls_cert=credentials.tls_cert,
                tls_key=credentials.tls_key,
                on_failure=self._rollback,
            )
            if serve_stream
            else SessionTable(on_failure=self._rollback)
        )
        self.root_certificate = (credentials.tls_cert or b"").decode()
        self.secret = credentials.secret
        self.history = History()
        self.average: dict[str, torch.Tensor] | None = None
        self.synced: dict[int, int] = {}  # client -> the round through which it has the synced updates
        self.committed: dict[int, str] = {}  # client -> id of its last committed training session, this trial
        self.refused_before: dict[str, int] = {}  # refusals counted before a resume
        self.finished_round = 0  # the last round checkpointed (what a resumed run continues from)
        self.run_id = secrets.token_hex(8)  # names this run's client states (a resumed run keeps it)
        self.results: dict[str, Any] = {
            "mode": config.run.mode,
            "config": dict(config),
            "num_clients": config.federation.num_clients,  # under Flower: the federation's (server_app)
            "machine": machine(),
            "parameters": {"server": param_counts(self.server.top)},
            "devices": {"server": str(self.server.device), "clients": []},  # clients: every device seen
            "history": [],
            "rounds": [],
            "eval": {"history": []},
            "client": {},
            "comm": {"bytes_up": 0, "bytes_down": 0},
            "step_seconds": 0.0,
        }
        self.started = time.perf_counter()
        self.tracker: Tracker | None = None  # opened with the first round it logs

    def reset(self, trial: int, overrides: Mapping[str, Any]) -> None:
        """Start run segment ``trial`` from the starting weights with ``overrides`` (a tuning trial's
        hyper-parameters): a fresh top and optimiser, no synced history; clients holding state of
        another trial start from their pristine bottom. Per-round results restart; byte totals go on."""
        if self.pristine_top is None:
            raise RuntimeError("reset needs the pristine top, kept only when tune-trials > 0")
        with self.lock:
            self.config = self.base_config.updated(overrides)
            self.server = build_server(self.config, copy.deepcopy(self.pristine_top), self.num_classes)
        self.trial, self.overrides = trial, dict(overrides)
        self.history, self.average, self.synced, self.committed = History(), None, {}, {}
        self.results.update(history=[], rounds=[], step_seconds=0.0)
        self.results["eval"] = {"history": []}

    @property
    def advertised_address(self) -> str:
        """Where clients reach the step stream ("in-process" without a gRPC server)."""
        if not isinstance(self.stream, StepStreamServer):
            return "in-process"
        host = self.config.stream.advertise_host or self.config.stream.host
        return f"{host}:{self.stream.port}"

    def handle(self, token: str, payload: bytes) -> bytes | None:
        """One frame of session ``token`` (refused once the session failed or closed: a step arriving
        after its session was rolled back must not land). With ``score-across-clients``, a part's
        complete pairs are scored together with the pairs other sessions have waiting."""
        with self.lock:  # the top is shared: steps are applied one at a time, in arrival order
            session = self.stream.sessions.get(token)
            if session is None or session.status != "open":
                raise ProtocolError("the session is no longer open (failed, timed out or closed)")
            server = self.server
            answer = server.handle_bytes(payload, session=token, defer_scoring=self.scorer is not None)
        if isinstance(answer, ScoreJob):
            self.scorer.score(server, answer)
            return None
        return answer

    def _rollback(self, session: Session) -> None:
        with self.lock:
            self.server.discard_parts(session.token)
            how = self.server.rollback(session.token)
            if how:
                log.warning("rolled back client %s's partial session (%s)", session.client_id, how)

    def select(self, partition_ids: list[int], rnd: int) -> list[int]:
        """Seeded selection of ``fraction-train`` of the clients, at least ``min-clients``."""
        want = max(
            self.config.federation.min_clients, round(self.config.federation.fraction_train * len(partition_ids))
        )
        want = min(want, len(partition_ids))
        chosen = random.Random(self.config.run.seed * 7_777 + rnd).sample(sorted(partition_ids), want)
        return sorted(chosen)

    def open(self, client_id: int, rnd: int, **extra: Any) -> tuple[Session, SessionSettings]:
        """A new session for ``client_id`` and the settings its session message carries (``extra``: a
        training session's ``subset`` plan, an evaluation's ``split``, ``shard`` and ``num_shards``)."""
        session = self.stream.open_session(str(client_id), node_key(self.secret, client_id) if self.secret else None)
        session.base = self.committed.get(client_id, "")
        settings = {
            "client": client_id,
            "round": rnd,
            "token": session.token,
            "address": self.advertised_address,
            "local_steps": self.config.optim.local_steps,
            "root_certificate": self.root_certificate or "",
            "node_auth": self.secret is not None,  # the client needs its node key (stream-key-file)
            "trial": self.trial,
            "run_id": self.run_id,  # clients keep their states per run, per round, in state-dir
            "state_dir": str(self.out_dir.resolve() / "clients" / self.run_id)  # absolute: clients check it
            if self.config.run.client_checkpoints
            else "",
            "base": session.base,  # the client loads the state of that session, whichever node it is on
        }
        return session, SessionSettings(**{**settings, **extra})

    def history_for(self, client_id: int, synced_round: int) -> History | None:
        """History entries client ``client_id``, synced through ``synced_round``, still needs (synced ZO only)."""
        if self.config.federation.bottoms != "synced" or self.client_order != "zo":
            return None
        return self.history.since(synced_round, exclude_client=client_id)

    def finish_train(self, session: Session, report: TrainReport | None, reason: str = "") -> bool:
        """Commit a session's updates if the client reported success in a report that holds up
        (:meth:`TrainReport.problem`) and no other session of its client was committed since it opened
        (it started from the client's last committed state), otherwise roll them back."""
        if report is not None and session.status == "open":
            queries = self.config.zo.queries if self.config.zo_trained_client else 0
            problem = report.problem(int(session.client_id), queries)
            if problem is not None:  # never committed, never in the synced history: the client is dropped
                report, reason = None, f"bad report: {problem}"
            elif session.base != self.committed.get(int(session.client_id), ""):
                report = None  # two sessions of one client at once: the client kept the other's state
                reason = f"another session of client {session.client_id} was committed after this one opened"
        if report is None or session.status != "open":
            self.stream.fail(session, reason or session.reason or "no report")
            self._end(session)
            return False
        with self.lock:
            self.server.ledger.commit(session.token)
        self.committed[int(session.client_id)] = session_id(session.token)
        self._end(session)
        return True

    def finish_eval(self, session: Session) -> None:
        self._end(session)

    def _end(self, session: Session) -> None:
        """Close a session and free what the server buffered for it (streamed parts, proxies), on
        every end: a client that closes cleanly mid-step leaves nothing behind."""
        self.stream.close_session(session)
        with self.lock:
            self.server.discard_parts(session.token)
        release_freed_memory()

    def expire_idle(self) -> list[Session]:
        return self.stream.expire_idle(self.config.federation.step_timeout)

    def record_round(
        self,
        rnd: int,
        reports: list[TrainReport],
        dropped: list[dict[str, Any]],
        evaluation: dict[str, Any] | None,
        seconds: float,
    ) -> dict[str, Any]:
        """Fold one round's reports into the results and checkpoint (after :meth:`sync`)."""
        for rep in sorted(reports, key=lambda r: r.partition_id):
            self.results["parameters"]["client"] = {
                "params": rep.bottom_params,
                "trainable": rep.bottom_trainable,
            }
            for loss in rep.losses:
                self.results["history"].append(
                    {
                        "round": rnd,
                        "client": rep.partition_id,
                        "train_loss": loss,
                        "bytes_up": rep.bytes_up / max(1, rep.steps),
                        "bytes_down": rep.bytes_down / max(1, rep.steps),
                        "peak_memory_bytes": rep.peak_memory_bytes,
                    }
                )
            self.results["step_seconds"] += rep.step_seconds
            # the clients sample the same splits: any report's truncation counts are the run's
            self.results["data"] = {"max_length": rep.max_length, "truncated": dict(rep.truncated)}
            seen = self.results.setdefault("devices", {}).setdefault("clients", [])
            if rep.device and rep.device not in seen:
                seen.append(rep.device)
            self.results["comm"]["bytes_up"] += rep.bytes_up + rep.message_bytes_up
            self.results["comm"]["bytes_down"] += rep.bytes_down + rep.message_bytes_down
        losses = [loss for rep in reports for loss in rep.losses]
        entry = {
            "round": rnd,
            "train_loss": sum(losses) / len(losses) if losses else None,
            "accuracy": None if evaluation is None else evaluation["accuracy"],
            "clients": sorted(r.partition_id for r in reports),
            "dropped": dropped,
            # clients that started from their state on disk (a restarted node, a resumed run): its round
            "restored": {str(r.partition_id): r.restored_round for r in reports if r.restored_round},
            "seconds": seconds,
            "bytes_up": sum(r.bytes_up + r.message_bytes_up for r in reports),
            "bytes_down": sum(r.bytes_down + r.message_bytes_down for r in reports),
            "message_bytes_up": sum(r.message_bytes_up for r in reports),
            "message_bytes_down": sum(r.message_bytes_down for r in reports),
            "steps": sum(r.steps for r in reports),
            # the sessions' step time, summed and the longest: the rest of the round's seconds is fixed cost
            "step_seconds": {
                "sum": sum(r.step_seconds for r in reports),
                "max": max((r.step_seconds for r in reports), default=0.0),
            },
            "state_seconds": sum(r.state_seconds for r in reports),  # clients getting their states ready
            "selection_seconds": sum(r.selection_seconds for r in reports),
            "selection_bytes": sum(r.selection_bytes_up + r.selection_bytes_down for r in reports),
            "selection_quality": self.take_selections(),
        }
        grads = [abs(g) for rep in reports for step in rep.grads for g in step]
        if grads:  # the ZO estimates' scale: what a zo-grad-clip bound cuts
            entry["zo_grad_abs"] = {"median": statistics.median(grads), "max": max(grads)}
        self.results["rounds"].append(entry)
        if evaluation is not None:
            self.results["eval"]["history"].append({"round": rnd, **evaluation})
            entry["diverging"] = divergence(self.results["eval"]["history"])
        self._track_round(rnd, reports, entry, evaluation)
        self.checkpoint(rnd)
        return entry

    def _track_round(
        self, rnd: int, reports: list[TrainReport], entry: dict[str, Any], evaluation: dict[str, Any] | None
    ) -> None:
        """The round's per-step losses (numbered across the run) and its scalars, to the tracker; a
        tuning trial's under ``trial<N>/``."""
        if self.tracker is None:
            name = self.out_dir.name
            self.tracker = open_tracker(self.config.run.tracker, self.out_dir, dict(self.base_config), name)
        prefix = f"trial{self.trial}/" if self.trial and self.trial <= self.config.tune.trials else ""
        first = len(self.results["history"]) - sum(len(r.losses) for r in reports)
        losses = [loss for rep in sorted(reports, key=lambda r: r.partition_id) for loss in rep.losses]
        points = [(f"{prefix}train/loss", loss, first + i) for i, loss in enumerate(losses)]
        peak = max((r.peak_memory_bytes for r in reports), default=0)
        points += [(f"{prefix}{k}", v, rnd) for k, v in round_values(entry, evaluation, peak).items()]
        self.tracker.log(points)

    def sync(self, rnd: int, reports: list[TrainReport]) -> None:
        """Synced bottoms: add the round's ZO steps to the history, or average the FO clients'
        weights, before the round is evaluated (so evaluation sees this round's updates)."""
        if self.config.federation.bottoms != "synced":
            return
        if self.client_order == "zo":
            for rep in sorted(reports, key=lambda r: r.partition_id):
                self.history.extend(rnd, rep.partition_id, rep.step_lrs, rep.seeds, rep.grads, rep.rows)
        else:
            self.average = fedavg([r.weights for r in reports], [r.steps for r in reports]) or self.average

    def take_selections(self) -> list[dict[str, float]]:
        """The server's GradMatch selection diagnostics since the last call."""
        with self.lock:
            taken, self.server.selections = self.server.selections, []
        return taken

    def record_eval(self, rnd: int, reports: list[EvalReport]) -> dict[str, Any]:
        result = pool_eval(reports)
        for rep in reports:
            self.results["comm"]["bytes_up"] += rep.bytes_up
            self.results["comm"]["bytes_down"] += rep.bytes_down
        return result

    def record_tuning(self, tuning: dict[str, Any]) -> None:
        """The tuning study's summary (before the best configuration's run)."""
        self.results["tuning"] = tuning

    def record_untrained(self, evaluation: dict[str, Any]) -> None:
        """The untrained bottom's dev evaluation: the baseline, recorded as round 0."""
        self.results["eval"]["history"].append({"round": 0, **evaluation})

    def record_test(self, evaluation: dict[str, Any] | None) -> None:
        self.results["eval"]["test"] = evaluation

    def record_tuned_run(self, seconds: float) -> None:
        """What the tuned configuration's run on full data gave (after tuning): its rate, time, accuracies."""
        self.results["tuning"]["final"] = {
            "params": self.overrides,
            "rounds": self.config.federation.num_rounds,
            "seconds": seconds,
            "dev_accuracy": self.results["rounds"][-1]["accuracy"],  # the last round always evaluates
            "test_accuracy": (self.results["eval"].get("test") or {}).get("accuracy"),
        }

    def record_federation(self, num_clients: int) -> None:
        """The federation's client count (under Flower it, not the scenario, decides)."""
        self.results["num_clients"] = num_clients

    def record_message_rtts(self, seconds: list[float]) -> None:
        self.results["flower_message_rtt_seconds"] = seconds

    def last_round_clients(self) -> list[int]:
        """The clients of the last recorded round ([] before any)."""
        return self.results["rounds"][-1]["clients"] if self.results["rounds"] else []

    def checkpoint(self, rnd: int) -> None:
        """Everything a resumed run needs after round ``rnd`` (the server's weights, optimiser state and
        step count, the synced state, the results so far, the RNG), in one atomic file; then results.json."""
        self.finished_round = rnd
        self._summarise("running")
        trainable = {n: p.detach() for n, p in self.server.top.named_parameters() if p.requires_grad}
        optimizer = self.server.optimizer
        save_checkpoint(
            self.out_dir / "checkpoint.pt",
            {
                "round": rnd,
                "run_id": self.run_id,
                "server": trainable,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "server_steps": self.server.steps,
                "history": self.history.__dict__,
                "average": self.average,
                "synced": self.synced,
                "committed": self.committed,
                "results": json.dumps(self.results, default=float),  # plain JSON, as results.json
                "rng": torch.get_rng_state(),
            },
        )
        self._write()

    def resume(self, folder: Path) -> None:
        """Continue the run checkpointed in ``folder`` (checked first by
        :func:`fl_app.preflight.check_out_dir`) after its last finished round; a checkpoint that does
        not fit this run is refused (CheckpointRefused) and that run's results.json marked failed."""
        try:
            saved = read_checkpoint(folder / "checkpoint.pt")
            check_run_checkpoint(saved, self.server.top, "resume")
        except CheckpointRefused as err:  # the run it would continue is marked failed, kept as it was
            mark_failed(folder, str(err))
            raise
        with self.lock:
            params = dict(self.server.top.named_parameters())
            with torch.no_grad():
                for name, weights in saved["server"].items():
                    params[name].copy_(weights)
            if self.server.optimizer is not None:
                self.server.optimizer.load_state_dict(saved["optimizer"])
            self.server.steps = saved["server_steps"]
        self.history = History(**saved["history"])
        self.average, self.synced = saved["average"], dict(saved["synced"])
        self.committed = dict(saved["committed"])
        self.results = json.loads(saved["results"])
        self.refused_before = self.results.get("refused", {})
        self.results.setdefault("resumed", []).append({"after_round": saved["round"], "config": dict(self.config)})
        self.results["config"] = dict(self.config)
        self.started = time.perf_counter() - self.results.get("wall_seconds", 0.0)
        torch.set_rng_state(saved["rng"])
        self.finished_round, self.run_id = saved["round"], saved["run_id"]

    def write_results(self, status: str = "running", error: str = "") -> Path:
        """Write results.json; ``status`` is "running" after a round, "finished" at the end and
        "failed" (with ``error``) when the run raised."""
        self._summarise(status, error)
        if status == "finished" and self.results["rounds"]:
            self.results["plot"] = str(plot_results(self.results, self.out_dir / "results.png"))
        if status == "finished":  # nothing resumes a finished run: each client's final state is enough
            keep_committed_states(self.out_dir / "clients" / self.run_id, self.committed)
        if status != "running" and self.tracker is not None:
            test = self.results["eval"].get("test")
            if test:
                last = self.results["rounds"][-1]["round"] if self.results["rounds"] else 0
                self.tracker.log([(k, v, last) for k, v in eval_values("test", test).items()])
            self.tracker.close()
            self.tracker = None
        return self._write()

    def _write(self) -> Path:
        path = self.out_dir / "results.json"
        write_json_atomic(path, self.results)
        return path.resolve()

    def _summarise(self, status: str, error: str = "") -> None:
        """Bring the results' totals up to date."""
        self.results["status"] = status
        if error:
            self.results["error"] = error
        history = self.results["history"]
        if history:
            self.results["client"]["peak_memory_bytes"] = max(h["peak_memory_bytes"] for h in history)
            self.results["client"]["seconds_per_step"] = self.results["step_seconds"] / len(history)
            self.results["comm"]["train_bytes_up_per_step"] = sum(h["bytes_up"] for h in history) / len(history)
            self.results["comm"]["train_bytes_down_per_step"] = sum(h["bytes_down"] for h in history) / len(history)
        trained = [e for e in self.results["eval"]["history"] if e["round"] > 0]  # not the untrained baseline
        if trained:
            self.results["eval"]["accuracy"] = trained[-1]["accuracy"]
        self.results["wall_seconds"] = time.perf_counter() - self.started
        refused = Counter(self.refused_before) + Counter(self.stream.refusals())
        self.results["refused"] = dict(refused)  # streams and frames the step stream refused (all segments)

    def close(self) -> None:
        self.stream.stop()
        self.folder_lock.release()


def machine() -> dict[str, Any]:
    """The software and threads a run used (written into results.json)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
    }


def fedavg(weights: list[Mapping[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor] | None:
    """Weighted average of the clients' trainable tensors (synced FO bottoms)."""
    pairs = [(w, c) for w, c in zip(weights, counts) if w and c]
    if not pairs:
        return None
    total = sum(c for _, c in pairs)
    return {name: sum(w[name].float() * (c / total) for w, c in pairs) for name in pairs[0][0]}
