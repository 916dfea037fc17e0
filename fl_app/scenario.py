"""Build everything a scenario needs from its config: data, split model, client and server parties.

Client sessions (under Flower or the local runner) and the coordinator build their parties here, so
every runner's client and server are the same objects with the same seeds; tests and benchmarks
also build both parties in one process (:func:`load_split`, :func:`build_client`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from fl_app.client_party import SplitClient, StepMemory
from fl_app.config import ESTIMATORS, Config
from fl_app.data import BatchEncoder, partition, sample_splits
from fl_app.devices import resolve_device
from fl_app.model_catalog import LoadedModel
from fl_app.part_loading import load_bottom, load_top, pristine_bottom_tensors
from fl_app.protocol import FrameLimits
from fl_app.server_party import BufferLimits, SplitServer
from fl_app.split import ClientBottom, ServerTop
from fl_app.tasks import Example, Task, get_task
from fl_app.trainable import TrainableSpec, configure_trainable, init_lora
from fl_app.zo import magnitude_masks


@dataclass
class TaskData:
    """The sampled splits, the per-client partition of the train split and the batch encoder."""

    task: Task
    splits: dict[str, list[Example]]
    partitions: list[list[int]]
    encoder: BatchEncoder
    truncated: dict[str, int] = field(default_factory=dict)  # per split: examples not fitting max-length whole

    def client_examples(self, index: int) -> list[Example]:
        train = self.splits["train"]
        return [train[i] for i in self.partitions[index]]


def sample_and_partition(config: Config) -> tuple[dict[str, list[Example]], list[list[int]]]:
    """The sampled train/dev/test splits and the train split's partition among ``num-clients``."""
    data, seed = config.data, config.run.seed
    splits = sample_splits(
        get_task(data.task),
        data.n_train,
        data.n_dev,
        data.n_test,
        seed=seed,
        source=data.source,
        data_dir=data.dir or None,
    )
    parts = partition(
        [ex.label for ex in splits["train"]],
        config.federation.num_clients,
        scheme=data.partition,
        alpha=data.dirichlet_alpha,
        seed=seed,
        min_size=data.min_partition_size,
        shards_per_client=data.shards_per_client,
    )
    return splits, parts


def majority_test_accuracy(config: Config, best_constant: bool = False) -> float:
    """Test accuracy of always answering the training sample's most common label (no model); with
    ``best_constant``, the test split's own most common label: the most any constant answer scores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the runs' own results.json record the split sizes
        splits, _ = sample_and_partition(config)
    labels = [ex.label for ex in splits["test" if best_constant else "train"]]
    common = max(set(labels), key=labels.count)
    return sum(ex.label == common for ex in splits["test"]) / len(splits["test"])


def load_task_data(config: Config, loaded: LoadedModel) -> TaskData:
    """Sample train/dev/test, partition train across ``num-clients`` and build the encoder."""
    task = get_task(config.data.task)
    splits, parts = sample_and_partition(config)
    kind = "classification" if loaded.kind == "encoder" else "prompted"
    encoder = BatchEncoder(loaded.tokenizer, task, kind, max_length=config.data.max_length)
    truncated = {name: encoder.truncated(examples) for name, examples in splits.items()}
    if any(truncated.values()):
        warnings.warn(
            f"task '{task.name}' at max-length {encoder.max_length}: "
            + ", ".join(f"{n} of {len(splits[s])} {s}" for s, n in truncated.items())
            + " examples do not fit whole (passages shortened, or prompts cut from the left)",
            stacklevel=2,
        )
    return TaskData(task, splits, parts, encoder, truncated)


def client_dtype(config: Config) -> torch.dtype:
    """The dtype the scenario's client bottom is stored in (``client-dtype``)."""
    return getattr(torch, config.model.client_dtype)


def load_client_bottom(config: Config) -> tuple[LoadedModel, ClientBottom]:
    """The scenario's bottom alone (the top's layers are never loaded); the ``LoadedModel`` gives the
    tokenizer and family, its model is the bottom's body."""
    bottom, tokenizer, family = load_bottom(
        config.model.name,
        config.model.cut_layer,
        num_labels=_num_classes(config),
        seed=config.run.seed,
        dtype=client_dtype(config),
    )
    return LoadedModel(bottom.body, tokenizer, family), bottom


def load_server_top(config: Config) -> tuple[LoadedModel, ServerTop]:
    """The scenario's top alone (the bottom's layers are never loaded); the ``LoadedModel`` gives the
    tokenizer and family, its model is the top's."""
    top, tokenizer, family = load_top(
        config.model.name, config.model.cut_layer, num_labels=_num_classes(config), seed=config.run.seed
    )
    return LoadedModel(top.model, tokenizer, family), top


def load_split(config: Config) -> tuple[LoadedModel, ClientBottom, ServerTop]:
    """Both parts of the scenario's model, each loaded on its own (the whole model is never in memory
    at once); the same weights as cutting the loaded model, from the same seed.

    The returned ``LoadedModel`` provides the tokenizer and family; its model is the top's.
    """
    _, bottom = load_client_bottom(config)
    loaded, top = load_server_top(config)  # last, so the global RNG ends where loading the whole model left it
    return loaded, bottom, top


def _num_classes(config: Config) -> int:
    return get_task(config.data.task).num_classes


