"""Load models whole or part by part: a bottom or a top alone from the memory-mapped checkpoint,
and a bottom's pristine tensors (what a reset restores)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fl_app.model_catalog import TINY_MODELS, LoadedModel, open_pretrained, pretrained_config
from fl_app.split import ClientBottom, Passthrough, ServerTop, ZeroPositions, check_cut, layers_holder, split_model
from fl_app.tiny_models import build_tiny_model

# Checkpoint key of each family's layer list (after the base-model prefix, which may be absent).
LAYER_KEYS = {"opt": "decoder.layers", "llama": "layers", "bert": "encoder.layer"}
# Prefixes a bottom parameter ``body.<name>`` may carry in a checkpoint, most specific first.
BOTTOM_KEY_PREFIXES = {"opt": ("model.decoder.", "decoder."), "llama": ("model.", ""), "bert": ("bert.", "")}
log = logging.getLogger(__name__)


def load_model(name: str, num_labels: int = 2, seed: int = 0) -> LoadedModel:
    """Load a model by hub name, local path, ``package:<name>`` or ``tiny-<family>``.

    Decoders load as causal LMs; BERT-style encoders load with a sequence-classification
    head of ``num_labels`` classes (freshly initialised from ``seed`` if the checkpoint has none).
    """
    if name in TINY_MODELS:
        return build_tiny_model(name, num_labels=num_labels, seed=seed)
    path, config, family, tokenizer = open_pretrained(name)
    torch.manual_seed(seed)
    if family == "bert":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return LoadedModel(model.eval(), tokenizer, family)


def _part_config(config: PretrainedConfig, start: int, stop: int) -> PretrainedConfig:
    """A copy of ``config`` describing only layers ``start .. stop-1`` (per-layer settings sliced too)."""
    part = copy.deepcopy(config)
    part.num_hidden_layers = stop - start
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        part.layer_types = list(layer_types)[start:stop]
    return part


class _NoRoutineLoadReport(logging.Filter):
    """Drops transformers' load report when it lists only unused or newly initialised keys (we check
    those ourselves); a report of mismatched shapes or failed conversions still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


@contextlib.contextmanager
def _routine_load_report_dropped() -> Iterator[None]:
    logger, quiet = logging.getLogger("transformers.modeling_utils"), _NoRoutineLoadReport()
    logger.addFilter(quiet)  # a filter, not a level: transformers runs extra checks when its level is raised
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _load_part(
    loader, path: str | None, config: PretrainedConfig, name: str, dtype: torch.dtype = torch.float32, **kwargs
) -> PreTrainedModel:
    """``loader.from_pretrained`` in ``dtype`` with our own, short report: keys of the other side are
    expected to be unused; keys missing from the checkpoint are logged (they were freshly initialised)."""
    hf_logging.disable_progress_bar()  # a bar per part loaded, in every client process: noise
    with _routine_load_report_dropped():
        model, info = loader.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True, **kwargs)
    if info.get("missing_keys"):
        log.warning(
            "model '%s': not in the checkpoint, newly initialised: %s", name, ", ".join(sorted(info["missing_keys"]))
        )
    return model.eval()


