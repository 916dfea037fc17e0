"""The ZO client's estimators (zo-estimator): two-point, one-sided, low-rank and sparse, each seeded,
deterministic and replayable: the walk visits its perturbed states and restores the weights, the
directions have the shape they promise, estimates follow the gradient they can see, and a run's
synced replay, seeds state, resume and export are exact with every one of them."""

import copy
import dataclasses
import functools
import json
import warnings

import numpy as np
import pytest
import torch

import fl_app.coordinator as coordinator
from fl_app import export
from fl_app.client_session import ClientSide, NodeSettings, _prepare, make_client, replay_own, trainable_state
from fl_app.client_store import load_client_state
from fl_app.config import ESTIMATORS, ZOSettings, make_config, read_scenario
from fl_app.records import SessionRequest, SessionSettings
from fl_app.train import run
from fl_app.zo import SUBSPACE_BITS, LowRankEstimator, SparseEstimator, magnitude_masks, make_estimator

SMOKE = {**read_scenario("sim_configs/smoke_tiny.toml"), "eval-test": False}
NEW = ("one-sided", "low-rank", "sparse")  # two-point's runs are covered by the rest of the suite


def model(seed=0, rows=40):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(rows, 16), "mid": torch.nn.Linear(16, 12), "out": torch.nn.Linear(12, 3)}
    )


def loss_of(m, ids, y):
    return torch.nn.functional.cross_entropy(m["out"](torch.tanh(m["mid"](m["emb"](ids).mean(1)))), y)


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def estimator(m, name, **keys):
    params = list(m.parameters())
    masks = magnitude_masks([p.detach() if p.ndim == 2 else None for p in params], 0.75)
    settings = dataclasses.replace(ZOSettings(), estimator=name, **keys)
    return make_estimator(params, settings, lr=0.1, masks=masks)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_is_deterministic_per_seed(name):
    a, b, c = model(), model(), model()
    for m, seeds in ((a, [11, 12]), (b, [11, 12]), (c, [11, 13])):
        zo = estimator(m, name)
        zo.update(seeds, [0.5, -0.25])
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
    assert not torch.equal(flat(a), flat(model()))
    zo = estimator(model(), name)
    assert zo.draw(7, 3, 4) == zo.draw(7, 3, 4) != zo.draw(7, 4, 4)  # a step's seeds: fixed by (seed, step)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_walk_visits_each_state_once_and_restores_the_weights(name):
    m = model()
    before = flat(m).clone()
    zo = estimator(m, name)
    seeds = [1, 2, 3]
    visited = [flat(m).clone() for _ in zo.perturbed_states(seeds)]
    assert len(visited) == ESTIMATORS_PER_QUERY[name] * len(seeds)
    assert all(not torch.allclose(v, before) for v in visited)
    zo.undo_walk(seeds)
    assert torch.allclose(flat(m), before, atol=1e-6)
    states = zo.perturbed_states(seeds)  # abandoned midway: restored by the walk itself
    next(states)
    next(states)
    states.close()
    assert torch.allclose(flat(m), before, atol=1e-6)


ESTIMATORS_PER_QUERY = {name: 2 if difference == "central" else 1 for name, (difference, _) in ESTIMATORS.items()}


def test_a_one_sided_estimate_is_taken_against_the_unperturbed_loss_and_needs_it():
    m = model()
    zo = estimator(m, "one-sided")
    before = flat(m).clone()
    list(zo.perturbed_states([4, 5]))
    assert zo.finish([4, 5], [1.25, 0.75], clean_loss=1.0) == pytest.approx([250.0, -250.0])
    m2 = model()
    zo2 = estimator(m2, "one-sided")
    list(zo2.perturbed_states([4, 5]))
    with pytest.raises(ValueError, match="clean_loss"):
        zo2.finish([4, 5], [1.25, 0.75])
    assert torch.allclose(flat(m2), before, atol=1e-6)  # refused: the weights are back where they started
    with pytest.raises(ValueError, match="expected 2"):
        list(zo2.perturbed_states([4, 5]))
        zo2.finish([4, 5], [1.0, 1.0, 1.0, 1.0], clean_loss=1.0)


