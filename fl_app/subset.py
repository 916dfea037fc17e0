"""AUTOMATA subset selection at mini-batch granularity: GradMatch with non-negative OMP.

The server owns the head, so it can compute each batch's last-layer gradient proxy from the
activations a client already sends; only batch ids and weights go back to the client.

``gradmatch-pc`` is GradMatch's per-class variant at the same granularity: each class's gradient
is matched on its own (the class's part of every batch's proxy), batches are chosen for the
matches of all classes together, and a chosen batch gets one weight per class (its examples of
class c are weighted by the batch's weight for c).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fl_app.config import SELECTORS

PLANS = ("full", "warm", "random", "gradmatch", "gradmatch-pc", "keep")  # what a client does with its data in a round


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


def class_parts(features: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch's last-layer proxy split by the examples' class: ``[C, C * (F + 1)]``, row c the
    gradient contributed by the batch's examples of class c (zeros if it has none); the rows sum to
    :func:`last_layer_proxy`."""
    parts = torch.zeros(scores.shape[1], scores.shape[1] * (features.shape[1] + 1))
    for c in labels.unique().tolist():
        mine = labels == c
        parts[c] = last_layer_proxy(features[mine], scores[mine], labels[mine]).cpu() * (int(mine.sum()) / len(labels))
    return parts


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


def _omp(parts: torch.Tensor, targets: torch.Tensor, budget: int, tol: float) -> tuple[list[int], torch.Tensor]:
    """Non-negative OMP over rows with C parts each: ``parts`` [n, C, d], ``targets`` [C, d]. A row is
    added where its parts best reduce all residuals together; each part's weights are then solved on
    their own (non-negative least squares over the chosen rows holding that part), and rows left
    with no positive weight are dropped. Returns (row ids, weights [k, C] >= 0)."""
    parts, targets = parts.float(), targets.float()
    present = parts.abs().sum(2) > 0  # [n, C]
    chosen: list[int] = []
    weights = torch.zeros(0, parts.shape[1])
    residual = targets.clone()
    for _ in range(min(budget, parts.shape[0]) * 2):  # picks can be dropped again; bound the loop
        if len(chosen) >= budget or residual.norm() <= tol * max(1.0, float(targets.norm())):
            break
        gains = torch.einsum("ncd,cd->nc", parts, residual).clamp_min(0).sum(1)
        if chosen:
            gains[chosen] = -math.inf
        best = int(gains.argmax())
        if gains[best] <= 0:
            break  # nothing left that reduces a residual with a non-negative weight
        candidates = chosen + [best]
        solved = torch.zeros(len(candidates), parts.shape[1])
        for c in range(parts.shape[1]):
            rows = [i for i, b in enumerate(candidates) if present[b, c]]
            if rows:
                kept, w = _nonneg_lstsq(parts[[candidates[i] for i in rows], c], targets[c])
                solved[[rows[i] for i in kept], c] = w
        alive = solved.sum(1) > 0
        chosen = [b for b, keep in zip(candidates, alive.tolist()) if keep]
        weights = solved[alive]
        residual = targets - torch.einsum("kc,kcd->cd", weights, parts[chosen]) if chosen else targets.clone()
    return chosen, weights


