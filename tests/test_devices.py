"""server-device / client-device: names checked, resolved on this machine, the model and its ZO
directions placed there, and activations crossing the stream as CPU tensors.

The tests taking ``device`` run once on the CPU and once on the first accelerator torch sees
(CUDA or MPS); without one, that run is skipped with a reason pytest's summary prints.
"""

import json

import pytest
import torch

from fl_app.batches import BatchStream
from fl_app.config import make_config, read_scenario
from fl_app.devices import accelerators, resolve_device
from fl_app.local_transport import InProcessLink
from fl_app.protocol import StepReply, StepRequest, decode_frame
from fl_app.scenario import build_client, build_server, load_split, load_task_data
from fl_app.train import run
from fl_app.zo import ZOEstimator, direction_chunk

SMOKE = "sim_configs/smoke_tiny.toml"
NO_ACCELERATOR = "no CUDA or MPS device on this machine: the accelerator path did not run here"


@pytest.fixture(params=["cpu", "accelerator"])
def device(request) -> torch.device:
    if request.param == "cpu":
        return torch.device("cpu")
    found = accelerators()
    if not found:
        pytest.skip(NO_ACCELERATOR)
    return found[0]


@pytest.mark.parametrize("key", ["server-device", "client-device"])
@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU", "tpu", ""])
def test_bad_device_names_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}'.*{value!r}"):
        make_config({key: value})


def test_devices_not_on_this_machine_are_refused_naming_the_key():
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for value, present in [("cuda", cuda > 0), (f"cuda:{cuda}", False), ("mps", torch.backends.mps.is_available())]:
        if present:
            assert resolve_device("server-device", value).type == value.split(":")[0]
        else:
            with pytest.raises(ValueError, match=f"config key 'server-device' = '{value}'"):
                resolve_device("server-device", value)


def test_auto_takes_the_first_accelerator_else_the_cpu():
    found = accelerators()
    expected = found[0].type if found else "cpu"
    assert resolve_device("client-device", "auto").type == expected
    assert resolve_device("client-device", "cpu") == torch.device("cpu")


def test_synced_zo_clients_draw_their_directions_on_the_cpu(device):
    """Synced bottoms replay each other's (seed, projected gradient) updates: z is drawn on the CPU
    (a CUDA draw depends on the GPU model), so a replay on any device applies the same update."""
    _, synced, _, _ = _parties(device, bottoms="synced")
    _, personal, _, _ = _parties(device)
    assert synced.zo.device.type == personal.zo.device.type == device.type
    assert synced.zo.draw_on.type == "cpu" and personal.zo.draw_on.type == device.type
    weights = torch.randn(300, 16)
    on_device = torch.nn.Parameter(weights.clone().to(device))
    on_cpu = torch.nn.Parameter(weights.clone())
    for param, draw_on in ((on_device, torch.device("cpu")), (on_cpu, None)):
        ZOEstimator([param], 1e-3, 0.1, directions="gaussian", draw_on=draw_on).update([5, 6], [0.3, -1.2])
    torch.testing.assert_close(on_device.detach().cpu(), on_cpu.detach(), atol=1e-6, rtol=0)
    assert not torch.equal(on_cpu.detach(), weights)


def test_a_run_resumes_on_another_device(tmp_path):
    from fl_app.preflight import check_out_dir

    saved = make_config({**read_scenario(SMOKE), "server-device": "cuda", "client-device": "mps"})
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "results.json").write_text(json.dumps({"config": dict(saved), "status": "running"}))
    resumed = saved.updated({"server-device": "cpu", "client-device": "cpu", "resume": "true", "out-dir": "x"})
    check_out_dir(tmp_path, resume=resumed)
    with pytest.raises(ValueError, match="other settings.*zo-eps"):
        check_out_dir(tmp_path, resume=resumed.updated({"zo-eps": 0.5}))


def test_directions_are_drawn_on_the_device_and_repeat(device):
    for kind in ("gaussian", "rademacher"):
        z = direction_chunk(kind, 7, 3, 10_000, device)
        assert z.device.type == device.type and z.dtype == torch.float32
        assert torch.equal(z, direction_chunk(kind, 7, 3, 10_000, device))
        assert not torch.equal(z, direction_chunk(kind, 8, 3, 10_000, device))
        if kind == "rademacher":
            assert set(z.unique().tolist()) == {0.0, 1.0}
        else:
            assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_zo_walk_on_the_device_restores_and_updates_only_selected_rows(device):
    torch.manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(50, 8, device=device))
    dense = torch.nn.Parameter(torch.randn(8, 8, device=device))
    zo = ZOEstimator([emb, dense], eps=1e-3, lr=0.1, directions="rademacher")
    assert zo.device.type == device.type
    before = [emb.detach().clone(), dense.detach().clone()]
    rows = [torch.tensor([2, 5, 9]), None]  # row ids arrive on the CPU (from the batch's token ids)
    losses = zo.walk([11, 12], lambda: float(emb.detach().sum() + dense.detach().sum()), rows)
    assert len(losses) == 4
    zo.perturb(12, +1.0, rows)  # the walk leaves theta at theta - eps z_Q
    for p, b in zip([emb, dense], before):
        torch.testing.assert_close(p.detach(), b, atol=1e-6, rtol=0)
    zo.update([11], [1.0], rows=rows)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[[2, 5, 9]] = False
    assert torch.equal(emb.detach()[untouched.to(device)], before[0][untouched.to(device)])
    assert not torch.equal(emb.detach()[2], before[0][2])


