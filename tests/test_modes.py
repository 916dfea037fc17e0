"""Each training mode lowers the loss; the runner writes the promised results; accounting is real."""

import copy
import json
import threading

import pytest
import torch

from fl_app.batches import BatchStream
from fl_app.checkpoint import run_folder
from fl_app.config import make_config, read_scenario
from fl_app.local_transport import InProcessLink
from fl_app.metrics import track_peak_memory
from fl_app.scenario import build_client, build_server, load_split, load_task_data
from fl_app.train import run

SMOKE = "sim_configs/smoke_tiny.toml"


def parties(**over):
    config = make_config({**read_scenario(SMOKE), "num-clients": 1, **over})
    loaded, bottom, top = load_split(config)
    data = load_task_data(config, loaded)
    server = build_server(config, top, data.task.num_classes)
    client = build_client(config, bottom, 0)
    return config, client, server, data


def loss_drop(steps=25, **over):
    """Train on one fixed batch; return (first clean loss, last clean loss)."""
    config, client, server, data = parties(**over)
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    link = InProcessLink(server.handle_bytes)
    losses = [client.train_step(batch, link).loss for _ in range(steps)]
    link.close()
    return losses[0], losses[-1]


@pytest.mark.parametrize(
    "mode, over",
    [
        ("hosl", {}),
        ("fo-fo", {"client-lr": 0.05}),
        ("zo-zo", {"server-lr": 1e-2}),
    ],
)
def test_each_mode_lowers_training_loss(mode, over):
    first, last = loss_drop(mode=mode, **over)
    assert last < first - 0.05, (first, last)


@pytest.mark.parametrize("mode, lr", [("hosl", 1e-2), ("fo-fo", 0.5)])
def test_client_side_alone_lowers_loss(mode, lr):
    """With the server frozen, any progress comes from the client's own (ZO or FO) updates."""
    first, last = loss_drop(steps=30, mode=mode, **{"server-params": "frozen", "client-lr": lr, "zo-queries": 4})
    assert last < first - 0.02, (first, last)


def test_server_zo_alone_lowers_loss():
    first, last = loss_drop(mode="zo-zo", **{"client-params": "frozen", "server-lr": 1e-2, "zo-queries": 4})
    assert last < first - 0.05, (first, last)


def test_runner_writes_results_and_is_deterministic(tmp_path):
    config = make_config({**read_scenario(SMOKE), "num-rounds": 2, "local-steps": 2})
    first = run(config, tmp_path / "a")
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    assert on_disk["mode"] == "hosl" and on_disk["config"]["cut-layer"] == 2
    assert len(on_disk["history"]) == 2 * 2 * 2 and all("train_loss" in h for h in on_disk["history"])
    assert [h["round"] for h in on_disk["eval"]["history"]] == [0, 1, 2]
    assert 0 <= on_disk["eval"]["accuracy"] <= 1 and on_disk["eval"]["test"]["count"] == 32
    assert on_disk["client"]["peak_memory_bytes"] > 0
    assert on_disk["comm"]["bytes_up"] > on_disk["comm"]["bytes_down"] > 0
    assert on_disk["status"] == "finished" and [r["clients"] for r in on_disk["rounds"]] == [[0, 1], [0, 1]]
    assert on_disk["parameters"]["client"]["trainable"] > 0 and on_disk["parameters"]["server"]["trainable"] > 0
    assert (tmp_path / "a" / "results.png").read_bytes()[:4] == b"\x89PNG" and (
        tmp_path / "a" / "checkpoint.pt"
    ).exists()
    second = run(config, tmp_path / "b")
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in second["history"]]


def test_each_run_gets_its_own_folder_unless_one_is_given(tmp_path):
    config = make_config(read_scenario(SMOKE))
    first, second = run_folder("", config, tmp_path), None
    first.mkdir(parents=True)
    second = run_folder("", config, tmp_path)
    assert first != second and first.parent == second.parent == tmp_path.resolve()
    assert first.name.endswith("-hosl-sst2") and not second.exists()
    assert run_folder(str(tmp_path / "mine"), config) == (tmp_path / "mine").resolve()


