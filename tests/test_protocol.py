"""Wire messages round-trip exactly and malformed ones are rejected with the field named."""

import pytest
import torch

from fl_app.protocol import ProtocolError, StepReply, StepRequest, validate_request

H = 8


def request(**over):
    fields = dict(
        kind="zo",
        clean=torch.randn(2, 5, H),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        labels=torch.tensor([0, 1]),
        score_ids=torch.tensor([[4, 9], [4, 9]]),
        perturbed=torch.randn(4, 2, 5, H),
        meta={"client": "3", "step": 7},
    )
    fields.update(over)
    return StepRequest(**fields)


def test_request_round_trip_keeps_dtype_shape_and_meta():
    req = request(clean=torch.randn(2, 5, H).half())
    back = StepRequest.from_bytes(req.to_bytes())
    assert back.clean.dtype == torch.float16 and torch.equal(back.clean, req.clean)
    assert torch.equal(back.perturbed, req.perturbed) and back.meta == {"client": "3", "step": 7}
    assert back.target_ids is None and torch.equal(back.score_ids, req.score_ids)
    validate_request(back, H, num_classes=2)


def test_reply_round_trip():
    rep = StepReply(clean_loss=0.25, perturbed_losses=torch.tensor([1.0, 2.0]), grad=torch.ones(2, 5, H))
    back = StepReply.from_bytes(rep.to_bytes())
    assert back.clean_loss == 0.25 and back.perturbed_losses.tolist() == [1.0, 2.0]
    assert torch.equal(back.grad, rep.grad)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"clean": torch.randn(2, 5, H + 1)}, "clean"),
        ({"clean": torch.randint(0, 3, (2, 5, H))}, "clean"),
        ({"clean": torch.full((2, 5, H), float("nan"))}, "NaN"),
        ({"perturbed": torch.randn(3, 2, 5, H)}, "perturbed"),
        ({"perturbed": torch.randn(4, 2, 5, H).index_fill_(0, torch.tensor([1]), float("inf"))}, "perturbed"),
        ({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, "attention_mask"),
        ({"labels": torch.tensor([0, 5])}, "labels"),
        ({"labels": torch.tensor([0.0, 1.0])}, "labels"),
        ({"score_ids": torch.tensor([[1, 2]])}, "score_ids"),
        ({"kind": "train"}, "kind"),
        ({"perturbed": None}, "perturbed"),
    ],
)
def test_malformed_requests_name_the_field(over, field):
    with pytest.raises(ProtocolError, match=field):
        validate_request(StepRequest.from_bytes(request(**over).to_bytes()), H, num_classes=2)


def test_garbage_and_oversized_frames_are_rejected():
    with pytest.raises(ProtocolError, match="malformed"):
        StepRequest.from_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")
    payload = request().to_bytes()
    with pytest.raises(ProtocolError, match="exceeds"):
        StepRequest.from_bytes(payload, max_bytes=len(payload) - 1)
