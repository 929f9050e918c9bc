"""The drafter kinds, by name: the one place that knows there is more than one.

Each kind is a model class (metattt.models.drafter.BlockDrafter, metattt.models.ar_drafter.ARDrafter)
that carries its config class, the `architectures` name of its checkpoints, its default LoRA
targets, and the three calls the rest of metattt makes:

    drafter.draft(last_token, position, cache, choose)   -> drafts (S-1,), their distribution
    drafter.next_token_logits(last_token, position, cache) -> (V,)
    kind.teacher_forced_hidden(forward, input_ids, anchors, features, valid, S, mask_id, cache=None)
                                                          -> (B, N, S-1, H), the training states
                                                             (cache: K/V read for the first positions)

(The last is a static method: training calls it with a functional_call wrapper that carries the
fast weights.) Code outside this module asks `kind_of(drafter)` or `DRAFTERS[name]`, never
compares kind names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from metattt.models.ar_drafter import ARCHITECTURE as AR_ARCHITECTURE
from metattt.models.ar_drafter import ARDrafter
from metattt.models.base import BaseDrafterConfig
from metattt.models.dflash import ARCHITECTURE as DFLASH_ARCHITECTURE
from metattt.models.drafter import BlockDrafter


@dataclass(frozen=True)
class DrafterKind:
    name: str
    architecture: str  # config.json `architectures` of its checkpoints
    model_class: type[nn.Module]

    @property
    def config_class(self) -> type[BaseDrafterConfig]:
        return self.model_class.config_class

    @property
    def default_lora_targets(self) -> list[str]:
        return list(self.model_class.default_lora_targets)

    @property
    def context_modules(self) -> tuple[str, ...]:
        """Module names whose weights enter the drafter's cached context keys/values."""
        return tuple(self.model_class.context_modules)

    @property
    def drafts_with_mask_tokens(self) -> bool:
        """Whether its blocks are filled with the tokenizer's mask token (the block kind)."""
        return self.model_class is BlockDrafter

    def teacher_forced_hidden(self, forward, input_ids, anchors, context_features, context_valid, block_size: int,
                              mask_token_id: int, cache=None):
        return self.model_class.teacher_forced_hidden(forward, input_ids, anchors, context_features, context_valid,
                                                      block_size, mask_token_id, cache=cache)

    def load(self, path: str | Path, attn_implementation: str = "sdpa") -> nn.Module:
        return self.model_class.from_pretrained(path, attn_implementation=attn_implementation)


DRAFTERS: dict[str, DrafterKind] = {
    "block": DrafterKind("block", DFLASH_ARCHITECTURE, BlockDrafter),
    "autoregressive": DrafterKind("autoregressive", AR_ARCHITECTURE, ARDrafter),
}


def kind_named(name: str) -> DrafterKind:
    if name not in DRAFTERS:
        raise ValueError(f"drafter.kind={name!r}: choose one of {list(DRAFTERS)}")
    return DRAFTERS[name]


def kind_of(model) -> DrafterKind:
    """The kind of a drafter, its peft wrapper, a functional_call wrapper, or its config."""
    config = model if isinstance(model, BaseDrafterConfig) else getattr(model, "config", None)
    for kind in DRAFTERS.values():
        if type(config) is kind.config_class:
            return kind
    raise TypeError(f"{type(model).__name__} is not a drafter (its config is {type(config).__name__})")


def kind_of_checkpoint(path: str | Path) -> DrafterKind:
    """The kind of a drafter folder, by `architectures` in its config.json (DFlash's when unnamed)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no drafter at {path}: expected config.json and safetensors weights")
    archs = json.loads(config.read_text()).get("architectures") or [DFLASH_ARCHITECTURE]
    for kind in DRAFTERS.values():
        if kind.architecture in archs:
            return kind
    return DRAFTERS["block"]  # the DFlash importer names what it cannot read


def load_drafter(path: str | Path, attn_implementation: str = "sdpa") -> nn.Module:
    """A drafter folder of either kind, chosen by its config.json."""
    return kind_of_checkpoint(path).load(path, attn_implementation)
