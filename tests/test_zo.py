"""MeZO estimator: deterministic per seed, restores weights, and unbiased in the limit."""
import copy

import pytest
import torch

from fl_app.zo import ZOEstimator, draw_seeds


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_same_seed_same_update_different_seed_different():
    a, b, c = small_mlp(), small_mlp(), small_mlp()
    for model, seeds in ((a, [11, 12]), (b, [11, 12]), (c, [11, 13])):
        ZOEstimator(list(model.parameters()), eps=1e-3, lr=0.1).update(seeds, [0.5, -0.25])
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a), flat(small_mlp()))


def test_perturb_round_trip_restores_weights():
    model = small_mlp()
    before = flat(model).clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-3, lr=0.1)
    for scale in (1.0, -2.0, 1.0):
        zo.perturb(7, scale)
    assert torch.allclose(flat(model), before, atol=1e-6)


def test_estimate_expectation_approaches_true_gradient():
    """cos(mean_q g_q z_q, grad) grows with Q, as sqrt(Q / (Q + d)) predicts."""
    model = small_mlp()
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    torch.nn.functional.cross_entropy(model(x), y).backward()
    true_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    rng = torch.Generator().manual_seed(3)
    cosines = []
    for q in (1, 16, 256, 4096):
        probe = copy.deepcopy(model)
        zo = ZOEstimator(list(probe.parameters()), eps=1e-4, lr=1.0)
        seeds = draw_seeds(rng, q)
        with torch.no_grad():
            grads = [zo.estimate(s, lambda: float(torch.nn.functional.cross_entropy(probe(x), y))) for s in seeds]
        before = flat(probe).clone()
        zo.update(seeds, grads)
        estimate = before - flat(probe)  # lr = 1, so this is (1/Q) sum g_q z_q
        cosines.append(torch.nn.functional.cosine_similarity(estimate, true_grad, dim=0).item())
    assert cosines == sorted(cosines), cosines
    assert cosines[-1] > 0.9 and cosines[0] < 0.5, cosines


def test_weight_decay_shrinks_only_matrices():
    model = small_mlp()
    bias_before = model[0].bias.detach().clone()
    w_before = model[0].weight.detach().clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-3, lr=0.1, weight_decay=0.5)
    zo.update([1], [0.0])
    assert torch.equal(model[0].bias, bias_before)
    assert torch.allclose(model[0].weight, w_before * 0.95)


@pytest.mark.parametrize("kwargs, field", [({"eps": 0.0}, "zo-eps"), ({"lr": float("nan")}, "lr"),
                                           ({"weight_decay": -1.0}, "weight-decay")])
def test_bad_hyperparameters_are_rejected(kwargs, field):
    args = {"eps": 1e-3, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=field):
        ZOEstimator(list(small_mlp().parameters()), **args)


def test_non_finite_losses_are_not_applied():
    zo = ZOEstimator(list(small_mlp().parameters()), eps=1e-3, lr=0.1)
    with pytest.raises(FloatingPointError):
        zo.projected_gradient(float("nan"), 1.0)


def test_z_is_generated_in_bounded_chunks():
    """A tensor larger than one chunk still gets a full, seed-determined direction, in pieces."""
    import fl_app.zo as zo_module

    big = torch.nn.Parameter(torch.zeros(3 * zo_module.Z_CHUNK + 5))
    zo = ZOEstimator([big], eps=1.0, lr=0.1)
    pieces = list(zo._directions(5))
    assert [z.numel() for _, z in pieces] == [zo_module.Z_CHUNK] * 3 + [5]
    zo.perturb(5, 1.0)
    first = big.detach().clone()
    assert first.std().item() == pytest.approx(1.0, abs=0.01) and first.abs().min() > 0
    zo.perturb(5, -1.0)
    zo.perturb(5, 1.0)
    assert torch.equal(big.detach(), first)
