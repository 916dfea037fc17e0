"""MeZO-style zeroth-order estimator: seeded in-place perturbations, z never stored."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn


Z_CHUNK = 1 << 20  # elements of z generated at a time (4 MiB in fp32)


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


class ZOEstimator:
    """Two-point ZO gradient estimates over a fixed, ordered list of parameters.

    ``z`` for a seed is regenerated one parameter tensor at a time from a dedicated
    generator, so memory stays at inference level and the same seed always gives the
    same direction.
    """

    def __init__(self, params: Sequence[nn.Parameter], eps: float, lr: float, weight_decay: float = 0.0):
        _check_positive("zo-eps", eps)
        _check_positive("lr", lr)
        if weight_decay < 0:
            raise ValueError(f"weight-decay must be >= 0, got {weight_decay!r}")
        self.params = list(params)
        if not self.params:
            raise ValueError("ZO estimator needs at least one trainable parameter (check client-params / server-params)")
        self.eps, self.lr, self.weight_decay = eps, lr, weight_decay

    def _directions(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(slice of a parameter, its z) in a fixed order; z comes in chunks of at most Z_CHUNK
        elements, so the extra memory is bounded whatever the size of the largest tensor."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for p in self.params:
            flat = p.data.view(-1)
            for start in range(0, flat.numel(), Z_CHUNK):
                piece = flat[start : start + Z_CHUNK]
                z = torch.randn(piece.shape, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
                yield piece, z

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """In place: theta += scale * eps * z(seed)."""
        for p, z in self._directions(seed):
            p.add_(z, alpha=scale * self.eps)

    def projected_gradient(self, loss_plus: float, loss_minus: float) -> float:
        """(l+ - l-) / (2 eps); non-finite losses are rejected rather than applied."""
        g = (float(loss_plus) - float(loss_minus)) / (2 * self.eps)
        if not math.isfinite(g):
            raise FloatingPointError(f"non-finite ZO projected gradient from losses {loss_plus!r}, {loss_minus!r}")
        return g

    @torch.no_grad()
    def update(self, seeds: Sequence[int], projected_grads: Sequence[float], lr: float | None = None) -> None:
        """theta -= lr * (1/Q) sum_q g_q z_q (+ decoupled weight decay on matrices), in place."""
        if len(seeds) != len(projected_grads) or not seeds:
            raise ValueError(f"need one projected gradient per seed, got {len(seeds)} seeds, {len(projected_grads)} grads")
        lr = self.lr if lr is None else lr
        q = len(seeds)
        for seed, g in zip(seeds, projected_grads):
            for p, z in self._directions(seed):
                p.add_(z, alpha=-lr * float(g) / q)
        if self.weight_decay:
            for p in self.params:
                if p.ndim >= 2:
                    p.mul_(1 - lr * self.weight_decay)

    def estimate(self, seed: int, loss_fn: Callable[[], float]) -> float:
        """Perturb +eps, -eps around theta (restored afterwards) and return the projected gradient."""
        self.perturb(seed, +1.0)
        loss_plus = loss_fn()
        self.perturb(seed, -2.0)
        loss_minus = loss_fn()
        self.perturb(seed, +1.0)
        return self.projected_gradient(loss_plus, loss_minus)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator fixed by (party seed, step index): seeds can be re-derived after a restart."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def draw_seeds(rng: torch.Generator, count: int) -> list[int]:
    """Draw ``count`` seeds (63-bit ints) from a seeded torch generator."""
    return [int(s) for s in torch.randint(0, 2**62, (count,), generator=rng, dtype=torch.int64)]
