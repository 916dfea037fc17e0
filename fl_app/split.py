"""Cut a loaded model into a client bottom and a server top.

Families: OPT and Llama-family decoders (prompted classification through the LM head) and
BERT-style encoders (sequence classification head). The bottom holds the input embeddings and the
first ``cut_layer`` layers; the top holds the remaining layers, the final norm and the head. With
tied input/output embeddings the server keeps its own copy of the head (the client's embedding copy
is trained independently)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)

from fl_app.model_catalog import LoadedModel


class ZeroPositions(nn.Module):
    """Stands in for OPT's learned positions on the server: positions were added on the client."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())


class Passthrough(nn.Module):
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


def layers_holder(model: PreTrainedModel, family: str) -> tuple[nn.Module, nn.Module, str]:
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
    base, holder, attr = layers_holder(model, family)
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
        base.embed_positions, base.project_in = ZeroPositions(), None
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
        base.embeddings = Passthrough()
    setattr(holder, attr, nn.ModuleList(layers[cut_layer:]))
    return ClientBottom(client_body.eval(), family, hidden_size), ServerTop(model.eval(), base, family, hidden_size)


def check_cut(cut_layer: int, num_layers: int) -> None:
    """Raise naming the field unless ``cut_layer`` is a layer count in [0, ``num_layers``]."""
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 0 <= cut_layer <= num_layers:
        raise ValueError(f"cut-layer must be an integer in [0, {num_layers}] for this model, got {cut_layer!r}")


def param_counts(module: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    return {
        "params": sum(p.numel() for p in seen.values()),
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
    }
