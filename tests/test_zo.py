"""MeZO estimator: deterministic per seed, restores weights, and unbiased in the limit."""

import copy
import functools

import pytest
import torch

from fl_app.zo import DIRECTIONS, ZOEstimator, draw_seeds, pack_rows, unpack_rows


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("kind", DIRECTIONS)
def test_same_seed_same_update_different_seed_different(kind):
    a, b, c = small_mlp(), small_mlp(), small_mlp()
    for model, seeds in ((a, [11, 12]), (b, [11, 12]), (c, [11, 13])):
        ZOEstimator(list(model.parameters()), eps=1e-3, lr=0.1, directions=kind).update(seeds, [0.5, -0.25])
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a), flat(small_mlp()))


@pytest.mark.parametrize("kind", DIRECTIONS)
def test_perturb_round_trip_restores_weights(kind):
    model = small_mlp()
    before = flat(model).clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-3, lr=0.1, directions=kind)
    for scale in (1.0, -2.0, 1.0):
        zo.perturb(7, scale)
    assert torch.allclose(flat(model), before, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_estimate_expectation_approaches_true_gradient(kind):
    """cos(mean_q g_q z_q, grad) grows with Q, as sqrt(Q / (Q + d)) predicts."""
    model = small_mlp()
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3
    torch.nn.functional.cross_entropy(model(x), y).backward()
    true_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    rng = torch.Generator().manual_seed(3)
    cosines = []
    for q in (1, 16, 256, 4096):
        probe = copy.deepcopy(model)
        zo = ZOEstimator(list(probe.parameters()), eps=1e-4, lr=1.0, directions=kind)
        seeds = draw_seeds(rng, q)
        with torch.no_grad():
            loss = functools.partial(lambda m: float(torch.nn.functional.cross_entropy(m(x), y)), probe)
            grads = [zo.estimate(s, loss) for s in seeds]
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


@pytest.mark.parametrize(
    "kwargs, field", [({"eps": 0.0}, "zo-eps"), ({"lr": float("nan")}, "lr"), ({"weight_decay": -1.0}, "weight-decay")]
)
def test_bad_hyperparameters_are_rejected(kwargs, field):
    args = {"eps": 1e-3, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=field):
        ZOEstimator(list(small_mlp().parameters()), **args)


def test_non_finite_losses_are_not_applied():
    zo = ZOEstimator(list(small_mlp().parameters()), eps=1e-3, lr=0.1)
    with pytest.raises(FloatingPointError):
        zo.projected_gradient(float("nan"), 1.0)


@pytest.mark.parametrize("kind", DIRECTIONS)
def test_z_is_generated_in_bounded_chunks(kind):
    """A tensor larger than one chunk still gets a full, seed-determined direction, in pieces."""
    import fl_app.zo as zo_module

    big = torch.nn.Parameter(torch.zeros(3 * zo_module.Z_CHUNK + 5))
    zo = ZOEstimator([big], eps=1.0, lr=0.1, directions=kind)
    assert [sum(size for *_, size in chunk) for chunk in zo._chunks(None)] == [zo_module.Z_CHUNK] * 3 + [5]
    zo.perturb(5, 1.0)
    first = big.detach().clone()
    assert first.std().item() == pytest.approx(1.0, abs=0.01) and first.abs().min() > 0
    if kind == "rademacher":
        assert set(first.unique().tolist()) == {-1.0, 1.0}
        assert first.mean().item() == pytest.approx(0.0, abs=0.01)
    zo.perturb(5, -1.0)
    zo.perturb(5, 1.0)
    assert torch.equal(big.detach(), first)


def test_small_tensors_share_a_chunk_and_directions_do_not_depend_on_threads():
    """Many small tensors are drawn as one chunk (no per-tensor generator cost); a gaussian pass split
    over worker threads gives the same weights as the same pass run chunk by chunk."""
    import fl_app.zo as zo_module

    small = [torch.nn.Parameter(torch.zeros(10)) for _ in range(50)]
    assert len(ZOEstimator(small, eps=1.0, lr=0.1)._chunks(None)) == 1
    a = torch.nn.Parameter(torch.zeros(2 * zo_module.Z_CHUNK + 3))
    b = torch.nn.Parameter(torch.zeros(2 * zo_module.Z_CHUNK + 3))
    ZOEstimator([a], eps=1.0, lr=0.1).perturb(9, 1.0)
    serial = ZOEstimator([b], eps=1.0, lr=0.1)
    for index, chunk in enumerate(serial._chunks(None)):
        serial._apply_chunk(index, chunk, [(9, 1.0)])
    assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("kind", DIRECTIONS)
def test_fused_schedule_matches_the_sequential_mezo_steps(kind):
    """perturbed_states + update(restore=last) visits the same states and ends at the same weights as
    MeZO's perturb(+1) / perturb(-2) / perturb(+1) per query followed by a separate update."""
    fused, plain = small_mlp(), small_mlp()
    seeds, grads = [3, 9, 27], [0.4, -1.0, 0.25]
    zf = ZOEstimator(list(fused.parameters()), eps=1e-2, lr=0.1, directions=kind)
    zp = ZOEstimator(list(plain.parameters()), eps=1e-2, lr=0.1, directions=kind)
    states = []
    for _ in zf.perturbed_states(seeds):
        states.append(flat(fused).clone())
    expected = []
    for seed in seeds:
        for scale in (1.0, -2.0):
            zp.perturb(seed, scale)
            expected.append(flat(plain).clone())
        zp.perturb(seed, 1.0)
    assert len(states) == 2 * len(seeds)
    for got, want in zip(states, expected):
        assert torch.allclose(got, want, atol=1e-6)
    zf.update(seeds, grads, restore=seeds[-1])
    zp.update(seeds, grads)
    assert torch.allclose(flat(fused), flat(plain), atol=1e-6)


def test_abandoned_walk_restores_the_weights():
    model = small_mlp()
    before = flat(model).clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-2, lr=0.1)
    walk = zo.perturbed_states([1, 2, 3])
    for _ in range(3):  # stop in the +eps state of the second query
        next(walk)
    assert not torch.allclose(flat(model), before, atol=1e-4)
    walk.close()
    assert torch.allclose(flat(model), before, atol=1e-6)


