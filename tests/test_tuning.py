"""AUTOMATA in the split federation: server-side proxies, gradient-matched client subsets, weighted
steps, and an Optuna study over the live (Flower-free) federation."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from fl_app import rounds
from fl_app.batches import SubsetStream, fixed_batches, step_weights
from fl_app.client_session import ClientSide, run_session
from fl_app.config import make_config, read_scenario
from fl_app.protocol import PerturbedPart, ProtocolError, SelectRequest, StepReply, StepRequest
from fl_app.records import SessionRequest
from fl_app.scenario import build_client, build_server, load_split, load_task_data
from fl_app.split import split_model
from fl_app.subset import Subset, round_plan
from fl_app.train import InProcessFederation
from fl_app.tuning import parse_space
from tests.conftest import tiny_model


def config(**over):
    return make_config(
        {
            **read_scenario("sim_configs/smoke_tiny.toml"),
            "num-clients": 2,
            "n-train": 128,
            "local-epochs": 1.0,
            "subset-fraction": 0.25,
            "step-timeout": 30.0,
            **over,
        }
    )


@pytest.fixture
def coord(coordinators):
    return lambda **over: coordinators(config(**over))


def test_round_plan_schedules_warm_start_selection_and_reuse():
    plans = [round_plan("gradmatch", r, 2, 1) for r in range(1, 7)]
    assert plans == ["warm", "gradmatch", "keep", "gradmatch", "keep", "gradmatch"]
    assert [round_plan("gradmatch", r, 1, 0) for r in (1, 2)] == ["random", "gradmatch"]  # first subset is random
    assert [round_plan("gradmatch-pc", r, 1, 0) for r in (1, 2)] == ["random", "gradmatch-pc"]
    assert [round_plan("random", r, 3, 0) for r in (1, 2, 4)] == ["random", "keep", "random"]
    assert round_plan("full", 5, 1, 2) == "full"
    with pytest.raises(ValueError, match="subset-selector"):
        round_plan("craig", 1, 1, 0)


def test_subset_stream_visits_each_selected_batch_once_per_pass_with_mean_weight_one():
    batches = fixed_batches(50, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(50)) and len(batches) == 7
    subset = Subset([1, 4, 6], [2.0, 1.0, 3.0])
    stream = SubsetStream(batches, subset, seed=5)
    first_pass = [stream.weighted_indices(s) for s in range(3)]
    assert sorted(tuple(b) for b, _ in first_pass) == sorted(tuple(batches[i]) for i in (1, 4, 6))
    assert sum(w for _, w in first_pass) == pytest.approx(3.0)
    assert step_weights(subset) == pytest.approx([1.0, 0.5, 1.5])
    assert [stream.weighted_indices(s) for s in range(3)] == first_pass  # a pure function of the step
    with pytest.raises(ValueError, match="subset-ids"):
        SubsetStream(batches, Subset([9], [1.0]), seed=0)


def test_server_proxy_is_the_classifier_gradient_for_an_encoder():
    """The proxy the server computes from a client's activations equals autograd's gradient of the
    mean cross-entropy w.r.t. the classifier's weight and bias, split by class: class c's part is
    the gradient of the batch's class-c loss terms (over the batch size)."""
    bottom, top = split_model(tiny_model("bert"), 2)
    server = build_server(make_config({"model": "tiny-bert", "mode": "hosl"}), top, 3)
    gen = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(3, 100, (4, 9), generator=gen), torch.ones(4, 9, dtype=torch.long)
    labels = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        hidden = bottom(ids, mask)
    req = StepRequest("proxy", hidden, mask, labels, meta={"batch": 0})
    server.handle(req, key="s")
    head = top.model.classifier
    top.zero_grad()
    torch.nn.functional.cross_entropy(top(hidden, mask), labels).backward()
    expected = torch.cat([head.weight.grad, head.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
    parts = server.proxies["s"][0]
    assert parts.shape[0] == 3 and torch.allclose(parts.sum(0), expected, atol=1e-6)
    top.zero_grad()
    terms = torch.nn.functional.cross_entropy(top(hidden, mask), labels, reduction="none")
    (terms[labels == 2].sum() / len(labels)).backward()
    expected = torch.cat([head.weight.grad, head.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
    assert torch.allclose(parts[2], expected, atol=1e-6)


def test_server_selects_from_a_sessions_proxies_and_rejects_incomplete_sets():
    loaded, bottom, top = load_split(config())
    server = build_server(config(), top, 2)
    data = load_task_data(config(), loaded)
    batches = [data.encoder(data.splits["train"][i : i + 8]) for i in range(0, 48, 8)]

    def send_proxies(count: int) -> None:
        with torch.no_grad():
            for index, batch in enumerate(batches[:count]):
                hidden = bottom(batch["input_ids"], batch["attention_mask"])
                request = StepRequest(
                    "proxy",
                    hidden,
                    batch["attention_mask"],
                    batch["labels"],
                    score_ids=batch["score_ids"],
                    meta={"batch": index},
                )
                server.handle_bytes(request.to_bytes(), "s")

    send_proxies(5)
    with pytest.raises(ProtocolError, match="is 6, but proxies arrived for 5 batches"):
        server.handle_bytes(SelectRequest(budget=2, num_batches=6, seed=0).to_bytes(), "s")
    assert "s" not in server.proxies  # a failed selection forgets the session's proxies
    send_proxies(len(batches))
    reply = StepReply.from_bytes(server.handle_bytes(SelectRequest(budget=2, num_batches=6, seed=0).to_bytes(), "s"))
    assert 1 <= len(reply.batch_ids) <= 2 and (reply.batch_weights > 0).all()
    quality = server.selections[-1]
    assert quality["batches"] == 6 and quality["selected"] == len(reply.batch_ids)
    assert 0 <= quality["gradmatch_error"] < quality["random_error"]
    with pytest.raises(ProtocolError, match="budget"):
        server.handle_bytes(SelectRequest(budget=7, num_batches=6, seed=0).to_bytes(), "s")


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), 1e9, "2"])
def test_bad_step_weight_is_rejected_naming_the_field(weight):
    loaded, bottom, top = load_split(config())
    server = build_server(config(), top, 2)
    hidden = torch.zeros(2, 5, top.hidden_size)
    req = StepRequest(
        "frozen",
        hidden,
        torch.ones(2, 5, dtype=torch.long),
        torch.tensor([0, 1]),
        score_ids=torch.tensor([[5, 6], [5, 6]]),
        meta={"weight": weight},
    )
    with pytest.raises(ProtocolError, match="field 'weight'"):
        server.handle(req)


@pytest.mark.parametrize("mode", ["hosl", "zo-zo"])
@pytest.mark.parametrize("double", [2.0, (2.0, 2.0)], ids=["batch weight", "class weights"])
def test_step_weight_scales_both_sides_updates(double, mode):
    """A step of weight 2 moves the server (FO with SGD, or ZO) and the ZO client exactly twice as far
    as weight 1; so do class weights of 2 for every class (the streamed perturbed losses carry them,
    and a ZO server weighs every perturbed loss it computes by them)."""
    from fl_app.local_transport import InProcessLink

    cfg = config(**{"server-optimizer": "sgd", "mode": mode})
    moves = {}
    for weight in (1.0, double):
        loaded, bottom, top = load_split(cfg)
        data = load_task_data(cfg, loaded)
        server, client = build_server(cfg, top, 2), build_client(cfg, bottom, 0)
        s0 = [p.detach().clone() for p in server.params]
        c0 = [p.detach().clone() for p in client.params]
        stats = client.train_step(data.encoder(data.splits["train"][:8]), InProcessLink(server.handle_bytes), weight)
        moves[weight] = (
            [p.detach() - b for p, b in zip(server.params, s0)],
            [p.detach() - b for p, b in zip(client.params, c0)],
            stats.projected_grads,
        )
    for side in (0, 1):
        for one, two in zip(moves[1.0][side], moves[double][side]):
            assert torch.allclose(two, 2 * one, atol=1e-6, rtol=1e-4)
    # (l+ - l-) / 2 eps of losses weighted on the server: float32 rounding, amplified by 1 / eps
    assert moves[double][2] == pytest.approx([2 * g for g in moves[1.0][2]], rel=1e-4)


def _frozen_request(top, meta: dict, kind: str = "frozen") -> StepRequest:
    gen = torch.Generator().manual_seed(1)
    return StepRequest(
        kind,
        torch.randn(3, 5, top.hidden_size, generator=gen),
        torch.ones(3, 5, dtype=torch.long),
        torch.tensor([0, 1, 1]),
        score_ids=torch.tensor([[5, 6]] * 3),
        meta=meta,
    )


def test_class_weights_weigh_each_examples_loss_by_its_label():
    def fresh():
        return build_server(config(), load_split(config())[2], 2)  # the same starting top each time

    server, req = fresh(), _frozen_request(fresh().top, {})
    with torch.no_grad():
        terms = torch.nn.functional.cross_entropy(server._scores(req.clean, req), req.labels, reduction="none")
    plain = fresh().handle(_frozen_request(server.top, {}))
    weighted = fresh().handle(_frozen_request(server.top, {"class_weights": [1.0, 3.0]}))
    assert plain.clean_loss == pytest.approx(float(terms.mean()), rel=1e-5)
    assert weighted.clean_loss == pytest.approx(float((torch.tensor([1.0, 3.0, 3.0]) * terms).mean()), rel=1e-5)


@pytest.mark.parametrize("weights", [[-1.0, 1.0], [1.0], [1.0, 0.0, 1.0], [0.0, 0.0], ["1", 1.0], "x", [1e9, 1.0]])
def test_bad_class_weights_are_rejected_naming_the_field(weights):
    loaded, bottom, top = load_split(config())
    server = build_server(config(), top, 2)
    with pytest.raises(ProtocolError, match="field 'class_weights'"):
        server.handle(_frozen_request(top, {"class_weights": weights}))


def test_step_whose_class_weights_differ_from_its_streamed_parts_is_refused():
    loaded, bottom, top = load_split(config())
    server = build_server(config(), top, 2)
    req = _frozen_request(top, {"class_weights": [1.0, 1.0]}, kind="zo")
    part = PerturbedPart(
        torch.stack([req.clean, req.clean]), dict(req.meta), req.attention_mask, req.labels, req.score_ids
    )
    assert server.handle_bytes(part.to_bytes(), "s") is None  # scored as it came
    with pytest.raises(ProtocolError, match="field 'class_weights' of the step differs"):
        server.handle_bytes(_frozen_request(top, {"class_weights": [1.0, 2.0]}, kind="zo").to_bytes(), "s")


@pytest.mark.parametrize("selector", ["gradmatch", "gradmatch-pc"])
def test_gradmatch_session_selects_through_the_server_then_keeps_its_subset(coord, selector):
    c = coord(**{"subset-selector": selector})
    session, message = c.open(0, 1, subset=selector)
    report, state = run_session(SessionRequest(message), ClientSide(c.config, 0, 2, None))
    assert c.finish_train(session, report)
    budget = math.ceil(0.25 * 64 / 8)  # 64 examples per client, batch 8
    assert 1 <= report.subset_batches <= budget and report.steps == report.subset_batches
    assert report.selection_bytes_up > 0 and report.selection_bytes_down > 0 and report.selection_seconds > 0
    assert report.bytes_up > report.selection_bytes_up  # selection cost is inside the session's totals
    assert state.subset_ids and not c.server.proxies
    if selector == "gradmatch":
        assert min(state.subset_weights) > 0 and len(state.subset_weights) == len(state.subset_ids)
    else:  # a weight per batch and class (2 classes), some class of every batch weighted
        weights = torch.tensor(state.subset_weights).reshape(len(state.subset_ids), 2)
        assert (weights >= 0).all() and (weights.sum(1) > 0).all()
    session, message = c.open(0, 2, subset="keep")
    report2, state2 = run_session(SessionRequest(message), ClientSide(c.config, 0, 2, state))
    assert c.finish_train(session, report2)
    assert state2.subset_ids == state.subset_ids and report2.selection_bytes_up == 0
    assert state2.steps == state.steps + len(state.subset_ids)
    session, message = c.open(0, 3, subset="full")
    report3, _ = run_session(SessionRequest(message), ClientSide(c.config, 0, 2, state2))
    assert report3.steps == 8 and report3.subset_batches == 0  # one pass over all 8 batches
    c.finish_train(session, report3)


def test_state_of_another_trial_is_dropped(coord, train_report):
    c = coord()
    session, message = c.open(0, 1, subset="full")
    _, state = run_session(SessionRequest(message), ClientSide(c.config, 0, 2, None))
    c.finish_train(session, train_report(queries=c.config.zo.queries))
    session, message = c.open(0, 2, subset="warm", trial=5)
    report, fresh = run_session(SessionRequest(message), ClientSide(c.config, 0, 2, state))
    c.finish_train(session, report)
    assert fresh.trial == 5 and fresh.steps == report.steps == 2  # restarted: 2 warm steps (budget), not 8 + 2


def test_client_without_a_subset_chooses_one_in_a_keep_round(coord):
    """With fraction-train < 1 a client may first take part in a round where the others keep theirs."""
    c = coord(**{"subset-selector": "random"})
    session, message = c.open(1, 2, subset="keep")
    report, state = run_session(SessionRequest(message), ClientSide(c.config, 1, 2, None))
    c.finish_train(session, report)
    assert report.subset_plan == "random" and len(state.subset_ids) == report.subset_batches == 2
    c = coord()
    session, message = c.open(1, 2, subset="keep")
    with pytest.raises(ValueError, match="subset-selector is 'full'"):
        try:
            run_session(SessionRequest(message), ClientSide(c.config, 1, 2, None))
        finally:
            c.finish_train(session, None, "test")


def test_tune_space_parsing_and_errors():
    space = parse_space("client-lr=log:1e-5:1e-3 zo-queries=int:2:8 lora-r=choice:4|8")
    assert [(p.key, p.kind) for p in space] == [("client-lr", "log"), ("zo-queries", "int"), ("lora-r", "choice")]
    assert space[2].choices == (4, 8)
    for bad, match in [
        ("nope=log:1:2", "not a tunable"),
        ("client-lr=log:0:1", "LOW > 0"),
        ("client-lr=cube:1:2", "cannot parse"),
        ("", "empty"),
        ("lora-r=choice:4|x", "lora-r"),
        ("client-lr=log:1e-3:1e-5", "LOW < HIGH"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_space(bad)


def test_config_rejects_subsets_without_epochs_or_full_warm_start():
    with pytest.raises(ValueError, match="local-epochs"):
        make_config({"subset-selector": "gradmatch"})
    with pytest.raises(ValueError, match="subset-warm-start"):
        make_config({"subset-warm-start": 1.0})


@pytest.mark.slow
def test_local_runner_tunes_on_subsets_then_trains_the_best_on_full_data(tmp_path):
    """The local runner drives the same loop as flwr run: the study, gradmatch subsets, the final run."""
    from fl_app.train import run

    results = run(make_config(read_scenario("sim_configs/tune_tiny.toml")), tmp_path)
    tuning = results["tuning"]
    assert len(tuning["trials"]) == 3 and tuning["best"] is not None
    assert any(r["plan"] == "gradmatch" and r["selection_bytes"] > 0 for t in tuning["trials"] for r in t["rounds"])
    assert [r["steps"] for r in results["rounds"]] == [16, 16]  # the best config on full data: 2 clients x 8 batches
    assert tuning["final"]["params"] == tuning["best"]["params"] and results["eval"]["test"]["count"] == 32
    assert Path(tuning["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_study_over_the_federation_records_trials_prunes_and_plots(coord, tmp_path):
    """A real study: each trial resets the federation, trains 2 clients on gradmatch subsets for 3
    rounds and reports dev accuracy; diverging learning rates are in range so some trials do badly."""
    c = coord(
        **{
            "tune-trials": 6,
            "tune-rounds": 3,
            "tune-pruner": "asha",
            "subset-selector": "gradmatch",
            "subset-warm-start": 0.34,
            "tune-space": "server-lr=log:1e-4:3 client-lr=log:1e-5:1e-2",
        }
    )
    starting = [p.detach().clone() for p in c.server.params]
    summary = rounds.tune(InProcessFederation(c, 2), c, itertools.count(1))
    c.reset(7, {})  # every trial started like this: the pristine top
    assert all(torch.equal(a, b) for a, b in zip(starting, c.server.params))
    trials = summary["trials"]
    assert len(trials) == 6 and {t["state"] for t in trials} <= {"complete", "pruned", "failed"}
    assert summary["pruned"] >= 1 and any(t["state"] == "complete" for t in trials)
    assert all("no client finished" in t["error"] for t in trials if t["state"] == "failed")  # diverged: dropped
    for t in trials:
        assert set(t["params"]) == {"server-lr", "client-lr"} and t["seconds"] > 0
        assert [r["plan"] for r in t["rounds"]] == ["warm", "gradmatch", "gradmatch"][: len(t["rounds"])]
        if t["state"] == "complete":
            assert len(t["rounds"]) == 3
    assert summary["best"]["accuracy"] == max(t["accuracy"] for t in trials if t["state"] == "complete")
    assert any(r["selection_bytes"] > 0 for t in trials for r in t["rounds"])
    qualities = [q for t in trials for r in t["rounds"] if r["plan"] == "gradmatch" for q in r["selection_quality"]]
    assert qualities and all(q["gradmatch_error"] >= 0 and q["random_error"] > 0 for q in qualities)
    assert Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_proxies_of_a_diverged_top_are_refused_not_selected_on():
    loaded, bottom, top = load_split(config())
    server = build_server(config(), top, 2)
    req = _frozen_request(server.top, {"batch": 0}, kind="proxy")
    server.handle(req, key="s")
    assert torch.isfinite(server.proxies["s"][0]).all()
    with torch.no_grad():
        server.params[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="proxies are not finite"):
        server.handle(_frozen_request(server.top, {"batch": 1}, kind="proxy"), key="s")
    assert 1 not in server.proxies["s"]
