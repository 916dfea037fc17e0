"""What keeps a long ZO run stable: rate schedules, a bound on each projected gradient, and
parameter groups left untrained; each deterministic per seed."""

import math

import pytest
import torch

from fl_app.client_session import ClientSide, run_session, schedule_horizon
from fl_app.config import make_config, read_scenario
from fl_app.records import SessionRequest
from fl_app.schedules import lr_factor
from fl_app.split import split_model
from fl_app.train import run
from fl_app.trainable import TrainableSpec, configure_trainable
from fl_app.zo import ZOEstimator
from tests.conftest import tiny_model

SMOKE = "sim_configs/smoke_tiny.toml"


def test_a_schedule_reaches_the_rates_it_promises_at_its_steps():
    warm = [lr_factor("constant", s, 4, 100) for s in range(6)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("linear", 4, 4, 104) == 1.0 and lr_factor("linear", 54, 4, 104) == pytest.approx(0.5)
    assert lr_factor("linear", 103, 4, 104) == pytest.approx(0.01)
    assert lr_factor("cosine", 50, 0, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 25, 0, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor("cosine", 200, 0, 100) == 0.0 and lr_factor("linear", 7, 0, 0) == 1.0  # no horizon: no decay
    with pytest.raises(ValueError, match="client-lr-schedule"):
        lr_factor("step", 0, 0, 10)


def test_a_session_applies_the_scheduled_rate_at_each_client_step(coordinators):
    config = make_config(
        {**read_scenario(SMOKE), "local-steps": 4, "client-lr-schedule": "linear", "client-lr-warmup": 2}
    )
    c = coordinators(config)
    horizon = schedule_horizon(config, 0, 4)
    assert horizon == 2 * 4  # num-rounds x steps per session
    session, message = c.open(0, 1)
    report, state = run_session(SessionRequest(message), ClientSide(config, 0, 2, None))
    base = config.optim.client_lr
    expected = [base * lr_factor("linear", s, 2, horizon) for s in range(4)]
    assert report.step_lrs == pytest.approx(expected) and expected[:2] == pytest.approx([base / 2, base])
    assert c.finish_train(session, report)
    session, message = c.open(0, 2)
    report, _ = run_session(
        SessionRequest(message), ClientSide(config, 0, 2, state)
    )  # the schedule goes on from the client's step count
    assert report.step_lrs == pytest.approx([base * lr_factor("linear", s, 2, horizon) for s in range(4, 8)])
    assert report.step_lrs[-1] == pytest.approx(base / 6)


def test_clipped_projected_gradients_are_bounded_and_applied_as_reported():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    target = torch.randn(50)
    zo = ZOEstimator([w], eps=1e-3, lr=1e-2, directions="rademacher", clip=0.5)
    before = w.detach().clone()
    grads = zo.step([11, 12, 13], lambda: float(((w - target) ** 2).sum()))
    assert all(abs(g) <= 0.5 for g in grads) and any(abs(g) == 0.5 for g in grads)
    replay = torch.nn.Parameter(before.clone())
    ZOEstimator([replay], eps=1e-3, lr=1e-2, directions="rademacher").update([11, 12, 13], grads)
    assert torch.allclose(replay, w, atol=1e-6)  # the reported (clipped) values are what moved the weights
    with pytest.raises(ValueError, match="zo-grad-clip"):
        ZOEstimator([w], eps=1e-3, lr=1e-2, clip=-1.0)


def test_stability_options_are_deterministic_per_seed(tmp_path):
    settings = {
        **read_scenario(SMOKE),
        "client-lr": 1e-2,
        "client-lr-schedule": "cosine",
        "client-lr-warmup": 2,
        "zo-grad-clip": 0.1,
        "client-freeze": "norms,biases",
        "eval-test": False,
    }
    first = run(make_config(settings), tmp_path / "a")
    second = run(make_config(settings), tmp_path / "b")
    unclipped = run(make_config({**settings, "zo-grad-clip": 0.0}), tmp_path / "c")
    losses = [[h["train_loss"] for h in r["history"]] for r in (first, second, unclipped)]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert first["eval"]["history"][-1]["drift"] == second["eval"]["history"][-1]["drift"]


def test_freezing_groups_leaves_only_the_layers_matrices_trainable():
    bottom, _ = split_model(tiny_model("bert"), 2)
    everything = configure_trainable(bottom, TrainableSpec(mode="full"), "bert")
    matrices = configure_trainable(bottom, TrainableSpec(mode="full", freeze=("embeddings", "norms", "biases")), "bert")
    named = {id(p): n for n, p in bottom.named_parameters()}
    assert matrices and len(matrices) < len(everything)
    assert all(p.ndim == 2 and "embeddings" not in named[id(p)] for p in matrices)
    assert all(p.requires_grad == (p.ndim == 2 and "embeddings" not in named[id(p)]) for p in everything)
    with pytest.raises(ValueError, match="client-freeze"):
        TrainableSpec(freeze=("heads",))
    with pytest.raises(ValueError, match="client-freeze"):
        make_config({"client-freeze": "norms,heads"})


def test_freezing_embeddings_and_matrices_leaves_the_norms_and_biases_as_bitfit_does():
    bottom, _ = split_model(tiny_model("bert"), 2)
    everything = configure_trainable(bottom, TrainableSpec(mode="full"), "bert")
    bitfit = configure_trainable(bottom, TrainableSpec(mode="full", freeze=("embeddings", "matrices")), "bert")
    named = {id(p): n for n, p in bottom.named_parameters()}
    assert bitfit and all(p.ndim == 1 for p in bitfit)
    assert {id(p) for p in bitfit} == {id(p) for p in everything if p.ndim == 1}  # the embeddings' norm too
    assert any(named[id(p)].endswith("bias") for p in bitfit) and any("LayerNorm" in named[id(p)] for p in bitfit)
    with pytest.raises(ValueError, match="client-freeze.*nothing to train"):
        make_config({"client-freeze": "embeddings,norms,biases,matrices"})


def test_freezing_matrices_keeps_lora_adapters_trainable():
    bottom, _ = split_model(tiny_model("bert"), 2)
    lora = TrainableSpec(mode="lora", lora_r=2, lora_alpha=2)
    adapters = configure_trainable(bottom, lora, "bert", lora_seed=0)
    bottom, _ = split_model(tiny_model("bert"), 2)
    spec = TrainableSpec(mode="lora", lora_r=2, lora_alpha=2, freeze=("matrices",))
    frozen = configure_trainable(bottom, spec, "bert", lora_seed=0)
    assert adapters and [p.shape for p in frozen] == [p.shape for p in adapters]