def omp_select(
    grads: torch.Tensor, target: torch.Tensor, budget: int, tol: float = 1e-6
) -> tuple[list[int], torch.Tensor]:
    """Non-negative orthogonal matching pursuit: up to ``budget`` rows of ``grads`` [n, d] whose
    non-negative combination approximates ``target`` [d]. Returns (row ids, weights > 0)."""
    if grads.ndim != 2 or target.shape != grads.shape[1:]:
        raise ValueError(f"grads must be [n, d] and target [d]; got {list(grads.shape)}, {list(target.shape)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    chosen, weights = _omp(grads.unsqueeze(1), target.unsqueeze(0), budget, tol)
    return chosen, weights[:, 0]


def omp_select_per_class(parts: torch.Tensor, budget: int, tol: float = 1e-6) -> tuple[list[int], torch.Tensor]:
    """Per-class non-negative OMP over whole batches: ``parts`` [n, C, d] are each batch's class
    parts; each class's target is the sum of its parts. Returns (up to ``budget`` batch ids,
    weights [k, C] >= 0; 0 where the batch has no example of the class)."""
    if parts.ndim != 3 or budget < 1:
        raise ValueError(f"parts must be [n, C, d] and budget >= 1; got {list(parts.shape)}, {budget}")
    return _omp(parts, parts.sum(0), budget, tol)


@dataclass(frozen=True)
class Subset:
    """Selected batch ids and their weights: one per batch, or (``gradmatch-pc``) one per batch and
    class, flattened batch-major (``len(weights) == C * len(batch_ids)``)."""

    batch_ids: list[int]
    weights: list[float]

    def per_class(self) -> int:
        """C when the weights are per batch and class, else 0."""
        count = len(self.batch_ids)
        return len(self.weights) // count if count and len(self.weights) != count else 0

    def class_weights(self) -> torch.Tensor:
        """The weights as [k, C] (C = 1 for one weight per batch)."""
        return torch.tensor(self.weights, dtype=torch.float64).reshape(len(self.batch_ids), -1)


def select_batches(
    selector: str, proxies: torch.Tensor | None, num_batches: int, budget: int, rng: torch.Generator
) -> Subset:
    """Pick ``budget`` of ``num_batches`` batches: GradMatch on ``proxies`` [num_batches, d] (for
    ``gradmatch-pc``: the class parts [num_batches, C, d]), random, or all (``full``). GradMatch fills
    any shortfall with random batches of weight 1 (every class)."""
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
    if selector == "gradmatch-pc":
        if proxies.ndim != 3:
            raise ValueError(f"gradmatch-pc needs class parts [batches, C, d], got {list(proxies.shape)}")
        ids, solved = omp_select_per_class(proxies, budget)
        chosen = {i: w for i, w in zip(ids, solved.tolist())}
        fill = [1.0] * proxies.shape[1]
    else:
        ids, weights = omp_select(proxies, proxies.sum(0), budget)
        chosen = {i: [w] for i, w in zip(ids, weights.tolist())}
        fill = [1.0]
    rest = [i for i in torch.randperm(num_batches, generator=rng).tolist() if i not in chosen]
    for i in rest[: budget - len(chosen)]:
        chosen[i] = fill
    order = sorted(chosen)
    return Subset(order, [w for i in order for w in chosen[i]])


def weighted_sum(rows: torch.Tensor, subset: Subset) -> torch.Tensor:
    """The subset's estimate of the full sum of ``rows`` ([n, d] proxies, or [n, C, d] class parts):
    sum_i w_i rows[i], or with weights per class sum_i sum_c w_ic rows[i, c]."""
    picked = rows[subset.batch_ids].double()
    if subset.per_class():
        if rows.ndim != 3:
            raise ValueError("a subset weighted per class needs the batches' class parts [n, C, d]")
        return torch.einsum("kc,kcd->d", subset.class_weights(), picked).float()
    weights = subset.class_weights()[:, 0]
    return (torch.einsum("k,kcd->d", weights, picked) if rows.ndim == 3 else weights @ picked).float()


def subset_error(rows: torch.Tensor, subset: Subset) -> float:
    """Relative error of the subset's weighted sum against the full sum of ``rows`` (see :func:`weighted_sum`)."""
    full = rows.sum(0) if rows.ndim == 2 else rows.sum((0, 1))
    return float((weighted_sum(rows, subset) - full).norm() / full.norm())


RANDOM_DRAWS = 20  # random subsets drawn to compare each GradMatch selection against


def selection_quality(proxies: torch.Tensor, subset: Subset, seed: int) -> dict[str, float]:
    """Relative error of the selected subset's weighted proxy sum against the full sum, next to the
    mean error of random subsets of the same size (unbiased n/b weights) on the same proxies
    (``proxies`` [n, d], or the class parts [n, C, d] for a subset weighted per class)."""
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
    if selector.startswith("gradmatch") and since == 0 and warm_rounds == 0:
        return "random"
    return selector
