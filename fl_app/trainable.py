"""Choose what each side trains: full parameters, LoRA adapters (peft) or nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fl_app.config import FREEZABLE, PARAM_MODES

DEFAULT_LORA_TARGETS = {"opt": ("q_proj", "v_proj"), "llama": ("q_proj", "v_proj"), "bert": ("query", "value")}
EMBEDDING_TYPES = (nn.Embedding,)


@dataclass(frozen=True)
class TrainableSpec:
    """What one side trains. ``lora_targets`` empty means the family's default (q and v projections)."""

    mode: str = "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()  # groups left untrained: embeddings, norms, biases, matrices (config.FREEZABLE)

    def __post_init__(self) -> None:
        if self.mode not in PARAM_MODES:
            raise ValueError(
                f"unknown parameter mode '{self.mode}' (fields client-params/server-params); "
                f"known: {', '.join(PARAM_MODES)}"
            )
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise ValueError(f"client-freeze names unknown groups {sorted(unknown)}; known: {', '.join(FREEZABLE)}")
        if self.mode == "lora" and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ValueError(f"lora-r must be >= 1 and lora-alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}")


def _is_head(name: str) -> bool:
    return name.startswith(("model.classifier", "model.bert.pooler"))


def configure_trainable(
    module: nn.Module, spec: TrainableSpec, family: str, lora_seed: int | None = None
) -> list[nn.Parameter]:
    """Set ``requires_grad`` on ``module`` per ``spec`` and return the trainable parameters in a fixed order.

    With LoRA, a sequence-classification head (pooler + classifier, server side) stays fully
    trainable because it starts untrained. LoRA adapters are drawn from ``lora_seed`` (see
    :func:`init_lora`, the global RNG is then left untouched) or, if it is None, from the global RNG.
    """
    if spec.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # only LoRA runs pay for importing peft

        targets = list(spec.lora_targets or DEFAULT_LORA_TARGETS[family])
        config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=targets, lora_dropout=0.0)
        try:
            with torch.random.fork_rng(devices=[], enabled=lora_seed is not None):
                inject_adapter_in_model(config, module)
        except ValueError as err:
            raise ValueError(f"lora-targets {targets} do not match modules of this part: {err}") from err
        if lora_seed is not None:
            init_lora(module, lora_seed)
    for name, p in module.named_parameters():
        if spec.mode == "full":
            p.requires_grad_(True)
        elif spec.mode == "lora":
            p.requires_grad_("lora_" in name or _is_head(name))
        else:
            p.requires_grad_(False)
    for sub in module.modules():
        if "embeddings" in spec.freeze and isinstance(sub, EMBEDDING_TYPES):
            sub.weight.requires_grad_(False)
        if "norms" in spec.freeze and "norm" in type(sub).__name__.lower():  # LayerNorm, RMSNorm, ...
            for p in sub.parameters(recurse=False):
                p.requires_grad_(False)
    if "matrices" in spec.freeze:  # the layers' linear weights; LoRA's factors (lora_A / lora_B) stay
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear) and "lora_" not in name:
                sub.weight.requires_grad_(False)
    if "biases" in spec.freeze:
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(False)
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def init_lora(module: nn.Module, seed: int) -> None:
    """(Re)draw every LoRA adapter in ``module`` as peft initialises it (A: Kaiming-uniform, B: zero),
    from ``seed`` alone and in module order: the same seed always gives the same adapters, on any
    device (they are drawn on the CPU), and the global RNG is left as it was."""
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for sub in module.modules():
            if isinstance(sub, LoraLayer):
                for adapter in sub.lora_A:
                    parts = (sub.lora_A[adapter], sub.lora_B[adapter])
                    device = parts[0].weight.device
                    for part in parts:
                        part.to("cpu")
                    sub.reset_lora_parameters(adapter, True)
                    for part in parts:
                        part.to(device)


def make_fo_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer | None:
    """Plain SGD (the papers' setting) or Adam for a first-order party; None with nothing to train."""
    if not params:
        return None
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (fields client-optimizer/server-optimizer); known: sgd, adam")