def test_a_zo_estimator_refuses_parameters_on_several_devices():
    found = accelerators()
    if not found:
        pytest.skip(NO_ACCELERATOR)
    with pytest.raises(ValueError, match="several devices"):
        ZOEstimator([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device=found[0]))], 1e-3, 1)


def test_frames_leave_the_device_and_arrive_where_the_server_runs(device):
    request = StepRequest(
        kind="eval",
        clean=torch.randn(2, 3, 4, device=device),
        attention_mask=torch.ones(2, 3, dtype=torch.int64, device=device),
        labels=torch.tensor([0, 1], device=device),
    )
    decoded = decode_frame(request.to_bytes())
    assert {t.device.type for t in decoded._tensors().values()} == {"cpu"}
    torch.testing.assert_close(decoded.clean, request.clean.cpu())
    moved = decoded.to(device)
    assert {t.device.type for t in moved._tensors().values()} == {device.type}
    reply = StepReply(clean_loss=0.5, perturbed_losses=torch.ones(4, device=device), grad=torch.ones(2, device=device))
    back = StepReply.from_bytes(reply.to_bytes())
    assert back.grad.device.type == "cpu" and back.perturbed_losses.tolist() == [1.0] * 4


def _parties(device: torch.device, client_on_cpu: bool = False, **over):
    name = "cpu" if device.type == "cpu" else str(device)
    placement = {"server-device": name, "client-device": "cpu" if client_on_cpu else name}
    config = make_config({**read_scenario(SMOKE), "num-clients": 1, **placement, **over})
    loaded, bottom, top = load_split(config)
    data = load_task_data(config, loaded)
    return config, build_client(config, bottom, 0), build_server(config, top, data.task.num_classes), data


MODES = {
    "hosl": {"mode": "hosl"},
    "hosl-gaussian-gradient": {"mode": "hosl", "zo-directions": "gaussian", "hosl-feedback": "gradient"},
    "fo-fo": {"mode": "fo-fo", "client-lr": 0.05},
    "zo-zo": {"mode": "zo-zo", "server-lr": 1e-2},
}


@pytest.mark.parametrize("client_on_cpu", [False, True], ids=["both-on-device", "edge-client-on-cpu"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_mode_trains_with_its_sides_on_their_devices(device, mode, client_on_cpu):
    """Weights, optimiser state and forwards on each side's device; every frame CPU tensors; the loss falls."""
    config, client, server, data = _parties(device, client_on_cpu, **{"server-optimizer": "adam", **MODES[mode]})
    assert {p.device.type for p in server.top.parameters()} == {device.type}
    assert {p.device.type for p in client.bottom.parameters()} == {"cpu" if client_on_cpu else device.type}
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    link = InProcessLink(server.handle_bytes, record=True)
    losses = [client.train_step(batch, link).loss for _ in range(25)]
    link.close()
    assert losses[-1] < losses[0] - 0.05, losses
    for frame in link.frames:
        decoded = decode_frame(frame)
        assert {t.device.type for t in getattr(decoded, "_tensors", dict)().values()} <= {"cpu"}
    if server.optimizer is not None:
        state = [v for s in server.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
        assert state and {v.device.type for v in state} == {device.type}


def test_the_server_scores_on_the_device_as_on_the_cpu(device):
    """The same activations scored by a top on the device and on the CPU: the same losses."""
    _, client, on_device, data = _parties(device)
    _, _, on_cpu, _ = _parties(torch.device("cpu"))
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    with torch.no_grad():
        hidden = client._forward(batch).cpu()
    request = client._request("eval", hidden, batch)
    perturbed = torch.stack([hidden, hidden * 1.01])
    torch.testing.assert_close(
        on_device.score_perturbed(request, perturbed).cpu(),
        on_cpu.score_perturbed(request, perturbed),
        atol=1e-4,
        rtol=0,
    )


def test_a_run_records_its_devices_and_its_checkpoint_loads_on_the_cpu(device, tmp_path):
    name = "cpu" if device.type == "cpu" else str(device)
    overrides = {"num-rounds": 1, "local-steps": 2, "out-dir": str(tmp_path), "server-device": name}
    overrides["server-optimizer"] = "adam"
    run(make_config({**read_scenario(SMOKE), **overrides, "client-device": name}), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["devices"]["server"].startswith(device.type)
    assert results["devices"]["clients"] and {d.split(":")[0] for d in results["devices"]["clients"]} == {device.type}
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no map_location: saved from the CPU
    assert saved["server"] and {t.device.type for t in saved["server"].values()} == {"cpu"}
    moments = [v for s in saved["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert moments and {t.device.type for t in moments} == {"cpu"}