def test_a_failing_loss_restores_the_weights_before_the_exception_is_handled():
    """walk(): if the loss raises mid-walk, theta is back before any handler runs (a kept traceback
    must not hold a perturbed walk whose late restore would land on weights restored since)."""
    model = small_mlp()
    before = flat(model).clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-2, lr=0.1)
    calls = []

    def loss():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("forward failed")
        return 0.0

    try:
        zo.walk([1, 2, 3], loss)
    except RuntimeError:
        assert torch.allclose(flat(model), before, atol=1e-6)
    else:
        pytest.fail("the loss's exception was swallowed")


def embedding_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"emb": torch.nn.Embedding(40, 6), "out": torch.nn.Linear(6, 3)})


def embedding_loss(model, ids, y):
    return torch.nn.functional.cross_entropy(model["out"](model["emb"](ids).mean(1)), y)


@pytest.mark.parametrize("kind", DIRECTIONS)
def test_row_restricted_step_leaves_other_rows_bit_identical(kind):
    model = embedding_model()
    before = model["emb"].weight.detach().clone()
    params = list(model.parameters())
    rows = [torch.tensor([2, 5, 17]), None, None]
    zo = ZOEstimator(params, eps=1e-2, lr=0.1, directions=kind)
    losses = [0.0] * 6
    for i, _ in enumerate(zo.perturbed_states([1, 2, 3], rows)):
        losses[i] = float(i)
    zo.update([1, 2, 3], [0.5, -0.2, 0.3], rows=rows, restore=3)
    after = model["emb"].weight.detach()
    untouched = [r for r in range(40) if r not in (2, 5, 17)]
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.allclose(after[[2, 5, 17]], before[[2, 5, 17]])


