"""The server side of a split: scores perturbed activations and trains its top (FO or ZO)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fl_app.config import Config
from fl_app.metrics import tensor_bytes
from fl_app.protocol import (
    LABEL_KEYS,
    MAX_QUERIES,
    FrameLimits,
    PerturbedPart,
    ProtocolError,
    SelectRequest,
    StepReply,
    StepRequest,
    class_weights,
    decode_frame,
    step_weight,
    validate_part,
    validate_request,
)
from fl_app.scoring import class_scores, classification_loss, scores_and_features
from fl_app.split import ServerTop
from fl_app.subset import class_parts, select_batches, selection_quality
from fl_app.trainable import make_fo_optimizer
from fl_app.zo import ZOEstimator, draw_seeds, step_generator

log = logging.getLogger(__name__)

SCORE_CHUNK_ROWS = 256  # rows per forward when scoring perturbed activations together


@dataclass
class _Entry:
    """One recorded step: whose it was, what applies it again (None: nothing can), the bytes it holds."""

    key: str
    replay: Callable[[], Any] | None
    size: int


class UpdateLedger:
    """What each open session's steps changed in the server's trainable state, so a failed session
    can be undone exactly: as if it had never stepped, whatever other sessions did meanwhile.

    At a session's first step the state (weights, the optimiser's state, and the owner's
    ``counter()``, e.g. its step count) is snapshotted; every step is journalled with what replays
    it. Rollback restores the failed session's snapshot and replays the other sessions' steps that
    came after it, in order, re-taking the snapshots of sessions that began meanwhile; when nobody
    else stepped in between, the restore alone is exact. A finished session is committed, and the
    journal keeps only what an open session's rollback could replay. Past ``journal_bytes`` of
    journalled requests (until the open sessions end), or over steps recorded without a replay, a
    rollback subtracts the session's own accumulated deltas instead (weights and optimiser state:
    exact for plain SGD, not with Adam's moments), and says so.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer | None = None,
        journal_bytes: int | None = None,
        counter: Callable[[], Any] | None = None,
    ):
        self.params, self.optimizer, self.journal_bytes = params, optimizer, journal_bytes
        self.counter = counter or (lambda: None)
        self.deltas: dict[str, list[torch.Tensor]] = {}
        self.snapshots: dict[str, tuple[int, list[torch.Tensor] | None, dict[str, Any] | None, Any]] = {}
        self.journal: list[_Entry] = []
        self.journal_start = 0  # the step number of journal[0]
        self.steps_recorded = 0  # over all sessions
        self.overflowed = False  # the journal outgrew journal_bytes since the open sessions began

    def _optimizer_tensors(self) -> list[tuple[torch.nn.Parameter, str, torch.Tensor]]:
        if self.optimizer is None:
            return []
        return [
            (p, name, value)
            for p in self.params
            for name, value in sorted(self.optimizer.state.get(p, {}).items())
            if torch.is_tensor(value)
        ]

    def _snapshot(self, key: str) -> None:
        state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        weights = [p.detach().clone() for p in self.params]
        self.snapshots[key] = (self.steps_recorded, weights, state, self.counter())

    def track(self, key: str, replay: Callable[[], Any] | None = None, size: int = 0) -> Callable[[], None]:
        """Call before a step of session ``key``; call the returned function after it. ``replay``
        applies the same step again (``size``: the bytes it holds), for another session's rollback."""
        before = [p.detach().clone() for p in self.params]
        opt_before = {(id(p), name): v.clone() for p, name, v in self._optimizer_tensors()}
        if key not in self.snapshots:
            self._snapshot(key)

        def done() -> None:
            self._accumulate(key, before, opt_before)
            if any(k != key for k in self.snapshots):  # only another open session's rollback replays it
                self.journal.append(_Entry(key, replay, size))
            else:
                self.journal.append(_Entry(key, None, 0))
            self.steps_recorded += 1
            self._trim()

        return done

    @torch.no_grad()
    def _accumulate(self, key: str, before: list[torch.Tensor], opt_before: dict) -> None:
        steps = [p.detach() - b for p, b in zip(self.params, before)]
        for p, name, value in self._optimizer_tensors():
            start = opt_before.get((id(p), name))
            steps.append(value - start if start is not None else value.clone())  # fresh state starts at 0
        acc = self.deltas.get(key)
        if acc is None:
            self.deltas[key] = steps
        else:
            acc.extend(torch.zeros_like(d) for d in steps[len(acc) :])  # state created by this step
            for total, d in zip(acc, steps):
                total.add_(d)

    def _trim(self) -> None:
        """Drop the entries no open session's rollback replays; past ``journal_bytes``, every replay."""
        oldest = min((snap[0] for snap in self.snapshots.values()), default=self.steps_recorded)
        drop = max(0, oldest - self.journal_start)
        del self.journal[:drop]
        self.journal_start += drop
        self.overflowed = self.overflowed and bool(self.snapshots)
        held = sum(e.size for e in self.journal)
        if self.journal_bytes is not None and held > self.journal_bytes and not self.overflowed:
            log.warning(
                "the rollback journal holds %.0f MiB, over server-buffer-mb: until the open sessions end, a "
                "rollback subtracts the session's own updates instead of replaying the others' (approximate)",
                held / 2**20,
            )
            self.overflowed = True
        if self.overflowed:
            self.journal = [_Entry(e.key, None, 0) for e in self.journal]

    def commit(self, key: str) -> None:
        self.deltas.pop(key, None)
        self.snapshots.pop(key, None)
        self._trim()

    @torch.no_grad()
    def rollback(self, key: str, restore: Callable[[Any], None] | None = None) -> str:
        """Undo ``key``'s updates; returns "" (nothing to undo), "exact" or "subtracted".

        ``restore(counter)`` sets the owner's counter back to its value at the restored snapshot,
        before the other sessions' steps are replayed (each replay advances it again)."""
        snapshot, deltas = self.snapshots.pop(key, None), self.deltas.pop(key, None)
        if snapshot is None:
            return ""
        started_at, weights, state, counter = snapshot
        later = self.journal[started_at - self.journal_start :]
        others = [e for e in later if e.key != key]
        if weights is None or any(e.replay is None for e in others):  # None: a subtraction since tainted it
            self._subtract(key, deltas or [])
            self._trim()
            return "subtracted"
        for p, w in zip(self.params, weights):
            p.copy_(w)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)
        if restore is not None:
            restore(counter)
        del self.journal[started_at - self.journal_start :]
        self.steps_recorded = started_at
        stepped = {e.key for e in others}
        for k in [k for k, snap in self.snapshots.items() if snap[0] >= started_at and k not in stepped]:
            del self.snapshots[k]  # began since, but no step of it completed: nothing of it to undo
        began_since = {k for k in stepped if k in self.snapshots and self.snapshots[k][0] >= started_at}
        for entry in others:  # their accumulated deltas (the approximate fallback's) stay as first recorded
            if entry.key in began_since:  # its snapshot held the failed session's steps: re-taken
                began_since.discard(entry.key)
                self._snapshot(entry.key)
            try:
                entry.replay()
            except Exception as err:  # e.g. not finite on the restored state: that step stays out
                log.warning("rollback: a step of session %s could not be replayed (%s); it is left out", entry.key, err)
                continue
            self.journal.append(entry)
            self.steps_recorded += 1
        self._trim()
        return "exact"

    def _subtract(self, key: str, deltas: list[torch.Tensor]) -> None:
        """The approximate rollback: subtract ``key``'s accumulated deltas; forget its journal entries.
        A snapshot taken after one of its steps holds that step: it can no longer be restored (its
        weights become None), so that session's own rollback subtracts too."""
        opt = self._optimizer_tensors()
        for target, d in zip([p.detach() for p in self.params] + [v for _, _, v in opt], deltas):
            target.sub_(d)
        mine = [self.journal_start + i for i, e in enumerate(self.journal) if e.key == key]
        self.journal = [e for e in self.journal if e.key != key]
        self.steps_recorded -= len(mine)
        for k, (at, weights, state, counter) in list(self.snapshots.items()):
            held = sum(i < at for i in mine)
            self.snapshots[k] = (at - held, None if held else weights, state, counter)


