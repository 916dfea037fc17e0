"""Shared fixtures: tiny randomly initialised models (no downloads)."""

import copy
import os

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from fl_app.coordinator import Coordinator
from fl_app.models import LoadedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 120


def tiny_model(family: str, layers: int = 4, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4)
    if family == "opt":
        model = OPTForCausalLM(OPTConfig(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=1, **common))
    elif family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True, **common)
        )
    else:
        model = BertForSequenceClassification(BertConfig(intermediate_size=64, num_labels=3, **common))
    return LoadedModel(model.eval(), None, family)


@pytest.fixture
def padded_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.fixture
def fresh():
    """Factory returning an independent deep copy of a tiny model."""
    return lambda family, **kw: copy.deepcopy(tiny_model(family, **kw))


@pytest.fixture
def coordinators(tmp_path):
    """Factory of Coordinators writing to ``tmp_path`` for a given config; all closed after the test."""
    made = []

    def build(config, credentials=None):
        made.append(Coordinator(config, tmp_path, credentials))
        return made[-1]

    yield build
    for c in made:
        c.close()
