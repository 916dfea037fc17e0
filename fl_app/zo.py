"""MeZO-style zeroth-order estimator: seeded in-place perturbations, z never stored.

A direction ``z(seed)`` is cut into chunks of about :data:`Z_CHUNK` elements (small tensors share a
chunk); each chunk has its own generator derived from (seed, chunk index), so chunks can be
regenerated in any order and on several threads, and the extra memory stays bounded by a few chunks.

Two kinds of directions (both satisfy E[z z^T] = I, all the two-point estimator needs):
``gaussian`` (MeZO's N(0, I)) and ``rademacher`` (+-1 from random bits, several times cheaper).

A parameter can be restricted to some of its rows for one step (``rows``): an embedding matrix
then only perturbs and updates the rows of the tokens in the batch, and every other row stays
bit-identical. z then covers the selected rows only, in the order given.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from fl_app import step_timing
from fl_app.config import DIRECTIONS

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
    words = torch.randint(-(2**63), 2**63 - 1, (-(-numel // 64),), dtype=torch.int64, generator=gen)
    return torch.from_numpy(np.unpackbits(words.numpy().view(np.uint8), count=numel)).to(torch.float32)


Segment = tuple[torch.Tensor, "torch.Tensor | None", int]  # (target, row ids or None for a flat slice, numel)


class ZOEstimator:
    """Two-point ZO gradient estimates over a fixed, ordered list of parameters.

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
    ):
        _check_positive("zo-eps", eps)
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
        """(l+ - l-) / (2 eps), clipped to [-clip, clip] when the estimator has a clip; non-finite losses
        are rejected rather than applied."""
        g = (float(loss_plus) - float(loss_minus)) / (2 * self.eps)
        if not math.isfinite(g):
            raise FloatingPointError(f"non-finite ZO projected gradient from losses {loss_plus!r}, {loss_minus!r}")
        return max(-self.clip, min(self.clip, g)) if self.clip else g

    def perturbed_states(self, seeds: Sequence[int], rows: Rows | None = None) -> Iterator[None]:
        """Walk theta through theta + eps z_1, theta - eps z_1, theta + eps z_2, ... yielding once in each
        state (2Q times); the restore of query i shares a pass with the perturbation of query i+1.

        Run to the end, the walk leaves theta at theta - eps z_Q for :meth:`update` with
        ``restore=seeds[-1]`` to undo in its own pass; abandoned midway, it restores theta itself.
        """
        offset: list[tuple[int, float]] = []  # theta now = theta + sum coef * z(seed)
        finished = False
        try:
            for seed in seeds:
                self.apply([(s, -c) for s, c in offset] + [(seed, self.eps)], rows)
                offset = [(seed, self.eps)]
                yield
                self.apply([(seed, -2 * self.eps)], rows)
                offset = [(seed, -self.eps)]
                yield
            finished = True
        finally:
            if not finished and offset:
                self.apply([(s, -c) for s, c in offset], rows)

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
            coefs[int(restore)] = coefs.get(int(restore), 0.0) + self.eps
        self.apply(list(coefs.items()), rows)
        if self.weight_decay:
            with torch.no_grad():
                for p in self.params:
                    if p.ndim >= 2:
                        p.mul_(1 - lr * self.weight_decay)

    def walk(self, seeds: Sequence[int], loss_fn: Callable[[], float], rows: Rows | None = None) -> list[float]:
        """``loss_fn()`` in each state of a :meth:`perturbed_states` walk (2Q losses). If it raises, theta
        is restored before the exception leaves (not when the traceback is freed)."""
        states = self.perturbed_states(seeds, rows)
        try:
            return [loss_fn() for _ in states]
        finally:
            states.close()

    def estimate(self, seed: int, loss_fn: Callable[[], float], rows: Rows | None = None) -> float:
        """Perturb +eps, -eps around theta (restored afterwards) and return the projected gradient."""
        losses = self.walk([seed], loss_fn, rows)
        self.perturb(seed, +1.0, rows)
        return self.projected_gradient(*losses)

    def step(
        self, seeds: Sequence[int], loss_fn: Callable[[], float], rows: Rows | None = None, weight: float = 1.0
    ) -> list[float]:
        """A whole MeZO step with the losses computed locally (a ZO server): returns the projected gradients."""
        return self.finish(seeds, self.walk(seeds, loss_fn, rows), rows, weight)

    def finish(
        self,
        seeds: Sequence[int],
        losses: Sequence[float],
        rows: Rows | None = None,
        weight: float = 1.0,
        lr: float | None = None,
    ) -> list[float]:
        """End a completed :meth:`perturbed_states` walk with its 2Q losses (l+_1, l-_1, l+_2, ...): update
        theta at ``lr`` (default: the estimator's; the last restore in the same pass) and return the
        weighted (and clipped) projected gradients that were applied. If the losses are unusable, theta
        is restored and the error raised."""
        try:
            if len(losses) != 2 * len(seeds):
                raise ValueError(
                    f"got {len(losses)} perturbed losses for {len(seeds)} queries, expected {2 * len(seeds)}"
                )
            grads = [weight * self.projected_gradient(losses[2 * i], losses[2 * i + 1]) for i in range(len(seeds))]
        except (ValueError, FloatingPointError):
            self.perturb(seeds[-1], +1.0, rows)
            raise
        self.update(seeds, grads, lr=lr, rows=rows, restore=seeds[-1])
        return grads


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