@dataclass
class PendingStep:
    """A ZO step whose perturbed parts are arriving: its batch fields, the losses of the pairs scored so
    far, and at most one activation waiting for its partner."""

    head: StepRequest
    losses: list[float] = field(default_factory=list)
    buffer: list[torch.Tensor] = field(default_factory=list)
    deferred: int = 0  # activations handed out for scoring (see ScoreJob) whose losses are not back yet


@dataclass
class ScoreJob:
    """Complete (+, -) pairs of one session's step, to be scored, possibly with other sessions' pairs
    (:meth:`SplitServer.score_jobs`); their losses go back with :meth:`SplitServer.add_scores`."""

    key: str
    head: StepRequest
    perturbed: torch.Tensor  # [2m, rows, seq, hidden]


@dataclass(frozen=True)
class BufferLimits:
    """Bytes the server may hold between frames (streamed parts, GradMatch proxies): per session and
    in total (config keys session-buffer-mb and server-buffer-mb)."""

    session_bytes: int
    total_bytes: int


class SplitServer:
    """Owns the top model. Handles one :class:`StepRequest` at a time, in arrival order.

    Perturbed activations are scored with the weights unchanged (inference only), then the
    clean activations drive the server's own update, as in one HOSL step.
    """

    def __init__(
        self,
        top: ServerTop,
        params: list[torch.nn.Parameter],
        config: Config,
        num_classes: int | None = None,
        limits: BufferLimits | None = None,
        frames: FrameLimits | None = None,
    ):
        self.top, self.params, self.config, self.num_classes = top, params, config, num_classes
        self.score_chunk_rows = SCORE_CHUNK_ROWS
        self.device = next(top.parameters()).device  # frames' tensors are moved here as they arrive
        self.limits = limits  # None: unbounded (build_server always passes the config's)
        self.frames = frames  # None: frame shapes bounded only by the frame size (build_server passes the run's)
        self.steps = 0
        self.pending: dict[str, PendingStep] = {}  # a ZO step whose perturbed parts are arriving, per session
        self.proxies: dict[str, dict[int, torch.Tensor]] = {}  # GradMatch class parts [C, d] per session and batch
        self.selections: list[dict[str, float]] = []  # per GradMatch selection: its error vs random subsets'
        optim, zo = config.optim, config.zo
        self.per_query = zo.per_query  # perturbed activations per direction in the clients' ZO steps
        if config.server_order == "fo":
            self.optimizer = make_fo_optimizer(optim.server_optimizer, params, optim.server_lr, optim.weight_decay)
            self.zo = None
        else:
            self.optimizer = None
            self.zo = ZOEstimator(params, zo.eps, optim.server_lr, optim.weight_decay, zo.directions, clip=zo.grad_clip)
        journal = limits.total_bytes if limits is not None else None
        self.ledger = UpdateLedger(params, self.optimizer, journal, counter=lambda: self.steps)

    def rollback(self, session: str) -> str:
        """Undo a failed session's updates: "exact" (weights, optimiser state and step counter as if it
        never stepped; other sessions' later steps replayed), "subtracted" (its own deltas taken off:
        the journal overflowed) or "" (it made none)."""
        return self.ledger.rollback(session, restore=self._set_steps)

    def _set_steps(self, steps: int) -> None:
        self.steps = steps

    def handle_bytes(
        self, payload: bytes, session: str | None = None, defer_scoring: bool = False
    ) -> bytes | ScoreJob | None:
        """Transport entry point: parse, validate, handle and serialise (raises ProtocolError on bad input).

        A perturbed-activation part is scored as soon as its (+, -) pairs are complete and answered with
        ``None`` (no reply frame); with ``defer_scoring`` its complete pairs come back as a
        :class:`ScoreJob` instead, for the caller to score (with other sessions' jobs) and hand back
        with :meth:`add_scores`. With ``session``, the step's weight change is recorded so the session
        can be rolled back.
        """
        frame = decode_frame(payload, limits=self.frames)
        key = session if session is not None else str(frame.meta.get("client", ""))
        if isinstance(frame, SelectRequest):
            return self.select(frame, key).to_bytes()
        if isinstance(frame, PerturbedPart):
            try:
                job = self._take_part(frame, key)
            except (ProtocolError, FloatingPointError):
                self.discard_parts(key)
                raise
            if job is None or defer_scoring:
                return job
            self.add_scores(job, self.score_jobs([job])[0])
            return None
        pending = self.pending.pop(key, None)
        if pending is None:
            return self.handle(frame, session, key).to_bytes()
        if frame.kind != "zo":
            raise ProtocolError(f"perturbed parts were streamed but the step arrived with kind '{frame.kind}'")
        if pending.buffer or pending.deferred:
            raise ProtocolError(
                f"the step's perturbed parts end with an unpaired or unscored activation "
                f"({len(pending.losses) + 1} streamed; field 'perturbed' needs (+, -) pairs)"
            )
        for name in ("attention_mask", *LABEL_KEYS):
            mine, theirs = getattr(pending.head, name), getattr(frame, name)  # on the device / as decoded
            if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine.cpu(), theirs)):
                raise ProtocolError(f"field '{name}' of the step differs from the one its perturbed parts announced")
        if class_weights(frame) != class_weights(pending.head):
            raise ProtocolError("field 'class_weights' of the step differs from the one its perturbed parts announced")
        if tuple(frame.clean.shape) != tuple(pending.head.clean.shape):
            raise ProtocolError(
                f"field 'clean' has shape {list(frame.clean.shape)}, but the step's perturbed parts "
                f"have [{', '.join(map(str, pending.head.clean.shape))}]"
            )
        return self.handle(frame, session, key, scored=torch.tensor(pending.losses)).to_bytes()

    def _take_part(self, part: PerturbedPart, key: str) -> ScoreJob | None:
        """Buffer one part; every complete (+, -) pair comes back as one job (scored together, under
        one version of the weights). Checked as decoded, then moved to the server's device."""
        validate_part(part, self.top.hidden_size)
        head = part.head()
        if head is not None:
            if key in self.pending:
                raise ProtocolError("a perturbed part announced a new step before the previous one finished")
            validate_request(head, self.top.hidden_size, self.num_classes, **self._model_fields())
        part = part.to(self.device)
        if head is not None:
            self.pending[key] = PendingStep(part.head())
        pending = self.pending.get(key)
        if pending is None:
            raise ProtocolError(
                "the first perturbed part of a step must carry the batch's 'attention_mask' and 'labels'"
            )
        if tuple(part.perturbed.shape[1:]) != tuple(pending.head.clean.shape):
            raise ProtocolError(
                f"field 'perturbed' of a part has shape {list(part.perturbed.shape)}, expected "
                f"[k, {', '.join(map(str, pending.head.clean.shape))}]"
            )
        pending.buffer.append(part.perturbed)
        buffered = sum(p.shape[0] for p in pending.buffer)
        most = self.frames.activations if self.frames is not None else 2 * MAX_QUERIES
        if len(pending.losses) + pending.deferred + buffered > most:
            raise ProtocolError(f"more than {most} perturbed activations streamed for one step (2 x zo-queries)")
        job = None
        if buffered >= self.per_query:
            stacked = torch.cat(pending.buffer)
            pairs = buffered - buffered % self.per_query
            job = ScoreJob(key, pending.head, stacked[:pairs])
            pending.deferred += pairs
            pending.buffer = [stacked[pairs:].clone()] if pairs < buffered else []
            head = pending.head
            if head.clean.untyped_storage().nbytes() > head.clean.nbytes:  # a view of the first part: keep one row
                head.clean = head.clean.clone()
        self._check_buffers(key)
        return job

    def _model_fields(self) -> dict[str, Any]:
        """What :func:`validate_request` checks a frame's fields against."""
        return {"vocab_size": self.top.vocab_size, "decoder": self.top.family != "bert", "per_query": self.per_query}

    def add_scores(self, job: ScoreJob, losses: torch.Tensor) -> None:
        """The losses of ``job``'s activations, in order, back into its step (ignored if the session
        ended meanwhile)."""
        pending = self.pending.get(job.key)
        if pending is None or pending.head is not job.head:
            return
        pending.losses.extend(losses.tolist())
        pending.deferred -= job.perturbed.shape[0]

    def buffered_bytes(self, key: str | None = None) -> int:
        """Bytes held between frames for session ``key`` (all sessions if None)."""
        keys = [key] if key is not None else set(self.pending) | set(self.proxies)
        held = []
        for k in keys:
            pending = self.pending.get(k)
            if pending is not None:
                head = pending.head
                held += [head.clean, head.attention_mask, head.labels, head.score_ids, head.target_ids, *pending.buffer]
            held += list(self.proxies.get(k, {}).values())
        return tensor_bytes(held)

    def _check_buffers(self, key: str) -> None:
        """Refuse (ProtocolError: the session fails and its buffers are freed) past a buffer limit."""
        if self.limits is None:
            return
        mine, total = self.buffered_bytes(key), self.buffered_bytes()
        if mine > self.limits.session_bytes:
            raise ProtocolError(
                f"the session holds {mine / 2**20:.1f} MiB of streamed parts and proxies, over "
                f"session-buffer-mb = {self.limits.session_bytes / 2**20:.0f}"
            )
        if total > self.limits.total_bytes:
            raise ProtocolError(
                f"the server holds {total / 2**20:.1f} MiB of streamed parts and proxies over all sessions, over "
                f"server-buffer-mb = {self.limits.total_bytes / 2**20:.0f}"
            )

    def discard_parts(self, key: str) -> None:
        """Forget a session's streamed parts and proxies (its step or selection will never complete)."""
        self.pending.pop(key, None)
        self.proxies.pop(key, None)

    def select(self, req: SelectRequest, key: str) -> StepReply:
        """GradMatch (per class with ``meta['per_class']``) over the proxies this session sent for
        batches 0..num_batches-1; forgets them."""
        proxies = self.proxies.pop(key, {})
        if len(proxies) != req.num_batches or set(proxies) != set(range(len(proxies))):  # not the declared range
            raise ProtocolError(
                f"field 'num_batches' of a select request is {req.num_batches}, but proxies arrived for "
                f"{len(proxies)} batches: {sorted(proxies)[:10]} (expected batches 0..num_batches-1)"
            )
        per_class = req.meta.get("per_class", False)
        if not isinstance(per_class, bool):
            raise ProtocolError(f"field 'per_class' of a select request is {per_class!r}, expected true or false")
        parts = torch.stack([proxies[i] for i in range(req.num_batches)])  # [batches, C, d]
        rows = parts if per_class else parts.sum(1)
        subset = select_batches(
            "gradmatch-pc" if per_class else "gradmatch",
            rows,
            req.num_batches,
            req.budget,
            torch.Generator().manual_seed(req.seed),
        )
        self.selections.append(selection_quality(rows, subset, req.seed))
        weights = subset.class_weights()
        return StepReply(
            clean_loss=0.0,
            batch_ids=torch.tensor(subset.batch_ids),
            batch_weights=weights if per_class else weights[:, 0],
        )

    def _scores(self, hidden: torch.Tensor, req: StepRequest) -> torch.Tensor:
        return class_scores(
            self.top, hidden, req.attention_mask, req.score_ids, req.target_ids, batch_size=req.labels.shape[0]
        )

    def _loss(self, hidden: torch.Tensor, req: StepRequest, weights: torch.Tensor | None) -> torch.Tensor:
        return classification_loss(self._scores(hidden, req), req.labels, weights)

    def score_perturbed(self, req: StepRequest, perturbed: torch.Tensor) -> torch.Tensor:
        """Losses of perturbed activations ``[k, rows, seq, hidden]`` of ``req``'s batch."""
        return self.score_jobs([ScoreJob("", req.to(self.device), perturbed.to(self.device))])[0]

    @torch.no_grad()
    def score_jobs(self, jobs: list[ScoreJob]) -> list[torch.Tensor]:
        """Losses of each job's perturbed activations, several activations (of one step or of several
        clients' steps) per forward as long as they fit in ``score_chunk_rows`` rows. Activations of
        different lengths are right-padded to the longest in their forward (masked positions)."""
        losses: list[list[torch.Tensor]] = [[] for _ in jobs]
        chunk: list[tuple[int, int]] = []
        rows = 0
        units = [(j, i) for j, job in enumerate(jobs) for i in range(job.perturbed.shape[0])]
        for unit in [*units, None]:
            size = 0 if unit is None else jobs[unit[0]].head.labels.shape[0]
            if chunk and (unit is None or rows + size > self.score_chunk_rows):
                for (j, _), loss in zip(chunk, self._score_units(jobs, chunk)):
                    losses[j].append(loss)
                chunk, rows = [], 0
            if unit is not None:
                chunk.append(unit)
                rows += size
        return [torch.stack(job_losses) for job_losses in losses]

    def _score_units(self, jobs: list[ScoreJob], units: list[tuple[int, int]]) -> list[torch.Tensor]:
        """One forward over the activations ``units`` name ((job, index) pairs); a loss per unit."""
        heads = [jobs[j].head for j, _ in units]
        seq = max(head.attention_mask.shape[1] for head in heads)

        def padded(t: torch.Tensor, value: float, dim: int = 1) -> torch.Tensor:
            if t.shape[dim] == seq:
                return t
            return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, seq - t.shape[dim]], value=value)

        hidden = torch.cat([padded(jobs[j].perturbed[i].float(), 0.0) for j, i in units])
        mask = torch.cat([padded(head.attention_mask, 0) for head in heads])
        labels = torch.cat([head.labels for head in heads])
        score_ids = None if heads[0].score_ids is None else torch.cat([head.score_ids for head in heads])
        targets = None if heads[0].target_ids is None else torch.cat([padded(h.target_ids, -100) for h in heads])
        scores = class_scores(self.top, hidden, mask, score_ids, targets, batch_size=labels.shape[0])
        out, start = [], 0
        for head in heads:
            end = start + head.labels.shape[0]
            out.append(classification_loss(scores[start:end], head.labels, _class_weights(head)))
            start = end
        return out

    def handle(
        self, req: StepRequest, session: str | None = None, key: str = "", scored: torch.Tensor | None = None
    ) -> StepReply:
        """Score, then train (or only evaluate for ``kind == 'eval'``, or compute the batch's
        last-layer gradient proxy for ``kind == 'proxy'``, kept under ``key`` until selection).
        ``scored``: the losses of this step's perturbed activations, already scored as they streamed in."""
        validate_request(
            req, self.top.hidden_size, self.num_classes, streamed=scored is not None, **self._model_fields()
        )
        req = req.to(self.device)  # checked as decoded (on the CPU), then moved
        perturbed_losses = self.score_perturbed(req, req.perturbed) if req.perturbed is not None else scored
        clean = req.clean.float()
        if req.kind == "proxy":
            with torch.no_grad():
                scores, features = scores_and_features(
                    self.top, clean, req.attention_mask, req.score_ids, req.target_ids, batch_size=req.labels.shape[0]
                )
                loss = classification_loss(scores, req.labels)
            parts = class_parts(features, scores, req.labels)  # on the CPU, where selection runs
            if not torch.isfinite(parts).all():  # a diverged top: selecting on it would record NaN quality
                raise FloatingPointError(f"server gradient proxies are not finite at server step {self.steps}")
            self.proxies.setdefault(key, {})[int(req.meta["batch"])] = parts
            self._check_buffers(key)  # past a limit the session fails, and failing discards its buffers
            correct = int((scores.argmax(1) == req.labels).sum())
            return StepReply(clean_loss=float(loss), correct=correct, count=int(req.labels.shape[0]))
        if req.kind == "eval":
            with torch.no_grad():
                scores = self._scores(clean, req)
                loss = classification_loss(scores, req.labels)
            right = scores.argmax(1) == req.labels
            return StepReply(
                clean_loss=float(loss), correct=int(right.sum()), count=int(req.labels.shape[0]), example_correct=right
            )
        record = None
        if session is not None and self.params:
            kept = dataclasses.replace(req, perturbed=None)  # what a replay needs: not the 2Q perturbed activations
            size = tensor_bytes(kept._tensors().values())
            record = self.ledger.track(session, functools.partial(self._replay, kept), size)
        self.steps += 1
        loss, grad = self._train(clean, req, need_grad=req.kind == "fo")
        if record is not None:
            record()
        return StepReply(clean_loss=loss, perturbed_losses=perturbed_losses, grad=grad)

    def _train(self, clean: torch.Tensor, req: StepRequest, need_grad: bool) -> tuple[float, torch.Tensor | None]:
        """The server's update on the step's clean activations ``clean`` (float32), and for an FO client
        their gradient."""
        if self.zo is not None:
            return self._zo_step(clean, req), None
        return self._fo_step(clean, req, need_grad=need_grad)

    def _replay(self, req: StepRequest) -> None:
        """The same update again, as the next server step (another session's rollback replays it)."""
        self.steps += 1
        self._train(req.clean.float(), req, need_grad=False)

    @torch.enable_grad()  # independent of the caller's grad mode (e.g. a same-thread ZO client)
    def _fo_step(self, clean: torch.Tensor, req: StepRequest, need_grad: bool) -> tuple[float, torch.Tensor | None]:
        clean = clean.detach().requires_grad_(need_grad)  # a leaf: backprop stops at the cut
        loss = self._loss(clean, req, _class_weights(req))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"server loss is {float(loss.detach())} at server step {self.steps}; no update applied"
            )
        if self.optimizer is None and not need_grad:
            return float(loss.detach()), None
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        (loss * step_weight(req)).backward()  # a subset batch's weight scales its update
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        grad = clean.grad.to(req.clean.dtype) if need_grad else None
        return float(loss.detach()), grad

    @torch.no_grad()
    def _zo_step(self, clean: torch.Tensor, req: StepRequest) -> float:
        weights = _class_weights(req)  # parsed once, not once per perturbed forward
        loss = float(self._loss(clean, req, weights))
        if not math.isfinite(loss):
            raise FloatingPointError(f"server loss is {loss} at server step {self.steps}; no update applied")
        seeds = draw_seeds(step_generator(self.config.run.seed, self.steps), self.config.zo.queries)
        self.zo.step(seeds, lambda: float(self._loss(clean, req, weights)), weight=step_weight(req))
        return loss


def _class_weights(req: StepRequest) -> torch.Tensor | None:
    """The request's per-class loss weights as a tensor (None: the plain mean)."""
    weights = class_weights(req)
    return None if weights is None else torch.tensor(weights)
