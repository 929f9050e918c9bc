"""What the stages load from a recipe: the frozen target, its tokenizer, a drafter (new or from a
folder), the data, and — for evaluation and serving — the drafter with its meta-learned adapter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from metattt.config import DataConfig, DrafterConfig, LoraConfig, TargetConfig, TTTConfig
from metattt.data.tokenizer import load_tokenizer, mask_token_id
from metattt.errors import RecipeError
from metattt.export.meta_lora import adapter_base_drafter, load_ttt_adapter
from metattt.models.lora import add_lora, copy_lora
from metattt.models.registry import kind_named, kind_of, load_drafter
from metattt.models.target import FrozenTarget
from metattt.tiny import verify_shipped_target
from metattt.ttt.inner import ParamDict

log = logging.getLogger("metattt")

#: Where the embedded target ships (the tiny recipe's `target.path`).
SHIPPED_TARGET = "data/tiny_target"

__all__ = ["EvalStack", "SHIPPED_TARGET", "build_datamodule", "build_drafter", "check_feature_cache",
           "load_drafter", "load_eval_stack", "load_target", "load_tokenizer", "lora_targets", "zero_init_lora"]


def load_target(cfg: TargetConfig, num_draft_layers: int, heads_only: bool = False) -> FrozenTarget:
    """The frozen target; `heads_only`: just its embedding and LM head (training on cached features)."""
    path = Path(cfg.path).expanduser()
    if path.resolve() == Path(SHIPPED_TARGET).resolve() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded target is missing at {path}: it ships with the project (restore it "
                                f"with `git checkout -- {SHIPPED_TARGET}`) or rebuild it with `make target`")
    verify_shipped_target(path)
    if heads_only:
        return FrozenTarget.load_heads_only(cfg.path, layer_ids=cfg.layer_ids, num_draft_layers=num_draft_layers,
                                            dtype=cfg.dtype)
    return FrozenTarget.from_pretrained(cfg.path, layer_ids=cfg.layer_ids, num_draft_layers=num_draft_layers,
                                        dtype=cfg.dtype, attn_implementation=cfg.attn_implementation)


def build_drafter(cfg: DrafterConfig, target: FrozenTarget, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """A new drafter of `cfg.kind` sized from the target, or the one in `cfg.init_from`, with the
    target's embedding and head attached."""
    if cfg.init_from:
        drafter = load_drafter(cfg.init_from, attn_implementation=cfg.attn_implementation)
        dims = drafter.config
        if dims.hidden_size != target.hidden_size:
            raise ValueError(f"drafter {cfg.init_from} has width {dims.hidden_size}, the target {target.hidden_size}")
        if list(dims.target_layer_ids) != list(target.layer_ids):
            log.warning("using the drafter's target_layer_ids %s (recipe/target had %s)", dims.target_layer_ids,
                        target.layer_ids)
            target.layer_ids = list(dims.target_layer_ids)
        return drafter.attach_target(target)
    kind = kind_named(cfg.kind)
    rows = getattr(target.embed_tokens, "num_embeddings", None)
    try:
        mask_id = mask_token_id(tokenizer, cfg.mask_token, rows)
    except ValueError:
        if kind.drafts_with_mask_tokens:
            raise
        mask_id = -1  # kept in the config for a uniform interface; this kind drafts no mask tokens
    overrides = {k: v for k, v in dict(intermediate_size=cfg.intermediate_size,
                                       num_attention_heads=cfg.num_attention_heads,
                                       num_key_value_heads=cfg.num_key_value_heads,
                                       head_dim=cfg.head_dim).items() if v is not None}
    dims = kind.config_class.from_target(target.config, mask_token_id=mask_id, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=cfg.num_hidden_layers, block_size=cfg.block_size,
                                         attn_implementation=cfg.attn_implementation, **overrides)
    return kind.model_class(dims).attach_target(target)


def lora_targets(lora: LoraConfig, drafter: nn.Module) -> list[str]:
    """`lora.target_modules`, or (None) the drafter kind's default."""
    return list(lora.target_modules or kind_of(drafter).default_lora_targets)


def build_datamodule(data: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, block_size: int):
    """The DataModule, set up and checked: every kept sequence has room for at least one block."""
    from dataclasses import asdict

    from metattt.data.datamodule import SequenceDataModule

    kwargs = asdict(data)
    kwargs["min_length"] = max(kwargs.get("min_length") or 0, block_size + 1)
    if data.max_length < block_size + 1:
        raise ValueError(f"data.max_length={data.max_length} cannot hold one block: it needs at least "
                         f"drafter.block_size + 1 = {block_size + 1} tokens")
    if not data.train_files:
        raise ValueError("data.train_files is not set: point it at the training data (or run `prepare` first)")
    dm = SequenceDataModule(tokenizer=tokenizer, seed=seed, **kwargs)
    try:
        dm.setup("fit")
    except ValueError as e:
        if dm.num_too_short.get("train"):  # some had a trained token, but no room for a block
            raise ValueError(f"{e}, and min_length is at least drafter.block_size + 1 = {block_size + 1} (a shorter "
                             "sequence holds no block): use longer records or a smaller drafter.block_size") from e
        raise
    return dm


