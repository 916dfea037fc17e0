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


@pytest.fixture
def train_report():
    """Factory of a plausible TrainReport: ``steps`` steps of ``queries`` seeds and gradients each
    (0: an FO client's), fields overridden by keyword."""

    def build(partition_id=0, steps=2, queries=2, **overrides):
        from fl_app.records import TrainReport

        fields = dict(
            partition_id=partition_id,
            losses=[0.7] * steps,
            seeds=[list(range(q * queries, (q + 1) * queries)) for q in range(steps)],
            grads=[[0.5] * queries for _ in range(steps)],
            rows=[b""] * steps,
            step_lrs=[1e-3] * steps,
            lr=1e-3,
            bytes_up=10,
            bytes_down=4,
            peak_memory_bytes=1 << 20,
            step_seconds=0.5,
            session_seconds=0.7,
            caught_up_updates=0,
            device="cpu",
            max_length=64,
            truncated={},
            subset_plan="full",
            subset_batches=0,
            selection_seconds=0.0,
            selection_bytes_up=0,
            selection_bytes_down=0,
            bottom_params=100,
            bottom_trainable=40,
        )
        return TrainReport(**{**fields, **overrides})

    return build


def _cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for (subprocess runs, Flower)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_CPU: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With HOSL_TEST_CPU=<file>: each test's CPU seconds (setup, call, teardown; its waited-for
    subprocesses included), written to <file> as JSON at the end: what shrinking the suite must target
    on a 2-core machine, and far less sensitive to a loaded machine than wall time."""
    if not os.environ.get("HOSL_TEST_CPU"):
        return (yield)
    started = _cpu_seconds()
    try:
        return (yield)
    finally:
        _CPU[item.nodeid] = _cpu_seconds() - started


def pytest_sessionfinish(session):
    path = os.environ.get("HOSL_TEST_CPU")
    if path and _CPU:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(dict(sorted(_CPU.items(), key=lambda kv: -kv[1])), indent=1))
