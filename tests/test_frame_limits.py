"""Every size a frame declares is bounded by the run's scenario before the server reads or computes
anything, and malformed fields are protocol errors naming the field."""

import json
import tracemalloc

import pytest
import torch
from safetensors.torch import save as st_save

import fl_app.protocol as protocol
from fl_app.config import make_config, read_scenario
from fl_app.protocol import PerturbedPart, ProtocolError, SelectRequest, StepRequest
from fl_app.scenario import build_server, load_split, load_task_data

SMOKE = "sim_configs/smoke_tiny.toml"


def server_for(model: str = "tiny-opt", **over):
    config = make_config({**read_scenario(SMOKE), "num-clients": 1, "model": model, **over})
    loaded, _, top = load_split(config)
    data = load_task_data(config, loaded)
    return config, build_server(config, top, data.task.num_classes), data


def eval_frame(server, rows: int, tokens: int, decoder: bool = True, **meta) -> bytes:
    hidden = server.top.hidden_size
    fields = {"score_ids": torch.tensor([[3, 4]] * rows)} if decoder else {}
    return StepRequest(
        kind="eval",
        clean=torch.zeros(rows, tokens, hidden),
        attention_mask=torch.ones(rows, tokens, dtype=torch.long),
        labels=torch.zeros(rows, dtype=torch.long),
        meta=meta,
        **fields,
    ).to_bytes()


@pytest.fixture(scope="module")
def opt_server():
    config, server, _ = server_for(**{"batch-size": 4, "max-length": 32, "zo-queries": 2})
    return config, server


def test_limits_follow_the_scenario(opt_server):
    _, server = opt_server
    limits = server.frames
    assert (limits.batch, limits.rows, limits.tokens, limits.classes, limits.activations) == (4, 8, 32, 2, 4)


def _scored(reply: bytes, rows: int) -> bool:
    """Whether ``reply`` is an evaluation of ``rows`` examples: a finite loss and one verdict per example."""
    got = protocol.StepReply.from_bytes(reply)
    verdicts = got.example_correct
    return got.count == rows and torch.isfinite(torch.tensor(got.clean_loss)) and verdicts.shape == (rows,)


def test_a_frame_at_the_limits_is_served(opt_server):
    _, server = opt_server
    assert _scored(server.handle_bytes(eval_frame(server, rows=4, tokens=32)), rows=4)


@pytest.mark.parametrize(
    "rows, tokens, field, bound", [(1, 16_384, "attention_mask", "tokens <= 32"), (5, 8, "labels", "batch <= 4")]
)
def test_oversized_declared_shapes_are_refused_from_the_header_before_any_tensor_is_read(
    opt_server, monkeypatch, rows, tokens, field, bound
):
    """A 1 x 16,384-token frame (2 MiB) used to hold the server's lock for seconds; it is now refused
    on its header: the tensors are never deserialised (reading them here would fail the test)."""
    _, server = opt_server
    payload = eval_frame(server, rows=rows, tokens=tokens)

    def never(_payload):
        raise AssertionError("tensors read before the declared shapes were checked")

    monkeypatch.setattr(protocol, "st_load", never)
    with pytest.raises(ProtocolError, match=f"field '{field}' declares shape .*{bound}"):
        server.handle_bytes(payload)


def test_perturbed_parts_beyond_2q_are_refused(opt_server):
    _, server = opt_server
    hidden = server.top.hidden_size
    head = {"attention_mask": torch.ones(4, 8, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long)}
    head["score_ids"] = torch.tensor([[3, 4]] * 4)
    with pytest.raises(ProtocolError, match="field 'perturbed' declares shape .*activations <= 4"):
        server.handle_bytes(PerturbedPart(torch.zeros(5, 4, 8, hidden), {}, **head).to_bytes())
    for index in range(4):  # one by one: the count is checked as they stream in
        server.handle_bytes(PerturbedPart(torch.zeros(1, 4, 8, hidden), {}, **(head if index == 0 else {})).to_bytes())
    with pytest.raises(ProtocolError, match="more than 4 perturbed activations"):
        server.handle_bytes(PerturbedPart(torch.zeros(1, 4, 8, hidden), {}).to_bytes())
    server.discard_parts("")


