"""The client side of a split: holds the bottom, talks to the server only through bytes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fl_app import step_timing
from fl_app.config import Config
from fl_app.metrics import release_freed_memory, resident_bytes, track_peak_memory
from fl_app.protocol import LABEL_KEYS, WIRE_DTYPES, PerturbedPart, SelectRequest, StepReply, StepRequest
from fl_app.schedules import lr_factor
from fl_app.split import ClientBottom
from fl_app.subset import Subset
from fl_app.trainable import make_fo_optimizer
from fl_app.zo import make_estimator, pack_rows


class Link(Protocol):
    """How a client reaches the server: frames without a reply, and request/reply exchanges."""

    def send(self, payload: bytes) -> None: ...

    def exchange(self, payload: bytes) -> bytes: ...


def embedding_roles(bottom: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[tuple[str, int] | None]:
    """Per trainable parameter: ``("tokens", 0)`` for the input embedding, ``("positions", offset)`` for a
    learned position embedding (rows ``offset .. offset + seq_len - 1`` are the ones a batch can use),
    None for every other tensor (perturbed in full)."""
    roles: dict[int, tuple[str, int]] = {}
    for name, module in bottom.named_modules():
        if isinstance(module, torch.nn.Embedding):
            if "position" in name.rsplit(".", 1)[-1]:
                roles[id(module.weight)] = ("positions", int(getattr(module, "offset", 0)))
            elif module is bottom.body.get_input_embeddings():
                roles[id(module.weight)] = ("tokens", 0)
    return [roles.get(id(p)) for p in params]


def batch_rows(
    roles: list[tuple[str, int] | None], params: list[torch.nn.Parameter], input_ids: torch.Tensor
) -> list[torch.Tensor | None]:
    """The embedding rows a batch can touch (sorted ids), per parameter; None where every row is used."""
    rows: list[torch.Tensor | None] = []
    for role, p in zip(roles, params):
        if role is None:
            rows.append(None)
        elif role[0] == "tokens":
            rows.append(torch.unique(input_ids))
        else:
            rows.append(torch.arange(min(p.shape[0], role[1] + input_ids.shape[1])))
    return rows


def step_weighting(weight: float | Sequence[float]) -> tuple[float, dict]:
    """(the factor the client applies to its own ZO estimate, the step request's weight fields): a
    number weighs the whole batch on both sides; weights per class go to the server, whose losses
    (and gradient) then carry them."""
    if isinstance(weight, (int, float)):
        return float(weight), {"weight": float(weight)}
    return 1.0, {"weight": 1.0, "class_weights": [float(w) for w in weight]}


@dataclass
class StepStats:
    """What one client step cost and achieved."""

    loss: float
    bytes_up: int
    bytes_down: int
    peak_memory_bytes: int  # resident + transient peak (profiled on the largest batch so far)
    seconds: float
    seeds: list[int]
    projected_grads: list[float]
    lr: float  # the rate this step applied (the schedule's, at the client's step)
    rows: bytes = b""  # the step's packed embedding-row selection (empty: all rows), for synced replay


@dataclass
class StepMemory:
    """Step peaks (resident + transient) profiled so far, by resident bytes: for each, the largest
    batch profiled (tokens) and its peak. A step is profiled (~0.1 s) only when its batch has more
    tokens than any profiled at its resident bytes (an FO optimiser's state appears after its first
    step); other steps report that peak (an upper bound for a smaller batch). Clients that take
    turns on one bottom share one, so a new client's first step is not profiled again."""

    peaks: dict[int, tuple[int, int]] = field(default_factory=dict)  # resident bytes -> (tokens, peak)

    def known(self, resident: int, tokens: int) -> int | None:
        """The peak to report for a step of ``tokens`` at ``resident`` bytes, if one is known."""
        largest, peak = self.peaks.get(resident, (0, 0))
        return peak if tokens <= largest else None

    def record(self, resident: int, tokens: int, peak: int) -> None:
        self.peaks[resident] = (tokens, peak)


def _with_cut_gradient(reply: StepReply, hidden: torch.Tensor) -> StepReply:
    """``reply``, checked to carry dL/dh of ``hidden``'s shape (an FO server's answer to an FO step)."""
    if reply.grad is None or reply.grad.shape != hidden.shape:
        raise ValueError(
            f"server returned grad of shape {None if reply.grad is None else list(reply.grad.shape)}, "
            f"expected {list(hidden.shape)}"
        )
    return reply


class SplitClient:
    """Owns a bottom and its optimiser state; never touches the server's objects."""

    def __init__(
        self,
        bottom: ClientBottom,
        params: list[torch.nn.Parameter],
        config: Config,
        index: int = 0,
        memory: StepMemory | None = None,
        masks: Sequence[np.ndarray | None] | None = None,
    ):
        """Client ``index`` training ``params`` of ``bottom`` as ``config`` says (its rate, optimiser or ZO
        estimator, wire dtype); its seed is ``config.client_seed(index)``. A sparse ZO estimator needs the
        ``masks`` of its parameters (:func:`fl_app.scenario.client_masks`)."""
        self.bottom, self.params, self.config, self.client_id = bottom, params, config, str(index)
        self.seed = config.client_seed(index)
        self.lr = config.optim.client_lr  # the base rate; a session sets the schedule's horizon below
        self.lr_horizon = 0  # the client's steps in the run, where a decaying schedule reaches 0 (0: no decay)
        self.wire_dtype = WIRE_DTYPES[config.stream.wire_dtype]
        self.device = next(bottom.parameters()).device  # batches go here; activations leave as CPU frames
        self.steps = 0  # the only mutable state besides the weights: seeds and batches derive from it
        self.memory = memory if memory is not None else StepMemory()
        self.row_roles: list[tuple[str, int] | None] = []
        optim, zo = config.optim, config.zo
        if config.zo_trained_client and params:
            synced = config.federation.bottoms == "synced"  # other parties replay z: drawn on the CPU
            draw_on = torch.device("cpu") if synced else None
            self.zo = make_estimator(params, zo, self.lr, optim.weight_decay, draw_on, masks)
            self.optimizer = None
            self.row_roles = embedding_roles(bottom, params) if zo.embedding_rows == "batch" else []
        else:
            self.zo = None
            self.optimizer = make_fo_optimizer(optim.client_optimizer, params, self.lr, optim.weight_decay)

    @torch.no_grad()
    def cut_activations(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The bottom's activations for ``batch`` (float32, on the CPU), as it is now."""
        return self._forward(batch).to("cpu", torch.float32)

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = [batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")]
        with step_timing.section("forward"):
            return self.bottom(*(None if t is None else t.to(self.device) for t in inputs))

    def _request(
        self, kind: str, clean: torch.Tensor, batch: dict[str, torch.Tensor], extra: dict | None = None
    ) -> StepRequest:
        labels = {k: batch[k] for k in LABEL_KEYS if k in batch}
        return StepRequest(
            kind=kind,
            clean=clean.detach().to(self.wire_dtype),
            attention_mask=batch["attention_mask"],
            meta={"client": self.client_id, "step": self.steps, **(extra or {})},
            **labels,
        )

    def train_step(
        self, batch: dict[str, torch.Tensor], link: Link, weight: float | Sequence[float] = 1.0
    ) -> StepStats:
        """One split step over ``link`` (one reply per step; ZO parts are streamed without replies).

        ``weight`` scales this batch's loss on both sides (a GradMatch subset batch's weight); a
        sequence weighs each example by its class's weight instead (``gradmatch-pc``): the server's
        loss is then the weighted mean, which the client's update follows as it is.
        """
        weighting = step_weighting(weight)
        lr = self.lr_at(self.steps)
        start = time.perf_counter()
        resident = resident_bytes(self.bottom, self.optimizer)
        tokens = batch["input_ids"].numel()
        # the transient peak grows with the batch, and shifts when what stays resident changes (an
        # optimiser's state appears in its first step); profiling costs ~0.1 s, so only then
        known = self.memory.known(resident, tokens)
        measure = known is None
        with track_peak_memory(self.device) if measure else contextlib.nullcontext() as peak:
            rows = None
            if self.zo is not None:
                rows = self.step_rows(batch)
                zo_step = self._zo_step_from_gradient if self.config.zo.hosl_feedback == "gradient" else self._zo_step
                loss, up, down, seeds, grads = zo_step(batch, link, weighting, rows, lr)
            elif self.params:
                loss, up, down = self._fo_step(batch, link.exchange, weighting, lr)
                seeds, grads = [], []
            else:
                loss, up, down = self._frozen_step(batch, link.exchange, weighting)
                seeds, grads = [], []
        if measure:
            known = resident + peak.transient_bytes
            self.memory.record(resident, tokens, known)
        self.steps += 1
        release_freed_memory()  # the step's freed activations and frames leave the process
        return StepStats(loss, up, down, known, time.perf_counter() - start, seeds, grads, lr, pack_rows(rows))

    def lr_at(self, step: int) -> float:
        """The client's rate at its 0-based ``step``: the base rate times the schedule's factor."""
        optim = self.config.optim
        return self.lr * lr_factor(optim.client_lr_schedule, step, optim.client_lr_warmup, self.lr_horizon)

    def step_rows(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor | None] | None:
        """The rows a ZO step perturbs: per parameter the batch's embedding rows (None: all rows)."""
        if not any(self.row_roles):
            return None
        return batch_rows(self.row_roles, self.params, batch["input_ids"])

    @torch.no_grad()
    def _zo_step(self, batch, link: Link, weighting: tuple[float, dict], rows, lr: float):
        """The clean activations are computed first; each perturbed one goes to the server as soon as it is
        computed (the client holds at most two); the clean request follows and its reply carries all 2Q
        losses. The restore of the last query shares the update's pass."""
        seeds = self.zo.draw(self.seed, self.steps, self.config.zo.queries)
        meta = {"client": self.client_id, "step": self.steps, **weighting[1]}  # parts are scored as they come
        clean = self._forward(batch)
        up = 0
        head = {"attention_mask": batch["attention_mask"], **{k: batch[k] for k in LABEL_KEYS if k in batch}}
        for index, _ in enumerate(self.zo.perturbed_states(seeds, rows)):
            activation = self._forward(batch).to(self.wire_dtype).unsqueeze(0)
            part = PerturbedPart(activation, meta, **(head if index == 0 else {})).to_bytes()
            link.send(part)
            up += len(part)
            del part
        try:
            payload = self._request("zo", clean, batch, weighting[1]).to_bytes()
            del clean
            answer = link.exchange(payload)
            up += len(payload)
            reply = StepReply.from_bytes(answer)
        except BaseException:
            self.zo.undo_walk(seeds, rows)  # leave the weights as they were before the step
            raise
        losses = [] if reply.perturbed_losses is None else reply.perturbed_losses.tolist()
        # a forward difference's unperturbed loss is the server's on the clean activations, before its update
        grads = self.zo.finish(seeds, losses, rows, weighting[0], lr, clean_loss=reply.clean_loss)  # bad: restores
        return reply.clean_loss, up, len(answer), seeds, grads

    @torch.no_grad()
    def _zo_step_from_gradient(self, batch, link: Link, weighting: tuple[float, dict], rows, lr: float):
        """``hosl-feedback = gradient``: the clean activations go up as an FO step, whose reply carries
        dL/dh at the cut (the server trains its top as in any step); each query's loss difference is then
        <dL/dh, h+ - h->, equal to the server's l+ - l- up to O(eps^3), so no perturbed activation leaves
        the client: one upload and one download per step instead of 2Q + 1 uploads."""
        seeds = self.zo.draw(self.seed, self.steps, self.config.zo.queries)
        clean = self._forward(batch)
        payload = self._request("fo", clean, batch, weighting[1]).to_bytes()
        answer = link.exchange(payload)
        reply = _with_cut_gradient(StepReply.from_bytes(answer), clean)
        grad = reply.grad.to(self.device, torch.float32).flatten()  # already scaled by the step's weight
        clean = clean.float().flatten()
        losses = self.zo.walk(
            seeds, lambda: float(torch.dot(grad, self._forward(batch).float().flatten().sub_(clean))), rows
        )
        grads = self.zo.finish(seeds, losses, rows, lr=lr, clean_loss=0.0)  # losses relative to the clean one
        return reply.clean_loss, len(payload), len(answer), seeds, grads

    def _fo_step(self, batch, exchange, weighting: tuple[float, dict], lr: float):
        hidden = self._forward(batch)
        payload = self._request("fo", hidden, batch, weighting[1]).to_bytes()
        answer = exchange(payload)
        reply = _with_cut_gradient(StepReply.from_bytes(answer), hidden)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            hidden.backward(reply.grad.to(hidden.device, hidden.dtype))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return reply.clean_loss, len(payload), len(answer)

    @torch.no_grad()
    def _frozen_step(self, batch, exchange, weighting: tuple[float, dict]):
        """Nothing to train here: send the clean activations so the server can train."""
        payload = self._request("frozen", self._forward(batch), batch, weighting[1]).to_bytes()
        answer = exchange(payload)
        return StepReply.from_bytes(answer).clean_loss, len(payload), len(answer)

    @torch.no_grad()
    def select_subset(
        self, batches: Iterable[dict[str, torch.Tensor]], budget: int, seed: int, link: Link, per_class: bool = False
    ) -> Subset:
        """GradMatch through the server: send each batch's clean activations as a ``proxy`` step (the
        server computes its last-layer gradient proxy; no raw data leaves), then ask for ``budget`` of
        them; ``per_class``: GradMatch's per-class variant (weights per batch and class)."""
        count = 0
        for index, batch in enumerate(batches):
            StepReply.from_bytes(
                link.exchange(self._request("proxy", self._forward(batch), batch, {"batch": index}).to_bytes())
            )
            count += 1
        reply = StepReply.from_bytes(
            link.exchange(
                SelectRequest(budget, count, seed, {"client": self.client_id, "per_class": per_class}).to_bytes()
            )
        )
        ids, weights = reply.batch_ids, reply.batch_weights
        if ids is None or weights is None or weights.shape[:1] != ids.shape or weights.ndim != 1 + per_class:
            raise ValueError(
                "server's selection reply lacks matching 'batch_ids' and 'batch_weights' "
                f"(one weight per batch{' and class' if per_class else ''})"
            )
        ids = ids.tolist()
        if not ids or len(ids) > budget or len(set(ids)) != len(ids) or not all(0 <= i < count for i in ids):
            raise ValueError(f"server selected batch ids {ids} for a budget of {budget} of {count} batches")
        return Subset(ids, weights.flatten().tolist())

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], link: Link) -> dict[str, float]:
        """Accuracy and mean loss of this client's bottom + the server's top over ``batches``, and
        ``correct``: per example (in order) 1 if the top scored it right, else 0."""
        outcomes: list[int] = []
        count = 0
        loss_sum = 0.0
        for batch in batches:
            reply = StepReply.from_bytes(link.exchange(self._request("eval", self._forward(batch), batch).to_bytes()))
            right = reply.example_correct
            if right is None or right.shape != (reply.count,) or int(right.sum()) != reply.correct:
                raise ValueError(
                    f"server's eval reply has example_correct of shape {None if right is None else list(right.shape)} "
                    f"and sum {None if right is None else int(right.sum())}, expected ({reply.count},) summing to "
                    f"{reply.correct}"
                )
            outcomes += [int(c) for c in right.tolist()]
            count += reply.count
            loss_sum += reply.clean_loss * reply.count
        if count == 0:
            raise ValueError("evaluation set is empty")
        return {"accuracy": sum(outcomes) / count, "loss": loss_sum / count, "count": count, "correct": outcomes}