def test_bytes_per_step_are_the_payload_sizes():
    config, client, server, data = parties(**{"zo-queries": 3})
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    link = InProcessLink(server.handle_bytes, record=True)
    stats = client.train_step(batch, link)
    rows, seq = batch["input_ids"].shape
    activation = rows * seq * 32 * 4
    assert len(link.frames) == 2 * 3 + 1  # one frame per perturbed activation, then the clean step
    head = sum(batch[k].numel() * batch[k].element_size() for k in ("attention_mask", "labels", "score_ids"))
    assert activation + head < len(link.frames[0]) < activation + head + 1024  # the first part names the batch
    assert all(activation < len(f) < activation + 1024 for f in link.frames[1:-1])
    assert stats.bytes_up == sum(map(len, link.frames)) == link.bytes_up
    assert 7 * activation + head < stats.bytes_up < 7 * activation + head + 8192
    assert stats.bytes_down == link.bytes_down < 1024  # 2Q losses and a scalar


def test_half_precision_wire_halves_upload_with_small_loss_error():
    losses = {}
    for dtype in ("float32", "float16"):
        config, client, server, data = parties(**{"wire-dtype": dtype})
        batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
        link = InProcessLink(server.handle_bytes)
        stats = client.train_step(batch, link)
        losses[dtype] = (stats.loss, stats.bytes_up)
    assert abs(losses["float16"][0] - losses["float32"][0]) < 1e-3
    assert losses["float16"][1] < 0.55 * losses["float32"][1]


def test_peak_memory_counts_own_thread_only():
    def allocate():
        return torch.ones(2**20)  # 4 MiB

    with track_peak_memory() as own:
        x = allocate()
    holder = []
    with track_peak_memory() as other:
        thread = threading.Thread(target=lambda: holder.append(allocate()))
        thread.start()
        thread.join()
    assert own.transient_bytes >= 4 * 2**20 and x.numel() == 2**20
    assert other.transient_bytes < 2**20


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="mode"):
        make_config({"mode": "fo-zo"})
    with pytest.raises(ValueError, match="unknown config key 'cut_layer' \\(value 2\\): did you mean 'cut-layer'\\?"):
        make_config({"cut_layer": 2})
    with pytest.raises(ValueError, match="zo-eps"):
        make_config({"zo-eps": "-1"})


def test_flower_run_config_declares_exactly_the_config_keys_with_their_defaults():
    """flwr rejects run-config keys missing from pyproject.toml, so every key must be declared there."""
    from pathlib import Path

    from fl_app.config import DEFAULTS, tomllib  # tomli on Python 3.10

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert declared == DEFAULTS


def test_server_trains_even_when_called_under_no_grad():
    """A ZO client runs under no_grad; a server called on the same thread must still backprop."""
    config, client, server, data = parties()
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    before = [p.detach().clone() for p in server.params]
    client.train_step(
        batch, InProcessLink(server.handle_bytes, threaded=False)
    )  # same thread, inside the client's no_grad
    assert any(not torch.equal(a, p) for a, p in zip(before, server.params))


