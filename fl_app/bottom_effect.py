"""What training the client's bottom adds: how far it moved, and what the top scores over it.

At every evaluation a client measures its bottom's *drift* from its starting values (the
trainable tensors' relative change, and the relative change of the cut activations on a fixed
probe batch). A *swap evaluation* scores the same top over the trained bottom and over the
initial one, example by example: the predictions that flip right and wrong, and an exact McNemar
test of whether the trained bottom changes accuracy at all. A bottom that learned nothing flips
nothing (p = 1); one that drifts while the top holds its accuracy over the initial bottom is
moving in directions that do not help.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fl_app.records import EvalReport

LOSS_RISE = 1.10  # a dev loss this far above the run's best so far ...
DRIFT_GROWTH = 1.2  # ... while the cut activations' drift grew this much faster than the rounds since then
SWAP_P = 0.01  # or a swap evaluation in which the trained bottom loses significantly more than it gains


def relative_change(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> float:
    """||new - old|| / ||old|| over all tensors together (0 when there are none; inf when old is zero
    and new is not). Computed in float64 on the CPU."""
    if set(new) != set(old):
        raise ValueError(f"drift needs the same tensors before and after, differing in {sorted(set(new) ^ set(old))}")
    moved = base = 0.0
    for name, value in new.items():
        start = old[name].detach().to("cpu", torch.float64)
        moved += float((value.detach().to("cpu", torch.float64) - start).pow(2).sum())
        base += float(start.pow(2).sum())
    if moved == 0.0:
        return 0.0
    return math.sqrt(moved / base) if base > 0 else math.inf


def activation_change(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> float:
    """||new - old|| / ||old|| of cut activations over the real (unmasked) token positions."""
    if new.shape != old.shape or new.shape[:2] != mask.shape:
        raise ValueError(
            f"activation drift needs equal shapes, got {list(new.shape)}, {list(old.shape)}, mask {list(mask.shape)}"
        )
    keep = mask.to("cpu").bool()
    new, old = new.detach().to("cpu", torch.float64)[keep], old.detach().to("cpu", torch.float64)[keep]
    base = float(old.norm())
    moved = float((new - old).norm())
    if moved == 0.0:
        return 0.0
    return moved / base if base > 0 else math.inf


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes: ``gained`` examples right only with the
    trained bottom, ``lost`` right only with the initial one (binomial test of gained vs lost at 1/2).
    No discordant pair gives p = 1."""
    if gained < 0 or lost < 0:
        raise ValueError(f"flip counts must be >= 0, got gained={gained}, lost={lost}")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_flips(trained: Sequence[int], initial: Sequence[int]) -> tuple[int, int]:
    """(right only under ``trained``, right only under ``initial``) for per-example 0/1 outcomes."""
    if len(trained) != len(initial):
        raise ValueError(f"paired outcomes need equal lengths, got {len(trained)} and {len(initial)}")
    gained = sum(1 for a, b in zip(trained, initial) if a and not b)
    lost = sum(1 for a, b in zip(trained, initial) if b and not a)
    return gained, lost


def pool_drift(reports: Sequence[EvalReport]) -> dict[str, Any] | None:
    """The evaluating clients' drift: mean and per client (None when no report carries it)."""
    have = [r for r in reports if r.drift_params is not None]
    if not have:
        return None
    params = [float(r.drift_params) for r in have]
    acts = [float(r.drift_activations) for r in have]
    return {
        "params": sum(params) / len(params),
        "activations": sum(acts) / len(acts),
        "per_client": [{"params": p, "activations": a} for p, a in zip(params, acts)],
    }


def pool_swap(reports: Sequence[EvalReport]) -> dict[str, Any] | None:
    """The swap evaluation over every evaluating client's shard, in shard order: the initial bottom's
    accuracy and loss under the same top, the flips and McNemar's p (None when no report has one)."""
    have = [r for r in reports if r.swap_correct is not None]
    if not have:
        return None
    trained = [int(c) for r in have for c in r.correct]
    initial = [int(c) for r in have for c in r.swap_correct]
    count = len(initial)
    gained, lost = paired_flips(trained, initial)
    return {
        "accuracy": sum(trained) / count,
        "initial_accuracy": sum(initial) / count,
        "initial_loss": sum(float(r.swap_loss) * len(r.swap_correct) for r in have) / count,
        "gained": gained,
        "lost": lost,
        "p_value": mcnemar_exact(gained, lost),
        "count": count,
    }


def divergence(history: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the run looks like diverging, or None. Either the latest evaluation's swap (``eval-swap =
    every``) shows the trained bottom scoring worse than its start through the same top (more
    predictions lost than gained, McNemar p below :data:`SWAP_P`), or its dev loss is more than
    :data:`LOSS_RISE` times the best so far while the bottom's drift has grown faster than its steps
    since that best (more than :data:`DRIFT_GROWTH` times the growth in rounds). The drift judged is
    the cut activations' (what the top sees), the weights' only where an evaluation lacks it: a LoRA
    bottom's factors start near zero and grow steadily however it fares, so their relative change
    says nothing. A drift that grows with the steps (steady updates) or slower (a ZO random walk) is
    not flagged, so a top that simply overfits over a steadily moving bottom is not; nor is anything
    over a frozen bottom (no drift)."""
    swap = history[-1].get("swap") if history else None
    if swap and swap["lost"] > swap["gained"] and swap["p_value"] < SWAP_P:
        return (
            f"the trained bottom now scores worse than its start through the same top ({swap['gained']} "
            f"predictions gained, {swap['lost']} lost, McNemar p {swap['p_value']:.2g}): the client's training "
            "is hurting (try a lower client-lr, zo-grad-clip or a decaying client-lr-schedule)"
        )
    evals = [e for e in history if e.get("loss") is not None and e.get("drift")]
    if len(evals) < 2:
        return None
    best, last = min(evals, key=lambda e: e["loss"]), evals[-1]
    if last is best or not last["loss"] > LOSS_RISE * best["loss"]:
        return None
    judged = "activations" if best["drift"].get("activations") is not None else "params"
    was, now = best["drift"][judged], last["drift"][judged]
    if not was > 0 or not now > DRIFT_GROWTH * was * last["round"] / best["round"]:
        return None
    what = "its cut activations" if judged == "activations" else "its weights"
    return (
        f"dev loss rose from {best['loss']:.4f} (round {best['round']}) to {last['loss']:.4f} while the bottom's "
        f"drift grew faster than its steps, {what} from {100 * was:.2f} % to {100 * now:.2f} % of their norm: the "
        "client's training may be diverging (try a lower client-lr, zo-grad-clip or a decaying client-lr-schedule)"
    )
