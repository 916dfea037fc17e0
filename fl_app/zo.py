"""MeZO-style zeroth-order estimator: seeded in-place perturbations, z never stored.

A direction ``z(seed)`` is cut into chunks of about :data:`Z_CHUNK` elements (small tensors share a
chunk); each chunk has its own generator derived from (seed, chunk index), so chunks can be
regenerated in any order and on several threads, and the extra memory stays bounded by a few chunks.

Two kinds of directions (both satisfy E[z z^T] = I, all the two-point estimator needs):
``gaussian`` (MeZO's N(0, I)) and ``rademacher`` (+-1 from random bits, several times cheaper).

A parameter can be restricted to some of its rows for one step (``rows``): an embedding matrix
then only perturbs and updates the rows of the tokens in the batch, and every other row stays
bit-identical. z then covers the selected rows only, in the order given.

Estimators (``zo-estimator``, :data:`fl_app.config.ESTIMATORS`) combine a difference and a shape of z:

* the difference: ``central`` (two-point, MeZO: g = (L(w + eps z) - L(w - eps z)) / 2 eps, 2 perturbed
  losses per direction, bias O(eps^2)) or ``forward`` (one-sided: g = (L(w + eps z) - L(w)) / eps against
  the unperturbed loss the step computes anyway, 1 perturbed loss per direction, bias O(eps)). At equal
  perturbed forwards and server scorings, forward differences give twice the directions.
* the shape: ``dense`` z over every perturbed value (:class:`ZOEstimator`), ``low-rank`` z = U V^T / sqrt(r)
  per matrix with V kept for several steps (LOZO; :class:`LowRankEstimator`), or ``sparse`` z on a fixed
  mask per matrix, its smallest-magnitude pristine weights (Sparse-MeZO; :class:`SparseEstimator`).

The expected signal of one step: each estimate is unbiased for the gradient projected on z's space
(E[g z] = E[z z^T] grad = grad for dense z), with a variance about (d + 2) / Q times |grad|^2 for d
perturbed values; so T steps move the weights along the gradient by about sqrt(T Q / d) of their total
movement. A sparse mask shrinks d to the masked values (and keeps only the gradient on them); a low-rank
z has the same norm as a dense one, but ``zo-subspace-steps`` steps' noise stays in a subspace of
sum(m r) dimensions (U varies, V stays), while the gradient they follow is its projection on V's span.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from fl_app import step_timing
from fl_app.config import DIRECTIONS, ESTIMATORS, ZOSettings

Z_CHUNK = 1 << 20  # elements of z generated at a time (4 MiB in fp32)
Rows = Sequence["torch.Tensor | None"]  # per parameter: sorted row ids to restrict to, or None for all rows
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zo-directions")  # torch's randn uses one core


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _mix(seed: int, chunk_index: int) -> int:
    """A 63-bit generator seed for one chunk of z(seed) (splitmix64 finaliser: nearby inputs diverge)."""
    x = (int(seed) + 0x9E3779B97F4A7C15 * (chunk_index + 1)) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


CPU = torch.device("cpu")


def direction_chunk(kind: str, seed: int, chunk_index: int, numel: int, device: torch.device = CPU) -> torch.Tensor:
    """Chunk ``chunk_index`` of z(seed): ``numel`` float32 values from the chunk's own generator, drawn on
    ``device``. A CUDA generator draws other numbers than the CPU's (and, past some size, other numbers
    on another GPU model), so directions other parties replay are drawn on the CPU.

    Rademacher chunks are returned as 0/1 floats b (z = 2b - 1), which callers fold into their updates.
    """
    gen = torch.Generator(device=device).manual_seed(_mix(seed, chunk_index))
    if kind == "gaussian":
        return torch.randn(numel, generator=gen, dtype=torch.float32, device=device)
    if device.type != "cpu":
        return torch.randint(0, 2, (numel,), generator=gen, device=device).to(torch.float32)
    return _random_bits(gen, numel)


def _random_bits(gen: torch.Generator, numel: int) -> torch.Tensor:
    """``numel`` fair 0/1 floats on the CPU, unpacked from random 64-bit words (one word per 64 values)."""
    words = torch.randint(-(2**63), 2**63 - 1, (-(-numel // 64),), dtype=torch.int64, generator=gen)
    return torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), count=numel)).to(torch.float32)


Segment = tuple[torch.Tensor, "torch.Tensor | None", int]  # (target, row ids or None for a flat slice, numel)


DIFFERENCES = ("central", "forward")


class ZOEstimator:
    """ZO gradient estimates with dense z over a fixed, ordered list of parameters (two-point by default,
    one-sided with ``difference = "forward"``).

    Every change to the weights is one pass :meth:`apply` of ``theta += sum_k coef_k z(seed_k)``
    over the (selected rows of the) parameters, so several perturbations, restores and updates
    can share a pass, and each direction is regenerated as few times as the schedule allows.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        eps: float,
        lr: float,
        weight_decay: float = 0.0,
        directions: str = "gaussian",
        draw_on: torch.device | None = None,
        clip: float = 0.0,
        difference: str = "central",
    ):
        _check_positive("zo-eps", eps)
        if difference not in DIFFERENCES:
            raise ValueError(f"ZO difference must be one of {DIFFERENCES}, got {difference!r}")
        self.difference = difference
        # perturbed states (and losses) per direction: (+, -) for central differences, (+) for forward ones
        self.states_per_query = 2 if difference == "central" else 1
        _check_positive("lr", lr)
        if weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {weight_decay!r}")
        if directions not in DIRECTIONS:
            raise ValueError(f"zo-directions must be one of {DIRECTIONS}, got {directions!r}")
        if not (math.isfinite(clip) and clip >= 0):
            raise ValueError(f"zo-grad-clip must be a finite number >= 0, got {clip!r}")
        self.clip = clip  # > 0: each projected gradient is clipped to [-clip, clip] before it is applied
        self.params = list(params)
        if not self.params:
            raise ValueError(
                "ZO estimator needs at least one trainable parameter (check client-params / server-params)"
            )
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"ZO estimator's parameters are on several devices: {sorted(map(str, devices))}")
        self.device = devices.pop()
        # where z is drawn: by default where the weights are; on the CPU when other parties replay these
        # directions (synced bottoms): a CUDA draw depends on the GPU model, the CPU's on nothing
        self.draw_on = self.device if draw_on is None else torch.device(draw_on)
        self.eps, self.lr, self.weight_decay, self.directions = eps, lr, weight_decay, directions

    def _chunks(self, rows: Rows | None) -> list[list[Segment]]:
        """One pass's work: chunks of about :data:`Z_CHUNK` elements, each a list of segments (a slice of a
        flat parameter, or a block of selected rows). Small tensors share a chunk, large ones span several."""
        if rows is not None and len(rows) != len(self.params):
            raise ValueError(f"row selection covers {len(rows)} parameters, the estimator has {len(self.params)}")
        chunks: list[list[Segment]] = [[]]
        room = Z_CHUNK
        for pi, p in enumerate(self.params):
            selected = None if rows is None else rows[pi]
            total = p.numel() if selected is None else selected.numel()
            per_row = 1 if selected is None or p.ndim < 2 else p.data[0].numel()
            start = 0
            while start < total:
                if room < per_row and chunks[-1]:
                    chunks.append([])
                    room = Z_CHUNK
                count = min(max(1, room // per_row), total - start)
                if selected is None:
                    chunks[-1].append((p.data.view(-1)[start : start + count], None, count))
                else:
                    ids = selected[start : start + count].to(p.device)
                    chunks[-1].append((p.data, ids, count * per_row))
                room -= count * per_row
                start += count
        return [chunk for chunk in chunks if chunk]

    def _apply_chunk(self, index: int, chunk: list[Segment], terms: Sequence[tuple[int, float]]) -> None:
        """Add each term's z over one chunk's segments; one chunk of z is alive at a time."""
        numel = sum(size for _, _, size in chunk)
        rademacher = self.directions == "rademacher"
        if any(target.dtype != torch.float32 for target, _, _ in chunk):
            self._apply_chunk_rounded_once(index, chunk, terms, numel)
            return
        for seed, coef in terms:
            z = self._direction(seed, index, numel)
            offset = 0
            for target, row_ids, size in chunk:
                piece = z[offset : offset + size]
                if row_ids is None:  # rademacher: add 2 coef b here, the -coef of z = 2b - 1 below
                    target.add_(piece.to(target.dtype), alpha=2 * coef if rademacher else coef)
                else:
                    signed = piece.mul_(2).sub_(1) if rademacher else piece
                    target.index_add_(
                        0, row_ids, signed.view(row_ids.numel(), *target.shape[1:]).to(target.dtype), alpha=coef
                    )
                offset += size
        if rademacher:
            shift = sum(coef for _, coef in terms)
            for target, row_ids, _ in chunk:
                if row_ids is None:
                    target.sub_(shift)

    def _apply_chunk_rounded_once(
        self, index: int, chunk: list[Segment], terms: Sequence[tuple[int, float]], numel: int
    ) -> None:
        """Weights not in float32 (half precision): sum the terms in float32, then round each weight to its
        dtype once per pass (adding term by term in half precision would round once per term)."""
        delta = torch.zeros(numel, dtype=torch.float32, device=self.device)
        for seed, coef in terms:
            z = self._direction(seed, index, numel)
            if self.directions == "rademacher":
                z.mul_(2).sub_(1)
            delta.add_(z, alpha=coef)
        offset = 0
        for target, row_ids, size in chunk:
            piece = delta[offset : offset + size]
            work = torch.promote_types(target.dtype, torch.float32)
            if row_ids is None:
                target.copy_(target.to(work).add_(piece))
            else:
                block = target.index_select(0, row_ids).to(work).add_(piece.view(row_ids.numel(), *target.shape[1:]))
                target.index_copy_(0, row_ids, block.to(target.dtype))
            offset += size

    def _direction(self, seed: int, index: int, numel: int) -> torch.Tensor:
        """Chunk ``index`` of z(seed), on the weights' device."""
        with step_timing.section("generate"):
            return direction_chunk(self.directions, seed, index, numel, self.draw_on).to(self.device)

    @torch.no_grad()
    def apply(self, terms: Sequence[tuple[int, float]], rows: Rows | None = None) -> None:
        """In place, in one pass: theta += sum over (seed, coef) in ``terms`` of coef * z(seed)."""
        if not terms:
            return
        with step_timing.section("passes"):
            chunks = self._chunks(rows)
            if self.directions == "gaussian" and len(chunks) > 1 and self.draw_on.type == "cpu":  # randn: one core
                list(_POOL.map(lambda item: self._apply_chunk(item[0], item[1], terms), enumerate(chunks)))
            else:
                for index, chunk in enumerate(chunks):
                    self._apply_chunk(index, chunk, terms)

    def perturb(self, seed: int, scale: float, rows: Rows | None = None) -> None:
        """In place: theta += scale * eps * z(seed)."""
        self.apply([(seed, scale * self.eps)], rows)

    def projected_gradient(self, loss_plus: float, loss_minus: float) -> float:
        """(l+ - l-) / (2 eps) for central differences, (l+ - l0) / eps for forward ones (``loss_minus``
        is then the unperturbed loss), clipped to [-clip, clip] when the estimator has a clip; non-finite
        losses are rejected rather than applied."""
        g = (float(loss_plus) - float(loss_minus)) / (self.states_per_query * self.eps)
        if not math.isfinite(g):
            raise FloatingPointError(f"non-finite ZO projected gradient from losses {loss_plus!r}, {loss_minus!r}")
        return max(-self.clip, min(self.clip, g)) if self.clip else g

    def perturbed_states(self, seeds: Sequence[int], rows: Rows | None = None) -> Iterator[None]:
        """Walk theta through its perturbed states, yielding once in each: theta + eps z_1, theta - eps z_1,
        theta + eps z_2, ... (2Q, central) or theta + eps z_1, theta + eps z_2, ... (Q, forward); the
        restore of query i shares a pass with the perturbation of query i+1.

        Run to the end, the walk leaves theta at its last state for :meth:`update` with
        ``restore=seeds[-1]`` to undo in its own pass (or :meth:`undo_walk`); abandoned midway, it
        restores theta itself.
        """
        offset: list[tuple[int, float]] = []  # theta now = theta + sum coef * z(seed)
        finished = False
        try:
            for seed in seeds:
                self.apply([(s, -c) for s, c in offset] + [(seed, self.eps)], rows)
                offset = [(seed, self.eps)]
                yield
                if self.difference == "central":
                    self.apply([(seed, -2 * self.eps)], rows)
                    offset = [(seed, -self.eps)]
                    yield
            finished = True
        finally:
            if not finished and offset:
                self.apply([(s, -c) for s, c in offset], rows)

    def last_offset(self) -> float:
        """The multiple of eps z(seeds[-1]) a finished walk leaves theta at."""
        return -self.eps if self.difference == "central" else self.eps

    def undo_walk(self, seeds: Sequence[int], rows: Rows | None = None) -> None:
        """Put theta back where a finished :meth:`perturbed_states` walk over ``seeds`` started."""
        self.apply([(seeds[-1], -self.last_offset())], rows)

    @torch.no_grad()
    def update(
        self,
        seeds: Sequence[int],
        projected_grads: Sequence[float],
        lr: float | None = None,
        rows: Rows | None = None,
        restore: int | None = None,
    ) -> None:
        """theta -= lr * (1/Q) sum_q g_q z_q (+ decoupled weight decay on matrices), in place, in one pass.

        ``restore``: also undo the -eps z(restore) that :meth:`perturbed_states` leaves behind.
        """
        if len(seeds) != len(projected_grads) or not seeds:
            raise ValueError(
                f"need one projected gradient per seed, got {len(seeds)} seeds, {len(projected_grads)} grads"
            )
        lr = self.lr if lr is None else lr
        q = len(seeds)
        coefs: dict[int, float] = {}
        for seed, g in zip(seeds, projected_grads):
            coefs[int(seed)] = coefs.get(int(seed), 0.0) - lr * float(g) / q
        if restore is not None:
            coefs[int(restore)] = coefs.get(int(restore), 0.0) - self.last_offset()
        self.apply(list(coefs.items()), rows)
        if self.weight_decay:
            with torch.no_grad():
                for p in self.params:
                    if p.ndim >= 2:
                        p.mul_(1 - lr * self.weight_decay)

    def walk(self, seeds: Sequence[int], loss_fn: Callable[[], float], rows: Rows | None = None) -> list[float]:
        """``loss_fn()`` in each state of a :meth:`perturbed_states` walk (2Q or Q losses). If it raises, theta
        is restored before the exception leaves (not when the traceback is freed)."""
        states = self.perturbed_states(seeds, rows)
        try:
            return [loss_fn() for _ in states]
        finally:
            states.close()

    def estimate(
        self, seed: int, loss_fn: Callable[[], float], rows: Rows | None = None, clean_loss: float | None = None
    ) -> float:
        """Perturb around theta (restored afterwards) and return the projected gradient; a forward
        difference needs the unperturbed ``clean_loss`` (computed here when None)."""
        if self.difference == "forward" and clean_loss is None:
            clean_loss = loss_fn()
        losses = self.walk([seed], loss_fn, rows)
        self.undo_walk([seed], rows)
        return self.projected_gradient(*losses, *([clean_loss] if self.difference == "forward" else []))

    def step(
        self,
        seeds: Sequence[int],
        loss_fn: Callable[[], float],
        rows: Rows | None = None,
        weight: float = 1.0,
        clean_loss: float | None = None,
    ) -> list[float]:
        """A whole step with the losses computed locally (a ZO server): returns the projected gradients.
        A forward difference uses ``clean_loss`` (computed here when None)."""
        if self.difference == "forward" and clean_loss is None:
            clean_loss = loss_fn()
        return self.finish(seeds, self.walk(seeds, loss_fn, rows), rows, weight, clean_loss=clean_loss)

    def finish(
        self,
        seeds: Sequence[int],
        losses: Sequence[float],
        rows: Rows | None = None,
        weight: float = 1.0,
        lr: float | None = None,
        clean_loss: float | None = None,
    ) -> list[float]:
        """End a completed :meth:`perturbed_states` walk with its losses (central: l+_1, l-_1, l+_2, ...;
        forward: l+_1, l+_2, ... and the unperturbed ``clean_loss``): update theta at ``lr`` (default: the
        estimator's; the last restore in the same pass) and return the weighted (and clipped) projected
        gradients that were applied. If the losses are unusable, theta is restored and the error raised."""
        per = self.states_per_query
        try:
            if len(losses) != per * len(seeds):
                raise ValueError(
                    f"got {len(losses)} perturbed losses for {len(seeds)} queries, expected {per * len(seeds)}"
                )
            if per == 1:
                if clean_loss is None:
                    raise ValueError("a forward-difference step needs the unperturbed loss (field 'clean_loss')")
                pairs = [(loss, clean_loss) for loss in losses]
            else:
                pairs = [(losses[2 * i], losses[2 * i + 1]) for i in range(len(seeds))]
            grads = [weight * self.projected_gradient(*pair) for pair in pairs]
        except (ValueError, FloatingPointError):
            self.undo_walk(seeds, rows)
            raise
        self.update(seeds, grads, lr=lr, rows=rows, restore=seeds[-1])
        return grads

    def draw(self, party_seed: int, step: int, count: int) -> list[int]:
        """The ``count`` direction seeds of a party's ``step`` (fixed by the two: replayable)."""
        return draw_seeds(step_generator(party_seed, step), count)


def _draw(kind: str, gen: torch.Generator, numel: int) -> torch.Tensor:
    """``numel`` float32 values of unit variance on the CPU: N(0, 1) or +-1."""
    if kind == "gaussian":
        return torch.randn(numel, generator=gen, dtype=torch.float32)
    return _random_bits(gen, numel).mul_(2).sub_(1)


class _PerParameter(ZOEstimator):
    """An estimator whose z is built parameter by parameter (each from its own generators), so that its
    shape can follow the parameter's: subclasses say how in :meth:`_add`. Weights in half precision
    get the pass's terms summed in float32 and are rounded once, as with dense z."""

    @torch.no_grad()
    def apply(self, terms: Sequence[tuple[int, float]], rows: Rows | None = None) -> None:
        if not terms:
            return
        if rows is not None and len(rows) != len(self.params):
            raise ValueError(f"row selection covers {len(rows)} parameters, the estimator has {len(self.params)}")
        with step_timing.section("passes"):
            for index, p in enumerate(self.params):
                selected = None if rows is None else rows[index]
                ids = None if selected is None else selected.to(p.device)
                block = p.data if ids is None else p.data.index_select(0, ids)
                work = block if block.dtype == torch.float32 and ids is None else block.to(torch.float32)
                if work is not block or ids is not None:
                    delta = torch.zeros_like(work)
                    for seed, coef in terms:
                        self._add(delta, index, seed, coef, selected)
                    work = work.add_(delta)
                    if ids is None:
                        p.data.copy_(work)
                    else:
                        p.data.index_copy_(0, ids, work.to(p.dtype))
                else:
                    for seed, coef in terms:
                        self._add(work, index, seed, coef, selected)

    def _dense(self, target: torch.Tensor, index: int, seed: int, coef: float) -> None:
        """target += coef z for a parameter z is dense on (its own generator per parameter)."""
        with step_timing.section("generate"):
            z = _draw(self.directions, torch.Generator().manual_seed(_mix(seed, 2 * index)), target.numel())
        target.view(-1).add_(z.to(target.device).view(-1), alpha=coef)

    def _add(self, target: torch.Tensor, index: int, seed: int, coef: float, rows: torch.Tensor | None) -> None:
        raise NotImplementedError


SUBSPACE_BITS = 32  # a low-rank direction seed: subspace key above these bits, the query's own draw below


class LowRankEstimator(_PerParameter):
    """LOZO-style low-rank z: each matrix (m x n) is perturbed by U V^T / sqrt(r), U (m x r) drawn per
    direction, V (n x r) per subspace, which lasts ``subspace_steps`` steps; vectors (biases, norms) and
    matrices of rank <= r get dense z. Scaled by 1/sqrt(r), z's entries have unit variance, as MeZO's
    (LOZO's unscaled U V^T is sqrt(r) larger; SubZero normalises the same way), so eps and the rate keep
    their meaning. A direction seed carries its subspace key in its high bits (:meth:`draw`), so z is a
    pure function of the seed: synced replay, seeds states and export need nothing else."""

    def __init__(self, *args: Any, rank: int = 2, subspace_steps: int = 50, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"zo-rank must be an integer >= 1, got {rank!r}")
        if not (isinstance(subspace_steps, int) and subspace_steps >= 1):
            raise ValueError(f"zo-subspace-steps must be an integer >= 1, got {subspace_steps!r}")
        self.rank, self.subspace_steps = rank, subspace_steps

    def draw(self, party_seed: int, step: int, count: int) -> list[int]:
        """Seeds whose high bits name the subspace of ``step`` (one per ``subspace_steps`` steps)."""
        key = _mix(int(party_seed), step // self.subspace_steps) & ((1 << (63 - SUBSPACE_BITS)) - 1)
        low = (1 << SUBSPACE_BITS) - 1
        return [(key << SUBSPACE_BITS) | (s & low) for s in super().draw(party_seed, step, count)]

    def _add(self, target: torch.Tensor, index: int, seed: int, coef: float, rows: torch.Tensor | None) -> None:
        p = self.params[index]
        if p.ndim != 2 or min(p.shape) <= self.rank:
            self._dense(target, index, seed, coef)
            return
        with step_timing.section("generate"):
            u = _draw(self.directions, torch.Generator().manual_seed(_mix(seed, 2 * index + 1)), p.shape[0] * self.rank)
            key = int(seed) >> SUBSPACE_BITS
            v = _draw(self.directions, torch.Generator().manual_seed(_mix(key, 2 * index + 1)), p.shape[1] * self.rank)
        u = u.view(p.shape[0], self.rank)
        if rows is not None:
            u = u.index_select(0, rows)
        v = v.view(p.shape[1], self.rank).T
        target.addmm_(u.to(target.device), v.to(target.device), alpha=coef / math.sqrt(self.rank))


class SparseEstimator(_PerParameter):
    """Sparse-MeZO-style z: on each masked matrix only the masked entries are perturbed and updated (the
    mask: per matrix, its smallest-magnitude fraction of the pristine weights, fixed for the run: see
    :func:`magnitude_masks`), so the perturbed dimension d shrinks to the masked count; unmasked
    parameters (vectors, LoRA adapters) get dense z. Sparse-MeZO recomputes its mask from the current
    weights each step against thresholds fixed at the start; a fixed mask keeps z a function of the seed
    and the pristine model, so replay and export need nothing else. Masks are held as packed bits (one
    bit per weight)."""

    def __init__(self, *args: Any, masks: Sequence[np.ndarray | None] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        if len(masks) != len(self.params):
            raise ValueError(f"got {len(masks)} masks for {len(self.params)} parameters")
        for p, mask in zip(self.params, masks):
            if mask is not None and mask.size * 8 < p.numel():
                raise ValueError(f"a mask of {mask.size * 8} bits cannot cover a parameter of {p.numel()} values")
        self.masks = list(masks)

    def density(self) -> float:
        """The share of the estimator's values that are perturbed."""
        total = sum(p.numel() for p in self.params)
        kept = sum(
            p.numel() if m is None else int(np.unpackbits(m, count=p.numel()).sum())
            for p, m in zip(self.params, self.masks)
        )
        return kept / total

    def _add(self, target: torch.Tensor, index: int, seed: int, coef: float, rows: torch.Tensor | None) -> None:
        p, packed = self.params[index], self.masks[index]
        if packed is None:
            self._dense(target, index, seed, coef)
            return
        per_row = p[0].numel() if p.ndim > 1 else 1
        row_ids = torch.arange(p.shape[0]) if rows is None else rows.cpu()
        whole = None if per_row % 8 == 0 else np.unpackbits(packed, count=p.numel()).reshape(p.shape[0], per_row)
        by_row = packed[: p.numel() // 8].reshape(p.shape[0], per_row // 8) if whole is None else None
        block_rows = max(1, Z_CHUNK // per_row)
        rows_view = target.view(-1, per_row)
        for block, start in enumerate(range(0, row_ids.numel(), block_rows)):
            ids = row_ids[start : start + block_rows].numpy()
            bits = np.unpackbits(by_row[ids], axis=1) if whole is None else whole[ids]
            with step_timing.section("generate"):  # z over the whole block, zeroed off the mask
                gen = torch.Generator().manual_seed(_mix(seed, (2 * index + 1) << 20 | block))
                z = _draw(self.directions, gen, bits.size).mul_(torch.from_numpy(bits.reshape(-1)))
            part = rows_view[start : start + len(ids)]
            part.view(-1).add_(z.to(part.device), alpha=coef)


def make_estimator(
    params: Sequence[nn.Parameter],
    zo: ZOSettings,
    lr: float,
    weight_decay: float = 0.0,
    draw_on: torch.device | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> ZOEstimator:
    """A ZO client's estimator as ``zo`` (``zo-estimator`` and its keys) says; a sparse one needs the
    ``masks`` of :func:`magnitude_masks` (one per parameter, None for dense ones)."""
    if zo.estimator not in ESTIMATORS:
        raise ValueError(f"zo-estimator must be one of {tuple(ESTIMATORS)}, got {zo.estimator!r}")
    difference, shape = ESTIMATORS[zo.estimator]
    common = {"draw_on": draw_on, "clip": zo.grad_clip, "difference": difference}
    args = (params, zo.eps, lr, weight_decay, zo.directions)
    if shape == "low-rank":
        return LowRankEstimator(*args, rank=zo.rank, subspace_steps=zo.subspace_steps, **common)
    if shape == "sparse":
        if masks is None:
            raise ValueError(f"zo-estimator = {zo.estimator} needs the pristine weights' masks")
        return SparseEstimator(*args, masks=masks, **common)
    return ZOEstimator(*args, **common)


def magnitude_masks(pristine: Sequence[torch.Tensor | None], sparsity: float) -> list[np.ndarray | None]:
    """Per tensor (None: dense), the packed bits of its entries at or below the ``sparsity`` quantile of
    its magnitudes, i.e. the (1 - sparsity) smallest-magnitude share it perturbs (ties at the threshold
    are all kept)."""
    if not 0 < sparsity < 1:
        raise ValueError(f"zo-sparsity must be in (0, 1), got {sparsity!r}")
    masks: list[np.ndarray | None] = []
    for t in pristine:
        if t is None:
            masks.append(None)
            continue
        mags = t.detach().float().abs().flatten().cpu()
        k = max(1, int(round((1 - sparsity) * mags.numel())))
        threshold = torch.kthvalue(mags, k).values
        masks.append(np.packbits((mags <= threshold).numpy()))
    return masks


def pack_rows(rows: Rows | None) -> bytes:
    """A step's row selection as compact bytes (empty: all rows): per parameter its count (-1 for all
    rows) and the deltas of its sorted row ids, zlib-compressed."""
    if rows is None:
        return b""
    parts = []
    for selected in rows:
        if selected is None:
            parts.append(np.array([-1], dtype=np.int64))
        else:
            ids = selected.numpy().astype(np.int64)
            parts.append(np.concatenate([[ids.size], np.diff(ids, prepend=0)]))
    return zlib.compress(np.concatenate(parts).astype(np.int64).tobytes(), 9)


def unpack_rows(payload: bytes, num_params: int) -> list[torch.Tensor | None] | None:
    """Inverse of :func:`pack_rows` for an estimator over ``num_params`` parameters."""
    if not payload:
        return None
    try:
        values = np.frombuffer(zlib.decompress(payload), dtype=np.int64)
    except zlib.error as err:
        raise ValueError(f"field 'rows' of a history entry is not a packed row selection: {err}") from err
    rows: list[torch.Tensor | None] = []
    at = 0
    while at < values.size:
        count = int(values[at])
        at += 1
        if count < 0:
            rows.append(None)
            continue
        rows.append(torch.from_numpy(np.cumsum(values[at : at + count])))
        at += count
    if len(rows) != num_params:
        raise ValueError(f"field 'rows' of a history entry covers {len(rows)} parameters, expected {num_params}")
    return rows


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator fixed by (party seed, step index): seeds can be re-derived after a restart."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def draw_seeds(rng: torch.Generator, count: int) -> list[int]:
    """Draw ``count`` seeds (63-bit ints) from a seeded torch generator."""
    return [int(s) for s in torch.randint(0, 2**62, (count,), generator=rng, dtype=torch.int64)]