def test_streamed_parts_are_validated_and_bounded():
    from fl_app.protocol import PerturbedPart, ProtocolError, StepRequest

    _, client, server, data = parties()
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    rows, seq = batch["input_ids"].shape
    head = {"attention_mask": batch["attention_mask"], "labels": batch["labels"], "score_ids": batch["score_ids"]}
    with pytest.raises(ProtocolError, match="perturbed"):
        server.handle_bytes(PerturbedPart(torch.zeros(1, rows, seq, 31), {"client": "x"}, **head).to_bytes())
    with pytest.raises(ProtocolError, match="NaN"):
        server.handle_bytes(
            PerturbedPart(torch.full((1, rows, seq, 32), float("nan")), {"client": "x"}, **head).to_bytes()
        )
    with pytest.raises(ProtocolError, match="labels"):  # a step's first part names its batch
        server.handle_bytes(PerturbedPart(torch.zeros(1, rows, seq, 32), {"client": "w"}).to_bytes())
    with pytest.raises(ProtocolError, match="labels"):
        bad = {**head, "labels": torch.full_like(batch["labels"], 7)}
        server.handle_bytes(PerturbedPart(torch.zeros(1, rows, seq, 32), {"client": "w"}, **bad).to_bytes())
    server.handle_bytes(PerturbedPart(torch.zeros(2, rows, seq, 32), {"client": "y"}, **head).to_bytes())
    assert len(server.pending["y"].losses) == 2 and not server.pending["y"].buffer  # the pair is scored at once
    with pytest.raises(ProtocolError, match="shape"):
        server.handle_bytes(PerturbedPart(torch.zeros(1, rows, seq + 1, 32), {"client": "y"}).to_bytes())
    assert "y" not in server.pending  # a failed step leaves nothing buffered
    server.handle_bytes(PerturbedPart(torch.zeros(1, rows, seq, 32), {"client": "z"}, **head).to_bytes())
    fo = StepRequest(kind="fo", clean=torch.zeros(rows, seq, 32), meta={"client": "z"}, **head)
    with pytest.raises(ProtocolError, match="kind 'fo'"):
        server.handle_bytes(fo.to_bytes())
    server.handle_bytes(PerturbedPart(torch.zeros(2, rows, seq, 32), {"client": "v"}, **head).to_bytes())
    other = StepRequest(
        kind="zo", clean=torch.zeros(rows, seq, 32), meta={"client": "v"}, **{**head, "labels": 1 - batch["labels"]}
    )
    with pytest.raises(ProtocolError, match="'labels' of the step differs"):
        server.handle_bytes(other.to_bytes())