def layer_of(key: str, family: str) -> tuple[str, int, str] | None:
    """(text before the index, layer index, text after it) of a checkpoint key in the layer list, else None."""
    match = re.match(rf"^((?:.*\.)?{re.escape(LAYER_KEYS[family])})\.(\d+)\.(.+)$", key)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def load_bottom(
    name: str, cut_layer: int, num_labels: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[ClientBottom, PreTrainedTokenizerBase, str]:
    """The client's part alone: embeddings and the first ``cut_layer`` layers, equal to the bottom of
    ``split_model(load_model(name, num_labels, seed), cut_layer)``.

    Only those layers and the embeddings are read from the (memory-mapped) checkpoint; the top's layers,
    a pooler, a classifier or an untied LM head are never materialised (the final norm, a few values, is
    read and dropped). Tiny models are built whole (KB-sized) and cut. The weights are stored in ``dtype``.
    Returns (bottom, tokenizer, family).
    """
    if name in TINY_MODELS:
        loaded = build_tiny_model(name, num_labels=num_labels, seed=seed)
        bottom, _ = split_model(loaded, cut_layer)
        return bottom.to(dtype), loaded.tokenizer, loaded.family
    path, config, family, tokenizer = open_pretrained(name)
    check_cut(cut_layer, config.num_hidden_layers)
    torch.manual_seed(seed)
    extra = {"add_pooling_layer": False} if family == "bert" else {}
    base = _load_part(AutoModel, path, _part_config(config, 0, cut_layer), name, dtype=dtype, **extra)
    if family == "opt":
        body = base.decoder
        body.final_layer_norm, body.project_out = None, None
    elif family == "llama":
        body = base
        body.norm = nn.Identity()
    else:
        body = base
    return ClientBottom(body.eval(), family, config.hidden_size), tokenizer, family


def load_top(
    name: str, cut_layer: int, num_labels: int = 2, seed: int = 0
) -> tuple[ServerTop, PreTrainedTokenizerBase, str]:
    """The server's part alone: layers ``cut_layer..``, final norm and head, equal to the top of
    ``split_model(load_model(name, num_labels, seed), cut_layer)`` (same parameter names, same freshly
    initialised classifier for a checkpoint without one).

    The bottom's layers are never read; the embeddings are (a tied LM head needs the embedding matrix;
    a BERT top drops them after loading). Tiny models are built whole and cut. Returns (top, tokenizer, family).
    """
    if name in TINY_MODELS:
        loaded = build_tiny_model(name, num_labels=num_labels, seed=seed)
        _, top = split_model(loaded, cut_layer)
        return top, loaded.tokenizer, loaded.family
    path, config, family, tokenizer = open_pretrained(name)
    total = config.num_hidden_layers
    check_cut(cut_layer, total)
    files = _checkpoint_files(path)
    if files is None:  # not a safetensors checkpoint: load it whole and cut (the bottom is dropped)
        log.info("model '%s' has no safetensors checkpoint: loading it whole to take its top", name)
        _, top = split_model(load_model(name, num_labels=num_labels, seed=seed), cut_layer)
        return top, tokenizer, family
    part = _part_config(config, cut_layer, total)
    if family == "bert":
        part.num_labels = num_labels
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    loader = auto._model_mapping[type(part)]  # the concrete class: from_pretrained gets no path to look at
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in set(files.values())}
        state = {}  # the top's tensors, layers renumbered from 0; lazy slices, read when loaded
        for key, file in files.items():
            layer = layer_of(key, family)
            if layer is None:
                state[key] = handles[file].get_slice(key)
            elif layer[1] >= cut_layer:
                state[f"{layer[0]}.{layer[1] - cut_layer}.{layer[2]}"] = handles[file].get_slice(key)
        torch.manual_seed(seed)  # the draws of load_model: only keys missing from the checkpoint consume them
        model = _load_part(loader, None, part, name, state_dict=state)
    base, _, _ = layers_holder(model, family)
    if family == "opt":
        base.embed_positions, base.project_in = ZeroPositions(), None
    elif family == "bert":
        base.embeddings = Passthrough()
    return ServerTop(model, base, family, config.hidden_size), tokenizer, family


def _checkpoint_files(path: str) -> dict[str, Path] | None:
    """Checkpoint key -> safetensors file (local folder or hub cache, no download); None without safetensors."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        try:
            return cached_file(
                path,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            return None

    index = find("model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        return {key: Path(index).parent / file for key, file in weight_map.items()}
    single = find("model.safetensors")
    if single is None:
        return None
    with safe_open(single, framework="pt") as handle:
        return {key: Path(single) for key in handle.keys()}


def _bottom_key(param: str, family: str, keys: Iterable[str]) -> str | None:
    """Checkpoint key of bottom parameter ``param`` (``body.<name>``; a LoRA-wrapped weight too)."""
    rest = param.removeprefix("body.").replace(".base_layer.", ".")
    for prefix in BOTTOM_KEY_PREFIXES[family]:
        if prefix + rest in keys:
            return prefix + rest
    return None


def pristine_bottom_tensors(
    name: str,
    cut_layer: int,
    params: Iterable[str],
    num_labels: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Untrained values of the bottom parameters named ``params`` (names as in ``ClientBottom``).

    Read tensor by tensor from the memory-mapped safetensors checkpoint; a tiny model (kept after its
    first rebuild: a simulation resets it for every new client) or a checkpoint laid out differently
    is rebuilt bottom-only instead. The global RNG is left as it was.
    """
    params = list(params)
    if name in TINY_MODELS:
        named = _tiny_bottom_tensors(name, cut_layer, num_labels, seed, dtype)
        return {p: named[p.replace(".base_layer.", ".")] for p in params}
    path, _, family = pretrained_config(name)
    files = _checkpoint_files(path)
    keys = {p: _bottom_key(p, family, files) for p in params} if files is not None else {}
    if files is not None and all(keys.values()):
        out: dict[str, torch.Tensor] = {}
        for file in sorted({files[k] for k in keys.values()}):
            with safe_open(str(file), framework="pt") as handle:
                for p, key in keys.items():
                    if files[key] == file:
                        out[p] = handle.get_tensor(key).to(dtype)
        return out
    log.info("model '%s': rebuilding the bottom to read its pristine weights", name)
    named = _rebuilt_bottom_tensors(name, cut_layer, num_labels, seed, dtype)
    return {p: named[p.replace(".base_layer.", ".")] for p in params}


def _rebuilt_bottom_tensors(
    name: str, cut_layer: int, num_labels: int, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every parameter of a freshly built bottom by name (LoRA wrapping removed from the names)."""
    with torch.random.fork_rng(devices=[]):
        bottom, _, _ = load_bottom(name, cut_layer, num_labels=num_labels, seed=seed, dtype=dtype)
    return {n.replace(".base_layer.", "."): p.detach() for n, p in bottom.named_parameters()}


_tiny_bottom_tensors = functools.lru_cache(maxsize=2)(_rebuilt_bottom_tensors)
