"""Shared fixtures: tiny randomly initialised models (no downloads)."""

import copy
import os

import pytest
import torch

from fl_app.coordinator import Coordinator
from fl_app.model_catalog import LoadedModel
from fl_app.tiny_models import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 120  # token ids the fixtures draw (the tiny tokenizer has more)


def tiny_model(family: str, layers: int = 4, seed: int = 0) -> LoadedModel:
    """The product's tiny model of ``family`` (opt, llama, bert; 3 labels for the encoder), as scenarios
    with ``model = tiny-<family>`` build it."""
    return build_tiny_model(f"tiny-{family}", num_labels=3, seed=seed, num_layers=layers)


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
    """Factory of Coordinators for a given config, the first writing to ``tmp_path``, later ones to
    ``tmp_path/coord<N>`` (each run holds its folder); all closed after the test."""
    made = []

    def build(config, credentials=None):
        folder = tmp_path / f"coord{len(made)}" if made else tmp_path
        made.append(Coordinator(config, folder, credentials))
        return made[-1]

    yield build
    for c in made:
        c.close()