def test_pairs_scored_on_arrival_equal_scoring_them_together():
    """Streaming parts (scored pair by pair) gives the same losses as one request carrying all 2Q."""
    from fl_app.protocol import PerturbedPart, StepReply, StepRequest

    _, _, server, data = parties(**{"zo-queries": 3})
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    rows, seq = batch["input_ids"].shape
    head = {"attention_mask": batch["attention_mask"], "labels": batch["labels"], "score_ids": batch["score_ids"]}
    pert = torch.randn(6, rows, seq, 32, generator=torch.Generator().manual_seed(0))
    inline = server.score_perturbed(StepRequest(kind="zo", clean=pert[0], **head), pert)
    for i in range(6):
        server.handle_bytes(PerturbedPart(pert[i : i + 1], {"client": "s"}, **(head if i == 0 else {})).to_bytes())
    reply = StepReply.from_bytes(
        server.handle_bytes(StepRequest(kind="zo", clean=pert[0], meta={"client": "s"}, **head).to_bytes())
    )
    assert torch.allclose(reply.perturbed_losses.float(), inline, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-bert"])
def test_zo_client_step_touches_only_the_batch_embedding_rows(model):
    """With zo-embedding-rows = batch a HOSL step changes exactly the token rows in the batch (and
    the position rows up to its length); every other row stays bit-identical. ``all`` changes every row."""
    changed = {}
    for rows in ("batch", "all"):
        config, client, server, data = parties(model=model, **{"zo-embedding-rows": rows})
        batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
        words = client.bottom.body.get_input_embeddings().weight
        positions = next(
            m.weight
            for n, m in client.bottom.named_modules()
            if isinstance(m, torch.nn.Embedding) and "position" in n.rsplit(".", 1)[-1]
        )
        before_words, before_positions = words.detach().clone(), positions.detach().clone()
        link = InProcessLink(server.handle_bytes)
        stats = client.train_step(batch, link)
        link.close()
        changed[rows] = (words != before_words).any(1), (positions != before_positions).any(1)
        if rows == "batch":
            used = torch.zeros(words.shape[0], dtype=torch.bool)
            used[batch["input_ids"].unique()] = True
            assert torch.equal(changed[rows][0], used)
            offset = 2 if model == "tiny-opt" else 0  # OPT's learned positions start at row 2
            assert int(changed[rows][1].sum()) <= batch["input_ids"].shape[1] + offset
            assert stats.rows  # the selection is reported for synced replay
        else:
            assert stats.rows == b""
    assert bool(changed["all"][0].all()) and bool(changed["all"][1].all())


def feedback_step(feedback, eps, weight):
    config, client, server, data = parties(**{"hosl-feedback": feedback, "zo-queries": 3, "zo-eps": eps})
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    link = InProcessLink(server.handle_bytes, record=True)
    stats = client.train_step(batch, link, weight=weight)
    link.close()
    return stats, len(link.frames)


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_gradient_feedback_matches_scored_losses_to_first_order(weight):
    """hosl-feedback = gradient: the projected gradients from <dL/dh, h+ - h-> equal the ones from the
    server's scored losses to first order in eps (a perturbation moves the tiny model's activations by
    ~9 % of their norm at eps = 1e-3, so they agree closely only at small eps), with one frame up per
    step and the same server loss."""
    gaps = []
    for eps in (1e-2, 1e-5):
        (scored, scored_frames), (projected, projected_frames) = (
            feedback_step(f, eps, weight) for f in ("losses", "gradient")
        )
        assert scored.seeds == projected.seeds and scored_frames == 2 * 3 + 1 and projected_frames == 1
        assert projected.loss == pytest.approx(scored.loss, abs=1e-6)
        assert projected.bytes_up < scored.bytes_up / 5
        expected, got = torch.tensor(scored.projected_grads), torch.tensor(projected.projected_grads)
        assert expected.abs().min() > 0.5 * weight  # the comparison is not between zeros
        gaps.append(float(((got - expected) / expected).abs().max()))
    assert gaps[1] < 0.03 and gaps[1] < gaps[0] / 5, gaps


def test_gradient_feedback_needs_an_fo_server():
    with pytest.raises(ValueError, match="hosl-feedback.*mode 'hosl'.*zo-zo"):
        make_config({"mode": "zo-zo", "hosl-feedback": "gradient"})


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_client_weights_train(dtype):
    """client-dtype: the bottom is stored, perturbed and run in that dtype, and the client alone still
    lowers the loss (the server frozen)."""
    over = {"client-dtype": dtype, "server-params": "frozen", "client-lr": 1e-2, "zo-queries": 4}
    _, client, _, _ = parties(**over)
    assert client.params and all(p.dtype == getattr(torch, dtype) for p in client.bottom.parameters())
    first, last = loss_drop(steps=30, **over)
    assert last < first - 0.02, (first, last)


def test_client_dtype_is_for_zo_clients():
    with pytest.raises(ValueError, match="client-dtype.*fo-fo"):
        make_config({"mode": "fo-fo", "client-dtype": "float16"})


@pytest.mark.parametrize("over", [{}, {"mode": "fo-fo", "client-optimizer": "adam", "client-lr": 0.01}])
def test_step_memory_is_profiled_only_on_a_batch_larger_than_before(monkeypatch, over):
    """The profiler (~0.1 s a step) runs only when a batch has more tokens than any profiled at the
    same resident bytes; the other steps report that step's peak, so the run's maximum is still a
    profiled figure and never one measured with less resident (an FO client's Adam state appears
    after its first step)."""
    import fl_app.client_party as client_party

    calls = []

    def counting(device):
        calls.append(1)
        return track_peak_memory(device)

    monkeypatch.setattr(client_party, "track_peak_memory", counting)
    _, client, server, data = parties(**over)
    batch = BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0)
    width = batch["input_ids"].shape[1]
    link = InProcessLink(server.handle_bytes)
    peaks = []
    for keep in (width - 2, width - 4, width - 2, width):
        cut = {k: v[:, :keep] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}
        cut["attention_mask"] = cut["attention_mask"].clone()
        cut["attention_mask"][:, -1] = 1
        peaks.append(client.train_step(cut, link).peak_memory_bytes)
    link.close()
    # ZO: the first batch and the widest one. Adam: its state appears after the first step, and from
    # then on each batch wider than any profiled with that state (w-4, w-2, w) is profiled once
    assert len(calls) == (4 if over else 2)
    assert peaks[3] >= peaks[2] >= peaks[1] > 0 and (over or peaks[0] == peaks[1] == peaks[2])


