"""LoRA on the drafter through peft: wrapping, and the LoRA tensors as a dict (the fast weights of
test-time training). The exported meta-learned adapter is metattt.export.meta_lora."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from metattt.models.registry import kind_of


def add_lora(drafter: nn.Module, r: int = 16, alpha: int = 32, dropout: float = 0.0,
             target_modules: list[str] | None = None, seed: int = 0) -> PeftModel:
    """Wrap the drafter with fresh LoRA adapters (peft's default init: A random, B = 0);
    `target_modules` None: the drafter kind's default."""
    target_modules = list(target_modules or kind_of(drafter).default_lora_targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in drafter.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise ValueError(f"lora.target_modules {missing} are not modules of the drafter; it has {sorted(names)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(drafter, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  target_modules=target_modules, bias="none"))


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA tensors by their names in `model` (the fast weights of the inner loop)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def copy_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the LoRA tensors: an init to adapt from, or a state to restore."""
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


def set_lora(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Write `params` (as from `copy_lora` or a TTT result) into the model's LoRA, in place."""
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            p.copy_(params[name])