def _spec(config: Config, side: str) -> TrainableSpec:
    model = config.model
    return TrainableSpec(
        mode=model.client_params if side == "client" else model.server_params,
        lora_r=model.lora_r,
        lora_alpha=model.lora_alpha,
        lora_targets=model.targets,
        freeze=model.frozen_groups if side == "client" else (),
    )


def build_server(config: Config, top: ServerTop, num_classes: int) -> SplitServer:
    """The server party with its trainable set and optimiser per ``mode``."""
    params = configure_trainable(top, _spec(config, "server"), top.family)
    limits = BufferLimits(config.stream.session_buffer_mb * 2**20, config.stream.server_buffer_mb * 2**20)
    top.to(server_device(config))  # after LoRA is drawn (on the CPU: the same adapters on every device)
    return SplitServer(top, params, config, num_classes, limits, frame_limits(config, num_classes))


def frame_limits(config: Config, num_classes: int) -> FrameLimits:
    """The largest frame ``config``'s clients send: rows by batch-size (times the candidates), tokens by
    the max-length its batches are cut to, perturbed activations by zo-queries (twice for two-point estimates)."""
    batch, classes = config.data.batch_size, max(1, num_classes)
    tokens = config.data.max_length or get_task(config.data.task).max_length
    return FrameLimits(batch, batch * classes, tokens, classes, config.zo.per_query * config.zo.queries)


def server_device(config: Config) -> torch.device:
    """Where the server's top runs (``server-device``, resolved on this machine)."""
    return resolve_device("server-device", config.model.server_device)


def client_device(config: Config) -> torch.device:
    """Where a client's bottom runs (``client-device``, resolved on this machine)."""
    return resolve_device("client-device", config.model.client_device)


def client_trainable(config: Config, bottom: ClientBottom, index: int) -> list[torch.nn.Parameter]:
    """Set what client ``index`` trains on ``bottom`` (once per bottom) and move it to ``client-device``;
    LoRA adapters are initialised from the client's seed (on the CPU), so the same (seed, client) always
    starts from the same adapters."""
    params = configure_trainable(bottom, _spec(config, "client"), bottom.family, lora_seed=config.client_seed(index))
    bottom.to(client_device(config))
    return params


def reset_client_bottom(config: Config, bottom: ClientBottom, index: int) -> None:
    """Put the trainable tensors of a configured bottom back to client ``index``'s starting values:
    pretrained weights re-read from the checkpoint (tiny models: rebuilt), LoRA adapters re-drawn from
    the client's seed; exactly what :func:`client_trainable` on a freshly loaded bottom gives."""
    trainable = {n: p for n, p in bottom.named_parameters() if p.requires_grad}
    pretrained = [n for n in trainable if "lora_" not in n]
    if pretrained:
        values = pristine_bottom_tensors(
            config.model.name,
            config.model.cut_layer,
            pretrained,
            num_labels=_num_classes(config),
            seed=config.run.seed,
            dtype=client_dtype(config),
        )
        with torch.no_grad():
            for name in pretrained:
                trainable[name].copy_(values.pop(name))
    if len(pretrained) < len(trainable):
        init_lora(bottom, config.client_seed(index))


def split_client(
    config: Config,
    bottom: ClientBottom,
    params: list[torch.nn.Parameter],
    index: int,
    memory: StepMemory | None = None,
) -> SplitClient:
    """Client ``index`` training ``params`` of an already configured ``bottom`` (see :func:`client_trainable`);
    clients taking turns on one bottom pass the same ``memory``."""
    masks = client_masks(config, bottom, params) if _sparse_client(config) else None
    return SplitClient(bottom, params, config, index, memory=memory, masks=masks)


def _sparse_client(config: Config) -> bool:
    return config.client_order == "zo" and ESTIMATORS[config.zo.estimator][1] == "sparse"


def client_masks(config: Config, bottom: ClientBottom, params: list[torch.nn.Parameter]) -> list[np.ndarray | None]:
    """A sparse ZO client's masks, one per parameter of ``params``: for each pretrained matrix (not a
    LoRA adapter, not a vector) its smallest-magnitude pristine entries (:func:`fl_app.zo.magnitude_masks`),
    None for the rest. Read from the pristine checkpoint, whatever ``bottom`` holds now, so every party
    and every session of a run gets the same masks."""
    names = {id(p): n for n, p in bottom.named_parameters()}
    masked = tuple(names[id(p)] if p.ndim >= 2 and "lora_" not in names[id(p)] else "" for p in params)
    return list(
        _pristine_masks(
            config.model.name,
            config.model.cut_layer,
            masked,
            _num_classes(config),
            config.run.seed,
            config.model.client_dtype,
            config.zo.sparsity,
        )
    )


@functools.lru_cache(maxsize=2)
def _pristine_masks(
    model: str, cut: int, names: tuple[str, ...], num_labels: int, seed: int, dtype: str, sparsity: float
) -> tuple[np.ndarray | None, ...]:
    wanted = [n for n in names if n]
    pristine = (
        pristine_bottom_tensors(model, cut, wanted, num_labels=num_labels, seed=seed, dtype=getattr(torch, dtype))
        if wanted
        else {}
    )
    return tuple(magnitude_masks([pristine[n] if n else None for n in names], sparsity))


def build_client(config: Config, bottom: ClientBottom, index: int, copy_bottom: bool = True) -> SplitClient:
    """Client ``index`` with its own copy of the bottom (unless ``copy_bottom`` is False)."""
    own = copy.deepcopy(bottom) if copy_bottom else bottom
    return split_client(config, own, client_trainable(config, own, index), index)