def test_a_select_request_declaring_ten_million_batches_allocates_nothing_for_them(opt_server):
    """It used to build the declared range (1e7: +1.1 GB, 7.8 s under the coordinator's lock)."""
    _, server = opt_server
    server.proxies["s"] = {0: torch.zeros(2, 3), 1: torch.zeros(2, 3)}
    tracemalloc.start()
    try:
        with pytest.raises(
            ProtocolError, match="'num_batches' of a select request is 10000000, but proxies arrived for 2"
        ):
            server.handle_bytes(SelectRequest(budget=1, num_batches=10**7, seed=0).to_bytes(), session="s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def raw_frame(meta_text: str, server) -> bytes:
    tensors = {
        "clean": torch.zeros(1, 4, server.top.hidden_size),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.zeros(1, dtype=torch.long),
        "score_ids": torch.tensor([[3, 4]]),
    }
    return st_save(tensors, metadata={"kind": "eval", "meta": meta_text})


@pytest.mark.parametrize(
    "meta_text, message",
    [
        ("[1, 2]", "expected an object"),
        ("5", "field 'meta' is a int, expected an object"),  # a scalar used to raise TypeError
        ("null", "field 'meta' is a NoneType"),
        ("[" * 100_000 + "]" * 100_000, "field 'meta'"),  # absurd nesting: no RecursionError escapes
        ('{"client": {"nested": [1, 2]}}', "field 'meta.client'"),
        ('{"class_weights": [[1], [2]]}', "field 'meta.class_weights'"),
        ("{not json", "field 'meta' is not JSON"),
        (json.dumps({f"k{i}": i for i in range(40)}), "has 40 entries, expected at most 32"),
    ],
)
def test_malformed_metadata_is_a_protocol_error_naming_the_field(opt_server, meta_text, message):
    _, server = opt_server
    with pytest.raises(ProtocolError, match=message):
        server.handle_bytes(raw_frame(meta_text, server))


def test_header_that_is_not_an_object_or_lies_about_its_length_is_a_protocol_error(opt_server):
    _, server = opt_server
    for payload in (b"\x04\x00\x00\x00\x00\x00\x00\x00[1] ", b"\xff\x00\x00\x00\x00\x00\x00\x00{}"):
        with pytest.raises(ProtocolError, match="malformed frame"):
            server.handle_bytes(payload)


def test_candidates_per_example_must_be_the_tasks_classes(opt_server):
    """A frame with another candidate count (or none) is refused: mixed in one forward with other
    clients' steps (score-across-clients), it used to change their losses."""
    _, server = opt_server
    hidden = server.top.hidden_size
    for ids in (torch.tensor([[3, 4, 5]] * 2), torch.zeros(2, 0, dtype=torch.long)):
        frame = StepRequest(
            "eval", torch.zeros(2, 8, hidden), torch.ones(2, 8, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )
        frame.score_ids = ids
        with pytest.raises(ProtocolError, match=r"field 'score_ids' (declares|has) shape"):  # header or body check
            server.handle_bytes(frame.to_bytes())
    targets = torch.full((3, 8), -100)
    targets[:, 2] = 5
    frame = StepRequest(
        "eval", torch.zeros(3, 8, hidden), torch.ones(3, 8, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    )
    frame.target_ids = targets
    with pytest.raises(ProtocolError, match="field 'target_ids' has shape .*rows = batch 1 x 2"):
        server.handle_bytes(frame.to_bytes())


def test_a_select_seed_beyond_what_a_generator_takes_is_a_protocol_error(opt_server):
    _, server = opt_server
    with pytest.raises(ProtocolError, match="field 'seed' of a select request is 18446744073709551615"):
        server.handle_bytes(SelectRequest(budget=1, num_batches=1, seed=2**64 - 1).to_bytes())


def test_candidate_fields_must_match_the_model_family():
    """A decoder needs score_ids or target_ids, an encoder takes neither (it used to fail deep in scoring)."""
    _, opt, _ = server_for()
    with pytest.raises(ProtocolError, match="a decoder: it needs one of 'score_ids', 'target_ids'"):
        opt.handle_bytes(eval_frame(opt, rows=2, tokens=8, decoder=False))
    _, bert, _ = server_for("tiny-bert")
    with pytest.raises(ProtocolError, match=r"fields \['score_ids'\] sent to an encoder"):
        bert.handle_bytes(eval_frame(bert, rows=2, tokens=8))
    assert _scored(bert.handle_bytes(eval_frame(bert, rows=2, tokens=8, decoder=False)), rows=2)