@pytest.mark.slow
def test_client_steps_give_freed_large_blocks_back():
    """release_freed_memory (after each client step): once a large block was freed, glibc's dynamic
    threshold keeps later freed blocks of a few MiB in the heap; trimming gives them back. Each case
    runs in its own interpreter (heap state is per process)."""
    import subprocess
    import sys

    script = """
import sys, torch
from fl_app.metrics import release_freed_memory
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
first = torch.ones(4_000_000)  # 16 MB: freeing it raises glibc's dynamic mmap threshold
del first
base = rss()
blocks, pins = [], []
for i in range(20):
    blocks.append(torch.ones(1_000_000))  # 4 MB each, from the heap
    pins.append(torch.ones(16384))  # 64 KB allocations above them keep the heap from shrinking by itself
del blocks
if sys.argv[1] == "1":
    assert release_freed_memory()
print(rss() - base)
"""
    kept = {
        flag: float(
            subprocess.run(
                [sys.executable, "-c", script, flag], capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        for flag in ("0", "1")
    }
    assert kept["0"] > 40 and kept["1"] < 10, kept


@pytest.mark.parametrize("mode", ["hosl", "fo-fo"])
def test_local_runner_runs_synced_bottoms(tmp_path, mode):
    """Synced bottoms through the local runner: ZO clients replay the history, FO clients report their
    weights for the server's average (the ClientApp sends them as an ArrayRecord)."""
    config = make_config({**read_scenario(SMOKE), "mode": mode, "bottoms": "synced", "client-lr": 1e-3})
    results = run(config, tmp_path)
    assert [r["clients"] for r in results["rounds"]] == [[0, 1], [0, 1]] and not any(
        r["dropped"] for r in results["rounds"]
    )
    assert all(r["accuracy"] is not None for r in results["rounds"]) and results["eval"]["test"]["count"] == 32


def _server_state(server):
    weights = [p.detach().clone() for p in server.params]
    state = copy.deepcopy(server.optimizer.state_dict()) if server.optimizer is not None else None
    return weights, state, server.steps


def _same_state(a, b) -> bool:
    (wa, sa, na), (wb, sb, nb) = a, b
    if na != nb or not all(torch.equal(x, y) for x, y in zip(wa, wb)):
        return False
    if sa is None:
        return sb is None
    flat = lambda sd: [(i, k, v) for i, st in sorted(sd["state"].items()) for k, v in sorted(st.items())]  # noqa: E731
    return [(i, k) for i, k, _ in flat(sa)] == [(i, k) for i, k, _ in flat(sb)] and all(
        torch.equal(x, y) for (_, _, x), (_, _, y) in zip(flat(sa), flat(sb))
    )


def _recorded_steps(over: dict, count: int) -> list[list[bytes]]:
    """The frames of ``count`` consecutive steps of client 0 (against its own server), step by step."""
    _, client, server, data = parties(**over)
    stream = BatchStream(data.encoder, data.client_examples(0), 8, 0)
    steps = []
    for i in range(count):
        link = InProcessLink(server.handle_bytes, threaded=False, record=True)
        client.train_step(stream.batch(i), link)
        steps.append(list(link.frames))
    return steps


@pytest.mark.parametrize("mode", ["hosl", "fo-fo", "zo-zo"])
def test_rolling_back_an_interleaved_session_leaves_exactly_the_other_sessions_updates(mode, caplog):
    """Sessions a and b step in turn (a, b, a, b) on a server with Adam; a fails. The server is then
    bit-identical (weights, Adam's moments, step counter) to one that only ever saw b's steps (it
    used to be 4.3e-2 away), and b failing next restores the state before both. Past the journal's
    budget the rollback subtracts a's deltas instead and says so."""
    over = {"mode": mode, "server-optimizer": "adam", "zo-queries": 2}
    base, a1, b1, a2, b2 = _recorded_steps(over, 5)

    def serve(server, steps, session=None):
        for step in steps:
            for payload in step:
                server.handle_bytes(payload, session=session)

    server, reference = parties(**over)[2], parties(**over)[2]
    serve(server, [base])
    serve(reference, [base, b1, b2])
    start = _server_state(server)
    for session, step in (("a", a1), ("b", b1), ("a", a2), ("b", b2)):
        serve(server, [step], session)
    assert not _same_state(_server_state(server), _server_state(reference))
    assert server.rollback("a") == "exact" and _same_state(_server_state(server), _server_state(reference))
    assert server.rollback("b") == "exact" and _same_state(_server_state(server), start)
    server.ledger.journal_bytes = 1  # no room to journal b's steps: a's rollback is approximate
    for session, step in (("a", a1), ("b", b1)):
        serve(server, [step], session)
    assert server.rollback("a") == "subtracted" and "rollback journal" in caplog.text
    server.ledger.commit("b")
    assert server.ledger.journal == [] and server.ledger.snapshots == {}


@pytest.mark.parametrize("mode", ["hosl", "fo-fo", "zo-zo"])
def test_a_dropped_session_leaves_the_server_as_if_it_never_ran(mode):
    """Rollback restores the weights, the optimiser (Adam's moments and step counts) and the step
    counter: after a dropped session, the next session's step gives bit-identical results to a
    server that never saw it. Sessions that interleave keep the others' updates."""
    over = {"mode": mode, "server-optimizer": "adam", "zo-queries": 2}
    config, client, server, data = parties(**over)
    stream = BatchStream(data.encoder, data.client_examples(0), 8, 0)
    link = InProcessLink(server.handle_bytes, threaded=False, record=True)
    client.train_step(stream.batch(0), link)  # a first step outside any session, so Adam has state
    frames, before = list(link.frames), _server_state(server)
    for payload in frames:  # the same step again inside session "gone", which is then dropped
        server.handle_bytes(payload, session="gone")
    assert not _same_state(_server_state(server), before)
    assert server.rollback("gone") and _same_state(_server_state(server), before)
    reference = parties(**over)[2]
    for payload in frames:
        reference.handle_bytes(payload)
    after_ref = [reference.handle_bytes(p) for p in frames]
    after = [server.handle_bytes(p) for p in frames]
    assert after == after_ref  # replies byte for byte
    assert _same_state(_server_state(server), _server_state(reference))


@pytest.mark.parametrize("bad", [10**9, -1000])
def test_out_of_vocabulary_score_ids_are_refused_naming_the_field(bad):
    """A decoder request's candidate token ids must index the server's LM head."""
    from fl_app.protocol import ProtocolError, decode_frame

    config, client, server, data = parties(mode="fo-fo")
    link = InProcessLink(server.handle_bytes, threaded=False, record=True)
    client.train_step(BatchStream(data.encoder, data.client_examples(0), 8, 0).batch(0), link)
    request = decode_frame(link.frames[-1])
    assert request.score_ids is not None and server.top.vocab_size > int(request.score_ids.max())
    request.score_ids[0, 0] = bad
    with pytest.raises(ProtocolError, match=r"field 'score_ids' has token ids outside \[0, "):
        server.handle(request)
