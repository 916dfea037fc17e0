"""AUTOMATA subset selection at mini-batch granularity: GradMatch with non-negative OMP.

The server owns the head, so it can compute each batch's last-layer gradient proxy from the
activations a client already sends; only batch ids and weights go back to the client.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fl_app.config import SELECTORS

PLANS = ("full", "warm", "random", "gradmatch", "keep")  # what a client does with its data in a round


def last_layer_proxy(features: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of the mean cross-entropy w.r.t. a linear head [W | b] on ``features``.

    ``features`` [B, F] are the head's inputs, ``scores`` [B, C] its outputs; the result is the
    flattened (softmax - onehot)^T [features, 1] / B, of size C * (F + 1).
    """
    if features.ndim != 2 or scores.ndim != 2 or features.shape[0] != scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"proxy inputs must be [B, F], [B, C], [B]; got {list(features.shape)}, "
            f"{list(scores.shape)}, {list(labels.shape)}"
        )
    error = torch.softmax(scores.float(), dim=1)
    error[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
    inputs = torch.cat([features.float(), torch.ones(features.shape[0], 1, device=features.device)], dim=1)
    return (error.T @ inputs).reshape(-1) / features.shape[0]


def budget_batches(fraction: float, num_examples: int, batch_size: int) -> int:
    """ceil(fraction * N / B) batches, as in AUTOMATA."""
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.ceil(fraction * num_examples / batch_size))


def _nonneg_lstsq(columns: torch.Tensor, target: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Least squares on ``columns`` [k, d]; drop the most negative weight and re-solve until none is."""
    keep = list(range(columns.shape[0]))
    while keep:
        weights = torch.linalg.lstsq(columns[keep].T.double(), target.double().unsqueeze(1)).solution.squeeze(1)
        if (weights >= 0).all():
            return keep, weights.float()
        keep.pop(int(weights.argmin()))
    return [], torch.zeros(0)


def omp_select(
    grads: torch.Tensor, target: torch.Tensor, budget: int, tol: float = 1e-6
) -> tuple[list[int], torch.Tensor]:
    """Non-negative orthogonal matching pursuit: up to ``budget`` rows of ``grads`` [n, d] whose
    non-negative combination approximates ``target`` [d]. Returns (row ids, weights >= 0)."""
    if grads.ndim != 2 or target.shape != grads.shape[1:]:
        raise ValueError(f"grads must be [n, d] and target [d]; got {list(grads.shape)}, {list(target.shape)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    chosen: list[int] = []
    weights = torch.zeros(0)
    residual = target.float().clone()
    for _ in range(min(budget, grads.shape[0]) * 2):  # picks can be dropped again; bound the loop
        if len(chosen) >= budget or residual.norm() <= tol * max(1.0, float(target.norm())):
            break
        scores = grads.float() @ residual
        if chosen:
            scores[chosen] = -math.inf
        best = int(scores.argmax())
        if scores[best] <= 0:
            break  # nothing left that reduces the residual with a non-negative weight
        kept, weights = _nonneg_lstsq(grads[chosen + [best]].float(), target)
        chosen = [(chosen + [best])[i] for i in kept]
        residual = target.float() - weights @ grads[chosen].float() if chosen else target.float().clone()
    return chosen, weights


@dataclass(frozen=True)
class Subset:
    """Selected batch ids and their weights (training loss is sum(w * loss) / sum(w))."""

    batch_ids: list[int]
    weights: list[float]


def select_batches(
    selector: str, proxies: torch.Tensor | None, num_batches: int, budget: int, rng: torch.Generator
) -> Subset:
    """Pick ``budget`` of ``num_batches`` batches: GradMatch on ``proxies`` [num_batches, d], random,
    or all (``full``). GradMatch fills any shortfall with random batches of weight 1."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r} (field 'subset-selector'); known: {', '.join(SELECTORS)}")
    if selector == "full":
        return Subset(list(range(num_batches)), [1.0] * num_batches)
    budget = min(budget, num_batches)
    if selector == "random":  # weight n/b each: an unbiased estimate of the full sum
        ids = torch.randperm(num_batches, generator=rng)[:budget].tolist()
        return Subset(sorted(ids), [num_batches / budget] * budget)
    if proxies is None or proxies.shape[0] != num_batches:
        raise ValueError(
            f"gradmatch needs one proxy per batch ({num_batches}), got {None if proxies is None else proxies.shape[0]}"
        )
    ids, weights = omp_select(proxies, proxies.sum(0), budget)
    chosen = {i: w for i, w in zip(ids, weights.tolist()) if w > 0}
    rest = [i for i in torch.randperm(num_batches, generator=rng).tolist() if i not in chosen]
    for i in rest[: budget - len(chosen)]:
        chosen[i] = 1.0
    order = sorted(chosen)
    return Subset(order, [chosen[i] for i in order])


def weighted_sum(rows: torch.Tensor, subset: Subset) -> torch.Tensor:
    """sum_i w_i rows[i] over the subset (its estimate of the full sum)."""
    return torch.tensor(subset.weights) @ rows[subset.batch_ids]


def subset_error(rows: torch.Tensor, subset: Subset) -> float:
    """Relative error of the subset's weighted sum against the full sum of ``rows``."""
    full = rows.sum(0)
    return float((weighted_sum(rows, subset) - full).norm() / full.norm())


RANDOM_DRAWS = 20  # random subsets drawn to compare each GradMatch selection against


def selection_quality(proxies: torch.Tensor, subset: Subset, seed: int) -> dict[str, float]:
    """Relative error of the selected subset's weighted proxy sum against the full sum, next to the
    mean error of random subsets of the same size (unbiased n/b weights) on the same proxies."""
    rng = torch.Generator().manual_seed(seed + 1)
    size = len(subset.batch_ids)
    randoms = [
        subset_error(proxies, select_batches("random", None, proxies.shape[0], size, rng)) for _ in range(RANDOM_DRAWS)
    ]
    return {
        "batches": proxies.shape[0],
        "selected": size,
        "gradmatch_error": subset_error(proxies, subset),
        "random_error": sum(randoms) / len(randoms),
    }


def batch_proxies(
    features: Sequence[torch.Tensor], scores: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Stack one last-layer proxy per batch."""
    return torch.stack([last_layer_proxy(f, s, y) for f, s, y in zip(features, scores, labels)])


def round_plan(selector: str, round_in_run: int, reselect_every: int, warm_rounds: int) -> str:
    """What a client does with its data in round ``round_in_run`` (1-based) of a run or trial.

    ``full``: every batch. ``warm``: a budget of batches drawn from the full data (warm start, the
    first ``warm_rounds`` rounds). Then a subset is chosen every ``reselect_every`` rounds and kept
    in between; the first one is random unless a warm start trained the model first (AUTOMATA).
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r} (field 'subset-selector'); known: {', '.join(SELECTORS)}")
    if round_in_run < 1 or reselect_every < 1 or warm_rounds < 0:
        raise ValueError(
            f"round {round_in_run}, reselect-every {reselect_every} and warm rounds {warm_rounds} "
            "must be >= 1, >= 1 and >= 0"
        )
    if selector == "full":
        return "full"
    if round_in_run <= warm_rounds:
        return "warm"
    since = round_in_run - warm_rounds - 1
    if since % reselect_every:
        return "keep"
    if selector == "gradmatch" and since == 0 and warm_rounds == 0:
        return "random"
    return selector