def check_feature_cache(dm, target: FrozenTarget) -> None:
    """With `data.feature_cache`, the cache must hold the layers the target taps."""
    cache = dm.features() if hasattr(dm, "features") else None
    if cache is not None:
        cache.check(target.layer_ids, target.hidden_size * len(target.layer_ids))
        log.info("reading target features from the cache %s (%d sequences): the target is not run",
                 cache.path, len(cache))


def zero_init_lora(drafter_path: Path, target: FrozenTarget, lora_config, seed: int) -> ParamDict:
    """peft's fresh LoRA init (A random, B = 0) for the same adapter layout, by parameter name."""
    from peft import get_peft_model

    fresh = load_drafter(drafter_path).attach_target(target)
    cfg = lora_config.__class__(**{k: v for k, v in lora_config.to_dict().items()
                                   if k in lora_config.__dataclass_fields__})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(fresh, cfg)
    return copy_lora(model)


@dataclass
class EvalStack:
    """What evaluation, guided decoding, the sweep and serving load."""

    target: FrozenTarget
    tokenizer: PreTrainedTokenizerBase
    model: nn.Module  # the peft-wrapped drafter (the meta-learned adapter loaded when there is one)
    ttt: TTTConfig  # the exported TTT settings (defaults without an adapter)
    inits: dict[str, ParamDict]  # "zero" (peft's fresh init) and, with an adapter, "meta"
    feature_head: nn.Module | None
    drafter_path: Path
    meta_path: Path | None  # None: no meta-learned adapter


def load_eval_stack(out_dir: Path, target_cfg: TargetConfig, drafter_cfg: DrafterConfig, lora: LoraConfig,
                    drafter_path: str | None, meta_lora_path: str | None, seed: int,
                    section: str = "eval") -> EvalStack:
    """The target, its tokenizer, the drafter with its meta-learned adapter (`meta_lora_path`, default
    `{out}/meta_lora`) or fresh LoRA, the exported TTT settings and the LoRA inits.

    By default the drafter is the adapter's base (the meta-trained drafter when meta-training
    updated the base), else `{out}/drafter`. A path given explicitly (`{section}.meta_lora_path`,
    `{section}.drafter_path`) must hold what it names; only the default adapter location may be
    empty (then there is no meta-learned init, and the conditions that need one are left out).
    """
    meta_path = Path(meta_lora_path) if meta_lora_path else out_dir / "meta_lora"
    has_meta = (meta_path / "adapter_config.json").is_file()
    if meta_lora_path and not has_meta:
        raise RecipeError(f"{section}.meta_lora_path={meta_lora_path}: no peft adapter there (no adapter_config.json): "
                          "point it at a folder `metattt meta-train` wrote (<run>/meta_lora/), or leave it unset "
                          f"to use {out_dir / 'meta_lora'} when it exists")
    if not has_meta:
        log.info("no meta-learned adapter at %s: evaluating without a meta-learned init", meta_path)
    path = Path(drafter_path) if drafter_path else \
        (adapter_base_drafter(meta_path) if has_meta else None) or out_dir / "drafter"
    if drafter_path and not (path / "config.json").is_file():
        raise RecipeError(f"{section}.drafter_path={drafter_path}: no drafter there (no config.json): point it at "
                          "a drafter folder (`metattt distill` writes <run>/drafter/), or leave it unset")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no drafter at {path}: run `make distill` (and `make meta-train`) first")
    target = load_target(target_cfg, drafter_cfg.num_hidden_layers)
    tokenizer = load_tokenizer(target_cfg.path)
    drafter = build_drafter(DrafterConfig(init_from=str(path)), target, tokenizer)
    feature_head = None
    if has_meta:
        model, ttt, feature_head = load_ttt_adapter(drafter, meta_path)
    else:
        model = add_lora(drafter, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=lora_targets(lora, drafter), seed=seed)
        ttt = TTTConfig()
    inits = {"zero": zero_init_lora(path, target, model.peft_config["default"], seed)}
    if has_meta:
        inits["meta"] = copy_lora(model)
    return EvalStack(target, tokenizer, model, ttt, inits, feature_head, path, meta_path if has_meta else None)
