"""GradMatch (non-negative OMP) recovers sparse combinations and beats random subsets of equal size."""

import pytest
import torch

from fl_app.batches import step_weights
from fl_app.subset import (
    Subset,
    batch_proxies,
    budget_batches,
    class_parts,
    last_layer_proxy,
    omp_select,
    select_batches,
    subset_error,
)


def test_omp_recovers_known_sparse_nonnegative_combination():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(50, 200, generator=gen)
    target = 2.0 * grads[3] + 0.5 * grads[17] + 1.5 * grads[40]
    ids, weights = omp_select(grads, target, budget=3)
    recovered = dict(zip(ids, weights.tolist()))
    assert sorted(recovered) == [3, 17, 40]
    assert recovered[3] == pytest.approx(2.0, abs=1e-4) and recovered[17] == pytest.approx(0.5, abs=1e-4)
    assert recovered[40] == pytest.approx(1.5, abs=1e-4)


def test_weights_nonnegative_and_budget_respected():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(40, 30, generator=gen) + 0.3
    for budget in (1, 4, 9):
        ids, weights = omp_select(grads, grads.sum(0), budget)
        assert 0 < len(ids) <= budget and len(set(ids)) == len(ids)
        assert (weights > 0).all()  # rows left at weight 0 are dropped
    subset = select_batches("gradmatch", grads, 40, 6, gen)
    assert len(subset.batch_ids) == 6 and min(subset.weights) >= 0


def test_last_layer_proxy_equals_autograd_gradient():
    gen = torch.Generator().manual_seed(2)
    features, labels = torch.randn(8, 5, generator=gen), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    head = torch.nn.Linear(5, 3)
    torch.nn.functional.cross_entropy(head(features), labels).backward()
    autograd = torch.cat([head.weight.grad, head.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
    assert torch.allclose(last_layer_proxy(features, head(features).detach(), labels), autograd, atol=1e-6)


def test_gradmatch_subset_matches_full_gradient_better_than_random():
    """40 batches of a small classification problem, 20% budget: GradMatch's weighted sum is closer
    to the full gradient than random subsets of the same size (with unbiased n/b weights)."""
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(6, 3)
    features = [torch.randn(8, 6, generator=gen) + torch.randn(1, 6, generator=gen) for _ in range(40)]
    labels = [torch.randint(0, 3, (8,), generator=gen) for _ in range(40)]
    with torch.no_grad():
        proxies = batch_proxies(features, [head(f) for f in features], labels)
    budget = budget_batches(0.2, 40 * 8, 8)
    assert budget == 8
    matched = subset_error(proxies, select_batches("gradmatch", proxies, 40, budget, gen))
    randoms = [
        subset_error(proxies, select_batches("random", None, 40, budget, torch.Generator().manual_seed(s)))
        for s in range(30)
    ]
    assert matched < min(randoms), (matched, min(randoms))
    assert subset_error(proxies, select_batches("full", None, 40, budget, gen)) < 1e-6


def test_bad_selector_and_fraction_are_rejected():
    with pytest.raises(ValueError, match="subset-selector"):
        select_batches("craig", None, 4, 2, torch.Generator())
    with pytest.raises(ValueError, match="fraction"):
        budget_batches(0.0, 100, 10)
    with pytest.raises(ValueError, match="proxy"):
        select_batches("gradmatch", torch.zeros(3, 4), 4, 2, torch.Generator())


def _class_problem(seed: int, batches: int = 40):
    """Class parts of ``batches`` batches of 8 from a 3-class linear head (class 2 rare)."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(6, 3)
    parts = []
    for _ in range(batches):
        features = torch.randn(8, 6, generator=gen) + torch.randn(1, 6, generator=gen)
        labels = torch.multinomial(torch.tensor([0.5, 0.4, 0.1]), 8, replacement=True, generator=gen)
        with torch.no_grad():
            parts.append(class_parts(features, head(features), labels))
    return torch.stack(parts)


def _class_errors(parts: torch.Tensor, subset: Subset) -> list[float]:
    """Per class: relative error of the subset's weighted class parts against the class's full sum."""
    weights = subset.class_weights().float().expand(-1, parts.shape[1])
    picked = parts[subset.batch_ids]
    return [
        float((weights[:, c] @ picked[:, c] - parts[:, c].sum(0)).norm() / parts[:, c].sum(0).norm())
        for c in range(parts.shape[1])
    ]


def test_per_class_gradmatch_matches_every_class_within_the_batch_budget():
    """gradmatch-pc: at most budget batches, weights >= 0 and 0 for classes a batch lacks, and each
    class's gradient matched better (mean over classes and problems) than one weight per batch does."""
    pc_errors, plain_errors = [], []
    for seed in range(5):
        parts = _class_problem(seed)
        subset = select_batches("gradmatch-pc", parts, 40, 8, torch.Generator().manual_seed(seed))
        weights = subset.class_weights()
        assert subset.per_class() == 3 and len(subset.batch_ids) <= 8 and (weights >= 0).all()
        absent = parts[subset.batch_ids].abs().sum(2) == 0
        assert (weights[absent] == 0).all()
        plain = select_batches("gradmatch", parts.sum(1), 40, 8, torch.Generator().manual_seed(seed))
        assert not plain.per_class()
        pc_errors += _class_errors(parts, subset)
        plain_errors += _class_errors(parts, plain)
        randoms = [
            subset_error(parts, select_batches("random", None, 40, 8, torch.Generator().manual_seed(s)))
            for s in range(20)
        ]
        assert subset_error(parts, subset) < sum(randoms) / len(randoms)
    assert sum(pc_errors) < sum(plain_errors), (pc_errors, plain_errors)
    with pytest.raises(ValueError, match="class parts"):
        select_batches("gradmatch-pc", parts.sum(1), 40, 8, torch.Generator())


def test_class_parts_sum_to_the_batch_proxy():
    gen = torch.Generator().manual_seed(4)
    features, scores = torch.randn(6, 5, generator=gen), torch.randn(6, 3, generator=gen)
    labels = torch.tensor([0, 0, 2, 0, 2, 2])
    parts = class_parts(features, scores, labels)
    assert torch.allclose(parts.sum(0), last_layer_proxy(features, scores, labels), atol=1e-6)
    assert (parts[1] == 0).all()  # no example of class 1


def test_per_class_step_weights_average_one_per_example():
    subset = Subset([0, 2], [2.0, 0.0, 1.0, 4.0])  # batch 0: class 0 weight 2, class 1 weight 0; batch 2: 1, 4
    labels = [[0, 0, 1], [1, 1, 0]]
    weights = step_weights(subset, labels)
    per_example = [weights[k][y] for k, batch in enumerate(labels) for y in batch]
    assert sum(per_example) / len(per_example) == pytest.approx(1.0)
    assert weights[1][1] / weights[1][0] == pytest.approx(4.0) and weights[0][1] == 0.0
    with pytest.raises(ValueError, match="labels"):
        step_weights(subset)
