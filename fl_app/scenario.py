"""Build everything a scenario needs from its config: data, split model, client and server parties.

The local runner and the Flower apps call the same functions, so a client built here and one
built inside a Flower ClientApp are the same object with the same seeds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fl_app.client_party import ClientOptimConfig, SplitClient
from fl_app.config import MODES, lora_targets
from fl_app.data import BatchEncoder, partition, sample_splits
from fl_app.models import ClientBottom, LoadedModel, ServerTop, load_bottom, load_top, pristine_bottom_tensors
from fl_app.server_party import ServerOptimConfig, SplitServer
from fl_app.tasks import Example, Task, get_task
from fl_app.trainable import TrainableSpec, configure_trainable, init_lora


@dataclass
class TaskData:
    """The sampled splits, the per-client partition of the train split and the batch encoder."""

    task: Task
    splits: dict[str, list[Example]]
    partitions: list[list[int]]
    encoder: BatchEncoder

    def client_examples(self, index: int) -> list[Example]:
        train = self.splits["train"]
        return [train[i] for i in self.partitions[index]]


def client_seed(config: Mapping[str, Any], index: int) -> int:
    """Seed of client ``index``: distinct per client, fixed by the scenario seed."""
    return int(config["seed"]) * 100_003 + index + 1


def load_task_data(config: Mapping[str, Any], loaded: LoadedModel) -> TaskData:
    """Sample train/dev/test, partition train across ``num-clients`` and build the encoder."""
    task = get_task(config["task"])
    splits = sample_splits(
        task,
        config["n-train"],
        config["n-dev"],
        config["n-test"],
        seed=config["seed"],
        source=config["data-source"],
        data_dir=config["data-dir"] or None,
    )
    parts = partition(
        [ex.label for ex in splits["train"]],
        config["num-clients"],
        scheme=config["partition"],
        alpha=config["dirichlet-alpha"],
        seed=config["seed"],
    )
    kind = "classification" if loaded.kind == "encoder" else "prompted"
    encoder = BatchEncoder(loaded.tokenizer, task, kind, max_length=config["max-length"])
    return TaskData(task, splits, parts, encoder)


def client_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype the scenario's client bottom is stored in (``client-dtype``)."""
    return getattr(torch, config["client-dtype"])


def load_client_bottom(config: Mapping[str, Any]) -> tuple[LoadedModel, ClientBottom]:
    """The scenario's bottom alone (the top's layers are never loaded); the ``LoadedModel`` gives the
    tokenizer and family, its model is the bottom's body."""
    bottom, tokenizer, family = load_bottom(
        config["model"],
        config["cut-layer"],
        num_labels=get_task(config["task"]).num_classes,
        seed=config["seed"],
        dtype=client_dtype(config),
    )
    return LoadedModel(bottom.body, tokenizer, family), bottom


def load_server_top(config: Mapping[str, Any]) -> tuple[LoadedModel, ServerTop]:
    """The scenario's top alone (the bottom's layers are never loaded); the ``LoadedModel`` gives the
    tokenizer and family, its model is the top's."""
    top, tokenizer, family = load_top(
        config["model"], config["cut-layer"], num_labels=get_task(config["task"]).num_classes, seed=config["seed"]
    )
    return LoadedModel(top.model, tokenizer, family), top


def load_split(config: Mapping[str, Any]) -> tuple[LoadedModel, ClientBottom, ServerTop]:
    """Both parts of the scenario's model, each loaded on its own (the whole model is never in memory
    at once); the same weights as cutting the loaded model, from the same seed.

    The returned ``LoadedModel`` provides the tokenizer and family; its model is the top's.
    """
    _, bottom = load_client_bottom(config)
    loaded, top = load_server_top(config)  # last, so the global RNG ends where loading the whole model left it
    return loaded, bottom, top


def _spec(config: Mapping[str, Any], side: str) -> TrainableSpec:
    return TrainableSpec(
        mode=config[f"{side}-params"],
        lora_r=config["lora-r"],
        lora_alpha=config["lora-alpha"],
        lora_targets=lora_targets(config),
        freeze_embeddings=config["freeze-embeddings"] and side == "client",
    )


def build_server(config: Mapping[str, Any], top: ServerTop, num_classes: int) -> SplitServer:
    """The server party with its trainable set and optimiser per ``mode``."""
    params = configure_trainable(top, _spec(config, "server"), top.family)
    order = MODES[config["mode"]][1]
    optim = ServerOptimConfig(
        order=order,
        optimizer=config["server-optimizer"],
        lr=config["server-lr"],
        weight_decay=config["weight-decay"],
        zo_eps=config["zo-eps"],
        zo_queries=config["zo-queries"],
        zo_directions=config["zo-directions"],
        seed=config["seed"],
    )
    return SplitServer(top, params, optim, num_classes=num_classes)


def client_trainable(config: Mapping[str, Any], bottom: ClientBottom, index: int) -> list[torch.nn.Parameter]:
    """Set what client ``index`` trains on ``bottom`` (once per bottom); LoRA adapters are initialised from
    the client's seed, so the same (seed, client) always starts from the same adapters."""
    return configure_trainable(bottom, _spec(config, "client"), bottom.family, lora_seed=client_seed(config, index))


def reset_client_bottom(config: Mapping[str, Any], bottom: ClientBottom, index: int) -> None:
    """Put the trainable tensors of a configured bottom back to client ``index``'s starting values:
    pretrained weights re-read from the checkpoint (tiny models: rebuilt), LoRA adapters re-drawn from
    the client's seed; exactly what :func:`client_trainable` on a freshly loaded bottom gives."""
    trainable = {n: p for n, p in bottom.named_parameters() if p.requires_grad}
    pretrained = [n for n in trainable if "lora_" not in n]
    if pretrained:
        values = pristine_bottom_tensors(
            config["model"],
            config["cut-layer"],
            pretrained,
            num_labels=get_task(config["task"]).num_classes,
            seed=config["seed"],
            dtype=client_dtype(config),
        )
        with torch.no_grad():
            for name in pretrained:
                trainable[name].copy_(values.pop(name))
    if len(pretrained) < len(trainable):
        init_lora(bottom, client_seed(config, index))


def split_client(
    config: Mapping[str, Any], bottom: ClientBottom, params: list[torch.nn.Parameter], index: int
) -> SplitClient:
    """Client ``index`` training ``params`` of an already configured ``bottom`` (see :func:`client_trainable`)."""
    order = MODES[config["mode"]][0]
    optim = ClientOptimConfig(
        order=order,
        optimizer=config["client-optimizer"],
        lr=config["client-lr"],
        weight_decay=config["weight-decay"],
        zo_eps=config["zo-eps"],
        zo_queries=config["zo-queries"],
        zo_directions=config["zo-directions"],
        zo_embedding_rows=config["zo-embedding-rows"],
        hosl_feedback=config["hosl-feedback"],
        seed=client_seed(config, index),
        wire_dtype=config["wire-dtype"],
    )
    return SplitClient(bottom, params, optim, client_id=str(index))


def build_client(config: Mapping[str, Any], bottom: ClientBottom, index: int, copy_bottom: bool = True) -> SplitClient:
    """Client ``index`` with its own copy of the bottom (unless ``copy_bottom`` is False)."""
    own = copy.deepcopy(bottom) if copy_bottom else bottom
    return split_client(config, own, client_trainable(config, own, index), index)
