"""The meta-learned adapter as serving code loads it: a peft adapter folder (`adapter_config.json`,
`adapter_model.safetensors`) plus what test-time training must reproduce (`ttt_config.json`, the
`meta.ttt` section of the recipe written out with the learned lrs; learned heads in
`ttt_extra.safetensors`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from metattt.atomic import atomic_dir
from metattt.config import TTTConfig
from metattt.errors import check_safetensors
from metattt.models.base import set_attn_implementation

TTT_CONFIG_NAME = "ttt_config.json"
EXTRA_WEIGHTS_NAME = "ttt_extra.safetensors"


def export_meta_lora(model: PeftModel, out: Path, ttt: TTTConfig, base_model_path: str | Path,
                     extra: dict[str, torch.Tensor] | None = None, **info) -> Path:
    """A peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) plus what
    test-time training must reproduce (`ttt_config.json`, learned heads in `ttt_extra.safetensors`)."""
    out = Path(out)
    config = model.peft_config["default"]
    config.base_model_name_or_path = str(base_model_path)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        ttt.save(tmp / TTT_CONFIG_NAME, **info)
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA_WEIGHTS_NAME))
    return out


def load_meta_lora(drafter: nn.Module, path: Path, is_trainable: bool = True
                   ) -> tuple[PeftModel, TTTConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no peft adapter at {path} (expected adapter_config.json): run meta-train first")
    check_meta_lora_files(path)
    model = PeftModel.from_pretrained(drafter, str(path), is_trainable=is_trainable)
    ttt = TTTConfig.load(path / TTT_CONFIG_NAME) if (path / TTT_CONFIG_NAME).is_file() else TTTConfig()
    extra = load_file(str(path / EXTRA_WEIGHTS_NAME)) if (path / EXTRA_WEIGHTS_NAME).is_file() else {}
    return model, ttt, extra


def check_meta_lora_files(path: str | Path) -> None:
    """The adapter folder's weights and TTT settings are intact and usable (peft and safetensors
    name neither the file nor a fix); cheap: only headers and the small JSON are read."""
    path = Path(path)
    for name in ("adapter_model.safetensors", EXTRA_WEIGHTS_NAME):
        if (path / name).is_file():
            check_safetensors(path / name)
    if (path / TTT_CONFIG_NAME).is_file():
        TTTConfig.load(path / TTT_CONFIG_NAME)


def adapter_base_drafter(meta_path: str | Path) -> Path | None:
    """The drafter folder a meta-learned adapter was trained on, or None when it is not found:
    the adapter's `base_model_name_or_path` (meta-train writes it relative to where it ran), else
    the folder of that name beside the adapter (a run folder holds `drafter/` and `meta_lora/`)."""
    config = Path(meta_path) / "adapter_config.json"
    named = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    if not named:
        return None
    candidates = (Path(named), Path(meta_path).parent / Path(named).name)
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def load_ttt_adapter(drafter: nn.Module, path: Path) -> tuple[PeftModel, TTTConfig, nn.Linear | None]:
    """`load_meta_lora`, plus what TTT with it needs: the learned feature head (when meta-training
    exported one) and eager attention when the TTT objective reads attention weights."""
    model, ttt, extra = load_meta_lora(drafter, path)
    feature_head = None
    if "feature_head.weight" in extra:
        weight = extra["feature_head.weight"]
        feature_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        feature_head.weight.data.copy_(weight)
    if ttt.objective.attn_entropy:
        set_attn_implementation(model, "eager")
    return model, ttt, feature_head