@pytest.mark.slow
@pytest.mark.parametrize("kind", DIRECTIONS)
def test_row_restricted_estimate_approaches_true_gradient(kind):
    """With only the batch's rows perturbed, the estimate still converges to the true gradient (which is
    zero on every other row), and faster than perturbing every row."""
    model = embedding_model()
    gen = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 8, (16, 5), generator=gen), torch.arange(16) % 3  # rows 0..7 of 40 used
    embedding_loss(model, ids, y).backward()
    true_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    rows = [torch.unique(ids), None, None]
    rng = torch.Generator().manual_seed(3)
    cosines = {}
    for restricted in (True, False):
        cosines[restricted] = []
        for q in (1, 16, 256, 2048):
            probe = copy.deepcopy(model)
            zo = ZOEstimator(list(probe.parameters()), eps=1e-4, lr=1.0, directions=kind)
            seeds = draw_seeds(rng, q)
            step_rows = rows if restricted else None
            with torch.no_grad():
                losses = [float(embedding_loss(probe, ids, y)) for _ in zo.perturbed_states(seeds, step_rows)]
            grads = [zo.projected_gradient(losses[2 * i], losses[2 * i + 1]) for i in range(q)]
            before = flat(probe).clone()
            zo.update(seeds, grads, rows=step_rows, restore=seeds[-1])
            cosines[restricted].append(
                torch.nn.functional.cosine_similarity(before - flat(probe), true_grad, dim=0).item()
            )
    assert cosines[True] == sorted(cosines[True]), cosines
    assert cosines[True][-1] > 0.9, cosines
    assert cosines[True][-1] > cosines[False][-1], cosines


def test_packed_rows_round_trip():
    rows = [torch.tensor([0, 3, 4, 1000, 50_000]), None, torch.arange(66), torch.tensor([], dtype=torch.int64)]
    packed = pack_rows(rows)
    back = unpack_rows(packed, 4)
    assert back[1] is None
    for got, want in zip(back, rows):
        if want is not None:
            assert torch.equal(got, want)
    assert pack_rows(None) == b"" and unpack_rows(b"", 4) is None
    with pytest.raises(ValueError, match="rows"):
        unpack_rows(packed, 3)
    with pytest.raises(ValueError, match="rows"):
        unpack_rows(b"garbage", 4)


@pytest.mark.parametrize(
    "losses, error", [([0.5, float("nan"), 0.1, 0.2], FloatingPointError), ([0.5, 0.4, 0.1], ValueError)]
)
def test_finish_with_unusable_losses_restores_the_weights(losses, error):
    """A walk whose losses are non-finite or miscounted leaves theta as it was before the step."""
    model = small_mlp()
    before = flat(model).clone()
    zo = ZOEstimator(list(model.parameters()), eps=1e-2, lr=0.1)
    for _ in zo.perturbed_states([4, 5]):
        pass
    with pytest.raises(error):
        zo.finish([4, 5], losses)
    assert torch.allclose(flat(model), before, atol=1e-6)


def test_half_precision_weights_round_once_per_pass():
    """float16 weights: the terms of one pass are summed in float32 and rounded once, so a pass whose
    terms cancel leaves the weights bit-identical, and a perturb-restore walk stays within a rounding."""
    weights = torch.nn.Parameter(
        (0.03 * torch.randn(300, 40, generator=torch.Generator().manual_seed(1))).clamp(-0.12, 0.12).half()
    )  # spacing <= 6.1e-5, so a restore is within eps / 4
    before = weights.detach().clone()
    for kind in ("gaussian", "rademacher"):
        est = ZOEstimator([weights], eps=1e-3, lr=1e-3, directions=kind)
        est.apply([(7, 1e-3), (7, -1e-3)])
        assert torch.equal(weights, before)
        losses = [0.0 for _ in est.perturbed_states([3, 4])]
        est.perturb(4, +1.0)
        drift = (weights.float() - before.float()).abs()
        assert drift.max() <= 1e-3 / 4  # 5 rounded passes; a missing restore would leave eps
        assert len(losses) == 4
        weights.data.copy_(before)
