"""A client's batches: training order as a pure function of the step index (full data or a weighted
subset), fixed mini-batches for subset selection, evaluation passes and shards."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from fl_app.data import BatchEncoder
from fl_app.subset import Subset
from fl_app.tasks import Example


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The seeded order of ``count`` items in epoch ``epoch`` (a new shuffle each epoch)."""
    order = list(range(count))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def fixed_batches(num_examples: int, batch_size: int, seed: int) -> list[list[int]]:
    """A client's partition cut into fixed mini-batches (seeded shuffle): the units GradMatch selects."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


def step_weights(subset: Subset, labels: list[list[int]] | None = None) -> list[float] | list[tuple[float, ...]]:
    """Per-step loss weights w_i * b / sum(w): their mean is 1, so a pass over the subset trains on
    sum(w * loss) / sum(w) at the learning rate of unweighted training. Weights per class (one tuple
    per step) are scaled alike, so that their mean over the subset's examples is 1; ``labels``
    holds each selected batch's example labels."""
    if not subset.per_class():
        total = sum(subset.weights)
        if not subset.weights or not total > 0:
            raise ValueError(f"a subset needs positive weights, got {subset.weights}")
        return [w * len(subset.weights) / total for w in subset.weights]
    weights = subset.class_weights()
    if labels is None or len(labels) != len(subset.batch_ids) or (weights < 0).any():
        raise ValueError(f"per-class subset weights need non-negative weights and each batch's labels, got {labels}")
    mass = sum(float(weights[k, y]) for k, batch in enumerate(labels) for y in batch)
    if not mass > 0:
        raise ValueError(f"a subset needs a positive weight on some example, got {subset.weights}")
    scale = sum(len(batch) for batch in labels) / mass
    return [tuple(float(w) * scale for w in row) for row in weights]


class BatchStream:
    """A client's training batches as a pure function of the step index (epochs reshuffled by seed),
    so a client restarted from a saved step count continues with exactly the next batch."""

    def __init__(self, encoder: BatchEncoder, examples: list[Example], batch_size: int, seed: int):
        if not examples:
            raise ValueError("a client has no training examples (check num-clients, n-train and partition)")
        self.encoder, self.examples, self.batch_size, self.seed = encoder, examples, batch_size, seed
        self.per_epoch = -(-len(examples) // batch_size)

    def __len__(self) -> int:
        return self.per_epoch

    def weighted_indices(self, step: int) -> tuple[list[int], float]:
        """Batch ``step``'s example indices and its loss weight (always 1 on the full data)."""
        return self.indices(step), 1.0

    def indices(self, step: int) -> list[int]:
        """Example indices of batch number ``step``."""
        epoch, position = divmod(step, self.per_epoch)
        order = epoch_order(len(self.examples), self.seed, epoch)
        return order[position * self.batch_size : (position + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.encoder([self.examples[i] for i in self.indices(step)])


class SubsetStream:
    """Training batches over a selected subset as a pure function of the step index: each pass visits
    every selected batch once, in a seeded order; returns (example indices, loss weight or weights
    per class). ``labels`` (each example's label) is needed for weights per class."""

    def __init__(self, batches: list[list[int]], subset: Subset, seed: int, labels: list[int] | None = None):
        bad = [i for i in subset.batch_ids if not 0 <= i < len(batches)]
        if bad:
            raise ValueError(f"subset batch ids {bad} outside [0, {len(batches)}) (field 'subset-ids')")
        self.batches, self.subset, self.seed = batches, subset, seed
        picked = None if labels is None else [[labels[i] for i in batches[b]] for b in subset.batch_ids]
        self.weights = step_weights(subset, picked)

    def __len__(self) -> int:
        return len(self.subset.batch_ids)

    def weighted_indices(self, step: int) -> tuple[list[int], float | tuple[float, ...]]:
        epoch, position = divmod(step, len(self))
        pick = epoch_order(len(self), self.seed, epoch)[position]
        return self.batches[self.subset.batch_ids[pick]], self.weights[pick]


def eval_batches(encoder: BatchEncoder, examples: list[Example], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``examples`` in order."""
    for start in range(0, len(examples), batch_size):
        yield encoder(examples[start : start + batch_size])


def shard(examples: list[Example], index: int, count: int) -> list[Example]:
    """Shard ``index`` of ``count`` near-equal contiguous shards (federated evaluation)."""
    size, extra = divmod(len(examples), count)
    start = index * size + min(index, extra)
    return examples[start : start + size + (index < extra)]
