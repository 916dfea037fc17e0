"""Tiny randomly initialised models (hidden size 32) with an in-process tokenizer: tests and smoke
scenarios run them with no download."""

from __future__ import annotations

import torch

from fl_app.model_catalog import TINY_LAYERS, TINY_MODELS, LoadedModel


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