def test_low_rank_directions_have_rank_r_and_share_their_subspace_for_its_steps():
    zo = LowRankEstimator(list(model().parameters()), eps=1e-3, lr=1.0, rank=2, subspace_steps=5)
    first, same, later = zo.draw(9, 0, 1)[0], zo.draw(9, 4, 1)[0], zo.draw(9, 5, 1)[0]
    assert first >> SUBSPACE_BITS == same >> SUBSPACE_BITS != later >> SUBSPACE_BITS

    def direction(seed):  # z(seed) of the "mid" matrix (12 x 16)
        m = model()
        w = m["mid"].weight.detach().clone()
        LowRankEstimator(list(m.parameters()), eps=1e-3, lr=1.0, rank=2).apply([(seed, 1.0)])
        return m["mid"].weight.detach() - w

    z1, z2, z3 = direction(first), direction(same), direction(later)
    rank = functools.partial(torch.linalg.matrix_rank, atol=1e-4)
    assert rank(z1) == 2 and rank(torch.cat([z1, z2])) == 2  # U varies, V (the row space) is shared
    assert rank(torch.cat([z1, z3])) == 4  # a new subspace after subspace_steps steps
    assert z1.pow(2).mean().item() == pytest.approx(1.0, rel=0.5)  # unit variance per entry, as dense z


def test_sparse_directions_touch_only_each_matrix_s_smallest_pristine_weights():
    m = model()
    params = list(m.parameters())
    masks = magnitude_masks([p.detach() if p.ndim == 2 else None for p in params], 0.75)
    zo = SparseEstimator(params, eps=1e-3, lr=1.0, masks=masks)
    before = [p.detach().clone() for p in params]
    zo.apply([(3, 1.0)])
    for p, b, mask in zip(params, before, masks):
        moved = (p.detach() != b).flatten()
        if mask is None:
            assert moved.all()  # vectors: dense
            continue
        bits = torch.from_numpy(np.unpackbits(mask, count=p.numel()).astype(bool))
        assert torch.equal(moved, bits)
        assert bits.float().mean().item() == pytest.approx(0.25, abs=0.01)
        assert b.abs().flatten()[bits].max() <= b.abs().flatten()[~bits].min()  # the smallest magnitudes
    assert zo.density() < 0.5


@pytest.mark.parametrize("name", ("low-rank", "sparse"))
def test_a_row_restricted_step_leaves_other_rows_bit_identical(name):
    m = model()
    before = m["emb"].weight.detach().clone()
    zo = estimator(m, name)
    rows = [torch.tensor([2, 5, 17]), None, None, None, None]
    list(zo.perturbed_states([1, 2], rows))
    zo.update([1, 2], [0.5, -0.2], rows=rows, restore=2)
    untouched = [r for r in range(40) if r not in (2, 5, 17)]
    assert torch.equal(m["emb"].weight.detach()[untouched], before[untouched])
    assert not torch.allclose(m["emb"].weight.detach()[[2, 5, 17]], before[[2, 5, 17]])


@pytest.mark.slow
@pytest.mark.parametrize("name", ("one-sided", "low-rank", "sparse"))
def test_estimates_approach_the_gradient_they_can_see(name):
    """The mean of g_q z_q over many directions points along the gradient (for sparse z: the gradient on
    the masked entries; for low-rank z: over directions from many subspaces), more so with more (the
    model has d = 403 values)."""
    m = model(rows=10)
    gen = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 10, (16, 5), generator=gen), torch.arange(16) % 3
    loss_of(m, ids, y).backward()
    zo = estimator(m, name, subspace_steps=1)
    visible = torch.cat(
        [
            p.grad.reshape(-1) * (1 if mk is None else torch.from_numpy(np.unpackbits(mk, count=p.numel())).float())
            for p, mk in zip(m.parameters(), zo.masks if name == "sparse" else [None] * 5)
        ]
    )
    cosines = []
    for count in (4, 64, 512):
        probe = copy.deepcopy(m)
        zo = estimator(probe, name, subspace_steps=1)
        zo.eps = 1e-4
        seeds = [s for step in range(count) for s in zo.draw(0, step, 1)]  # a new subspace per direction
        with torch.no_grad():
            clean = float(loss_of(probe, ids, y))
            losses = [float(loss_of(probe, ids, y)) for _ in zo.perturbed_states(seeds)]
        before = flat(probe).clone()
        zo.finish(seeds, losses, lr=1.0, clean_loss=clean)
        cosines.append(torch.nn.functional.cosine_similarity(before - flat(probe), visible, dim=0).item())
    assert cosines == sorted(cosines) and cosines[-1] > 0.6, cosines  # sqrt(Q / (Q + d)): 0.75 for dense z


def _store(out):
    (folder,) = out.glob("clients/*")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_a_seeds_state_replays_exactly_and_exports_the_replayed_bottom(tmp_path, name):
    """client-state = seeds: the same run twice gives the same steps; the bottom rebuilt from the state
    on disk, by hand and by hosl-export are one and the same, and it moved."""
    settings = {**SMOKE, "num-rounds": 2, "client-state": "seeds", "zo-estimator": name}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = run(make_config({**settings, "out-dir": str(tmp_path / "a")}), tmp_path / "a")
        second = run(make_config({**settings, "out-dir": str(tmp_path / "b")}), tmp_path / "b")
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in second["history"]]
    config = make_config(settings)
    kept = load_client_state(_store(tmp_path / "a"), 0, 2)
    assert kept.weights == {} and len(kept.updates) == 2 * SMOKE["local-steps"]
    by_hand, _ = make_client(config, 0, None)
    start = trainable_state(by_hand)
    replay_own(by_hand, kept.updates)
    want = trainable_state(by_hand)
    store = _store(tmp_path / "a")
    session = SessionSettings(client=0, round=3, token="t", address="a:1", local_steps=1, run_id=store.name)
    side = ClientSide(config, 0, SMOKE["num-clients"], None, NodeSettings())
    session = dataclasses.replace(session, state_dir=str(store), base=kept.session)  # its last committed session
    from_disk = trainable_state(_prepare(SessionRequest(session), side, 2).client)
    bottom, _, _, which = export.trained_split(export.read_run(tmp_path / "a"), client=0)
    exported = dict(bottom.named_parameters())
    assert which["bottom"] == "client"
    for name_, value in want.items():
        assert torch.equal(value, from_disk[name_]) and torch.equal(value, exported[name_].detach())
    assert any(not torch.equal(v, start[n]) for n, v in want.items())


class _Killed(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_a_synced_run_cut_off_after_round_1_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, name):
    settings = {**SMOKE, "num-rounds": 3, "bottoms": "synced", "zo-estimator": name}
    whole = run(make_config({**settings, "out-dir": str(tmp_path / "whole")}), tmp_path / "whole")
    save = coordinator.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(coordinator, "save_checkpoint", save_then_die)
    cut = tmp_path / "cut"
    with pytest.raises(_Killed):
        run(make_config({**settings, "out-dir": str(cut)}), cut)
    monkeypatch.setattr(coordinator, "save_checkpoint", save)
    resumed = run(make_config({**settings, "out-dir": str(cut), "resume": "true"}), cut)
    assert resumed["resumed"][0]["after_round"] == 1
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]
    assert resumed["eval"]["history"][1:] == whole["eval"]["history"][1:]
    bottoms = [
        export.trained_split(export.read_run(folder), synced=True)[0].state_dict()
        for folder in (cut, tmp_path / "whole")
    ]
    assert all(torch.equal(v, bottoms[1][k]) for k, v in bottoms[0].items())
    assert json.loads((cut / "results.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_one_sided_steps_send_q_plus_one_activations_and_score_q(tmp_path):
    """The bytes a step uploads: Q + 1 activations one-sided against 2Q + 1 two-point, at equal Q."""
    up = {}
    for name in ("two-point", "one-sided"):
        settings = {**SMOKE, "num-rounds": 1, "local-steps": 2, "zo-queries": 4, "zo-estimator": name}
        settings.update({"eval-untrained": False, "eval-swap": "none"})
        result = run(make_config({**settings, "out-dir": str(tmp_path / name)}), tmp_path / name)
        up[name] = result["rounds"][0]["bytes_up"]
    assert up["one-sided"] / up["two-point"] == pytest.approx(5 / 9, rel=0.03)


def test_bad_estimator_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="zo-estimator"):
        make_config({"zo-estimator": "three-point"})
    with pytest.raises(ValueError, match="zo-sparsity"):
        make_config({"zo-sparsity": 1.0})
    with pytest.raises(ValueError, match="zo-rank"):
        make_config({"zo-rank": 0})
    with pytest.raises(ValueError, match="masks"):
        make_estimator(list(model().parameters()), dataclasses.replace(ZOSettings(), estimator="sparse"), lr=0.1)
