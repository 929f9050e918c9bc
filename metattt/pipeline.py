"""Builds the objects a stage needs from a parsed recipe, and runs the stages."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from metattt.checkpointing import (
    AtomicCheckpointIO,
    DataPosition,
    PreemptionCheckpoint,
    StepSeeder,
    find_resumable_checkpoint,
)
from metattt.config import (
    DistillConfig,
    DrafterArgs,
    LoraArgs,
    MetaConfig,
    RunConfig,
    TargetConfig,
    TrainerConfig,
)
from metattt.distributed import make_strategy
from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig, is_ar_checkpoint
from metattt.models.drafter import BlockDrafter, DrafterConfig
from metattt.models.target import FrozenTarget
from metattt.progress import ProgressLines, has_terminal

log = logging.getLogger("metattt")

#: Where the embedded target ships (the tiny recipe's `target.path`).
SHIPPED_TARGET = "data/tiny_target"


def load_target(cfg: TargetConfig, num_draft_layers: int, heads_only: bool = False) -> FrozenTarget:
    """The frozen target; `heads_only`: just its embedding and LM head (training on cached features)."""
    from metattt.tiny import verify_shipped_target

    path = Path(cfg.path).expanduser()
    if path.resolve() == Path(SHIPPED_TARGET).resolve() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded target is missing at {path}: it ships with the project (restore it "
                                f"with `git checkout -- {SHIPPED_TARGET}`) or rebuild it with `make target`")
    verify_shipped_target(path)
    if heads_only:
        return FrozenTarget.load_heads_only(cfg.path, layer_ids=cfg.layer_ids, num_draft_layers=num_draft_layers,
                                            dtype=cfg.dtype)
    return FrozenTarget.from_pretrained(
        cfg.path, layer_ids=cfg.layer_ids, num_draft_layers=num_draft_layers,
        dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(mask_token)
    if tid is None or tid == tokenizer.unk_token_id or (isinstance(tid, int) and tid < 0):
        raise ValueError(
            f"the tokenizer has no mask token {mask_token!r}. The block drafter fills blocks with it. Add one "
            "(tokenizer.add_special_tokens({'additional_special_tokens': ['<|mask|>']}) and save), or set "
            "drafter.mask_token to a special token the tokenizer has."
        )
    return int(tid)


DRAFTER_KINDS = ("block", "autoregressive")


def load_drafter(path: str | Path, attn_implementation: str = "sdpa") -> BlockDrafter | ARDrafter:
    """A drafter folder of either kind, chosen by `architectures` in its config.json:
    ARCrossAttnDraftModel -> ARDrafter, anything else -> BlockDrafter (DFlash layout)."""
    if is_ar_checkpoint(path):
        return ARDrafter.from_pretrained(path, attn_implementation=attn_implementation)
    return BlockDrafter.from_pretrained(path, attn_implementation=attn_implementation)


def lora_target_modules(lora: LoraArgs, drafter) -> list[str] | None:
    """`lora.target_modules`, or (None) the drafter kind's default: the autoregressive drafter's
    `default_lora_targets`; None lets `add_lora` use the block drafter's."""
    return lora.target_modules or getattr(drafter, "default_lora_targets", None)


def build_drafter(args: DrafterArgs, target: FrozenTarget,
                  tokenizer: PreTrainedTokenizerBase) -> BlockDrafter | ARDrafter:
    if args.kind not in DRAFTER_KINDS:
        raise ValueError(f"drafter.kind={args.kind!r}: choose one of {DRAFTER_KINDS}")
    if args.init_from:
        drafter = load_drafter(args.init_from, attn_implementation=args.attn_implementation)
        cfg = drafter.config
        if cfg.hidden_size != target.hidden_size:
            raise ValueError(f"drafter {args.init_from} has width {cfg.hidden_size}, the target {target.hidden_size}")
        if list(cfg.target_layer_ids) != list(target.layer_ids):
            log.warning("using the drafter's target_layer_ids %s (recipe/target had %s)", cfg.target_layer_ids,
                        target.layer_ids)
            target.layer_ids = list(cfg.target_layer_ids)
        return drafter.attach_target(target)
    overrides = {
        k: v for k, v in dict(
            intermediate_size=args.intermediate_size, num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
        ).items() if v is not None
    }
    if args.kind == "autoregressive":
        try:  # kept in its config for a uniform interface; it drafts no mask tokens
            mask_id = resolve_mask_token_id(tokenizer, args.mask_token, target)
        except ValueError:
            mask_id = -1
        config = ARDrafterConfig.from_target(
            target.config, mask_token_id=mask_id, target_layer_ids=target.layer_ids,
            num_hidden_layers=args.num_hidden_layers, block_size=args.block_size,
            attn_implementation=args.attn_implementation, **overrides,
        )
        return ARDrafter(config).attach_target(target)
    config = DrafterConfig.from_target(
        target.config, mask_token_id=resolve_mask_token_id(tokenizer, args.mask_token, target),
        target_layer_ids=target.layer_ids, num_hidden_layers=args.num_hidden_layers,
        block_size=args.block_size, attn_implementation=args.attn_implementation, **overrides,
    )
    return BlockDrafter(config).attach_target(target)


def progress_callbacks(trainer: TrainerConfig, stage: str) -> list:
    """Log lines instead of the bar where there is no terminal to draw it on."""
    if trainer.enable_progress_bar and not has_terminal():
        return [ProgressLines(stage, trainer.progress_every_s)]
    return []


def make_trainer(run: RunConfig, trainer: TrainerConfig, stage: str, *, max_epochs: int, max_steps: int,
                 grad_clip: float | None, checkpoint_every_n_steps: int, val_check_interval=1.0,
                 limit_val_batches=1.0, accumulate_grad_batches: int = 1, monitor: str | None = None,
                 extra_callbacks: list | None = None, inference_mode: bool = True) -> L.Trainer:
    """The Trainer of one stage, writing to `{out}/{stage}/`.

    Scale-out (see metattt.distributed and metattt.checkpointing): `trainer.strategy` ddp / fsdp
    (shards only the frozen target) / auto (ddp when more than one process); Slurm and torchrun are
    detected by Lightning; SIGUSR1 checkpoints at the next batch, requeues a Slurm job and exits (75).
    Checkpoints are atomic (`last.ckpt` + `last.prev.ckpt`), carry the data position, and the global
    RNGs are reseeded from the step, so a resumed run ends where an uninterrupted one does.
    """
    stage_dir = run.out_dir / stage
    ckpt_dir = stage_dir / "checkpoints"
    callbacks = [
        # enable_version_counter=False: overwrite last.ckpt (never last-v1.ckpt, which resume would not prefer)
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=checkpoint_every_n_steps,
                        save_top_k=1 if monitor else 0, monitor=monitor, save_on_train_epoch_end=True,
                        enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        DataPosition(),
        StepSeeder(run.seed),
        PreemptionCheckpoint(ckpt_dir),
        *progress_callbacks(trainer, stage),
        *(extra_callbacks or []),
    ]
    return L.Trainer(
        default_root_dir=stage_dir,
        logger=TensorBoardLogger(save_dir=str(stage_dir), name="tb"),
        callbacks=callbacks,
        max_epochs=max_epochs,
        max_steps=max_steps,
        gradient_clip_val=grad_clip,
        val_check_interval=val_check_interval,
        # an int interval counts optimizer steps across epochs, so it may exceed one epoch's batches
        check_val_every_n_epoch=None if isinstance(val_check_interval, int) else 1,
        limit_val_batches=limit_val_batches,
        accumulate_grad_batches=accumulate_grad_batches,
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=make_strategy(trainer.strategy, trainer.accelerator, trainer.devices, trainer.num_nodes,
                               find_unused_parameters=stage == "meta"),
        precision=trainer.precision,
        log_every_n_steps=trainer.log_every_n_steps,
        enable_progress_bar=trainer.enable_progress_bar and has_terminal(),
        deterministic=trainer.deterministic,
        plugins=[AtomicCheckpointIO(), *_cluster_plugins()],
        inference_mode=inference_mode,
    )


def _cluster_plugins() -> list:
    """In a Slurm job (not under torchrun): Lightning's SLURMEnvironment without its own SIGUSR1
    handler, since `PreemptionCheckpoint` does checkpoint + requeue at a batch boundary instead."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def fit_resuming(trainer: L.Trainer, module: L.LightningModule, dm, run: RunConfig, stage: str) -> None:
    """`trainer.fit`, from the stage's newest good checkpoint when `run.resume` and one exists."""
    ckpt = find_resumable_checkpoint(run.out_dir / stage / "checkpoints") if run.resume else None
    if ckpt:
        log.info("resuming %s from %s", {"distill": "distillation", "meta": "meta-training"}.get(stage, stage), ckpt)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)


def build_datamodule(data_kwargs: dict, tokenizer: PreTrainedTokenizerBase, seed: int, block_size: int):
    """The DataModule, set up and checked: every kept sequence has room for at least one block."""
    from metattt.data.datamodule import SequenceDataModule

    kwargs = dict(data_kwargs)
    kwargs.setdefault("seed", seed)
    kwargs["min_length"] = max(kwargs.get("min_length") or 0, block_size + 1)
    if kwargs.get("max_length", block_size + 1) < block_size + 1:
        raise ValueError(f"data.max_length={kwargs['max_length']} cannot hold one block: it needs at least "
                         f"drafter.block_size + 1 = {block_size + 1} tokens")
    dm = SequenceDataModule(tokenizer=tokenizer, **kwargs)
    try:
        dm.setup("fit")
    except ValueError as e:
        raise ValueError(f"{e}. Sequences shorter than drafter.block_size + 1 = {block_size + 1} tokens hold "
                         "no block and are dropped.") from e
    return dm


def run_distill(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, data: dict,
                trainer_cfg: TrainerConfig, distill: DistillConfig) -> Path:
    """Distill a drafter and export it to `{out}/drafter/` (DFlash layout). Returns that folder."""
    from metattt.lit.distill import DistillModule

    if distill.kl_weight > 0 and data.get("feature_cache"):
        raise ValueError("distill.kl_weight > 0 needs the target's own next-token distributions, which the "
                         "feature cache does not hold: unset data.feature_cache or set distill.kl_weight=0")
    L.seed_everything(run.seed, workers=True)
    # with cached features the target never runs: only the embedding and head the drafter borrows
    target = load_target(target_cfg, drafter_args.num_hidden_layers,
                         heads_only=bool(data.get("feature_cache")))
    tokenizer = load_tokenizer(target_cfg.path)
    drafter = build_drafter(drafter_args, target, tokenizer)
    dm = build_datamodule(data, tokenizer, run.seed, drafter.config.block_size)
    check_feature_cache(dm, target)
    module = DistillModule(target, drafter, lr=distill.lr, weight_decay=distill.weight_decay,
                           warmup_ratio=distill.warmup_ratio, num_anchors=distill.num_anchors,
                           gamma=distill.gamma, seed=run.seed, kl_weight=distill.kl_weight)
    trainer = make_trainer(run, trainer_cfg, "distill", max_epochs=distill.max_epochs, max_steps=distill.max_steps,
                           grad_clip=distill.grad_clip, checkpoint_every_n_steps=distill.checkpoint_every_n_steps,
                           val_check_interval=distill.val_check_interval, limit_val_batches=distill.limit_val_batches,
                           accumulate_grad_batches=distill.accumulate_grad_batches)
    fit_resuming(trainer, module, dm, run, "distill")
    out = run.out_dir / "drafter"
    if trainer.is_global_zero:
        module.drafter.save_pretrained(out)
        log.info("drafter written to %s", out)
    return out


def run_meta_train(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, lora: LoraArgs,
                   data: dict, trainer_cfg: TrainerConfig, distill: DistillConfig, meta: MetaConfig) -> Path:
    """Meta-train a LoRA init on the distilled drafter; export a peft adapter to {out}/meta_lora/."""
    from metattt.lit.meta import MetaTrainModule
    from metattt.models.lora import add_lora, export_meta_lora
    from metattt.ttt.algorithms import ALGORITHMS

    if meta.algorithm not in ALGORITHMS:
        raise ValueError(f"meta.algorithm={meta.algorithm!r}: choose one of {ALGORITHMS}")
    if meta.algorithm == "reptile" and meta.inner_steps < 2:
        raise ValueError("reptile needs meta.inner_steps > 1 (with k = 1 it is joint training)")
    if meta.prequential and meta.algorithm != "maml":
        raise ValueError("meta.prequential needs meta.algorithm=maml")
    drafter_path = Path(meta.drafter_path) if meta.drafter_path else run.out_dir / "drafter"
    if not (drafter_path / "config.json").is_file():
        if meta.drafter_path:
            raise FileNotFoundError(f"meta.drafter_path={drafter_path} has no drafter (config.json)")
        log.info("no drafter at %s: distilling one first", drafter_path)
        run_distill(run, target_cfg, drafter_args, data, trainer_cfg, distill)
    L.seed_everything(run.seed, workers=True)
    target = load_target(target_cfg, drafter_args.num_hidden_layers,
                         heads_only=bool(data.get("feature_cache")))
    tokenizer = load_tokenizer(target_cfg.path)
    drafter = build_drafter(DrafterArgs(init_from=str(drafter_path), attn_implementation=drafter_args.attn_implementation),
                            target, tokenizer)
    S = drafter.config.block_size
    if meta.context_max < S + 1:
        raise ValueError(f"meta.context_max={meta.context_max} leaves no room for a block of {S} in the context")
    dm = build_datamodule(data, tokenizer, run.seed, 2 * S + 1)  # a block in the context and one after it
    check_feature_cache(dm, target)
    model = add_lora(drafter, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                     target_modules=lora_target_modules(lora, drafter), seed=run.seed)
    module = MetaTrainModule(target, model, meta, seed=run.seed)
    trainer = make_trainer(run, trainer_cfg, "meta", max_epochs=meta.max_epochs, max_steps=meta.max_steps,
                           grad_clip=None, checkpoint_every_n_steps=meta.checkpoint_every_n_steps,
                           val_check_interval=meta.val_check_interval, limit_val_batches=meta.limit_val_batches,
                           inference_mode=False)
    fit_resuming(trainer, module, dm, run, "meta")
    out = run.out_dir / "meta_lora"
    if trainer.is_global_zero:
        base_path = drafter_path
        if meta.update_base:
            base_path = run.out_dir / "meta_drafter"
            model.get_base_model().save_pretrained(base_path)
        extra = {"feature_head.weight": module.feature_head.weight} if module.feature_head is not None else None
        export_meta_lora(model, out, module.ttt_config(), base_path, extra=extra, algorithm=meta.algorithm,
                         global_step=trainer.global_step)
        log.info("meta-learned LoRA init written to %s", out)
    return out


def _zero_init_lora(drafter_path: Path, target: FrozenTarget, lora_config, seed: int) -> dict:
    """peft's fresh LoRA init (A random, B = 0) for the same adapter layout, by parameter name."""
    from peft import get_peft_model

    fresh = load_drafter(drafter_path).attach_target(target)
    cfg = lora_config.__class__(**{k: v for k, v in lora_config.to_dict().items() if k in lora_config.__dataclass_fields__})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(fresh, cfg)
    from metattt.models.lora import copy_lora

    return copy_lora(model)


def run_eval(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, lora: LoraArgs,
             trainer_cfg: TrainerConfig, cfg) -> dict | None:
    """Evaluate static / TTT-zero / TTT-meta drafters; write {out}/eval/report.{json,md} + plots."""
    from torch.utils.data import DataLoader

    from metattt.evaluate import condition_plan, load_prompts
    from metattt.lit.eval import EvalModule

    L.seed_everything(run.seed, workers=True)
    stack = load_eval_stack(run, target_cfg, drafter_args, lora, cfg.drafter_path, cfg.meta_lora_path)
    target, tokenizer, model, ttt = stack["target"], stack["tokenizer"], stack["model"], stack["ttt"]
    inits, feature_head, drafter_path, meta_path = (stack["inits"], stack["feature_head"], stack["drafter_path"],
                                                    stack["meta_path"])
    has_meta = meta_path is not None
    if not has_meta and any(c in ("ttt_meta", "meta_static") for c in cfg.conditions):
        log.warning("no meta-learned LoRA found: skipping conditions ttt_meta/meta_static")
        cfg = cfg.__class__(**{**cfg.__dict__, "conditions": [
            c for c in cfg.conditions if c not in ("ttt_meta", "meta_static")]})
    plan = condition_plan(cfg, ttt)

    prompts = []
    for split, files in cfg.splits.items():
        for ids in load_prompts(files, tokenizer, cfg.prompt_len, cfg.num_prompts, run.seed):
            prompts.append({"split": split, "uid": len(prompts), "prompt": ids})
    eos = tokenizer.eos_token_id
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run.out_dir / "eval"
    meta = {"recipe": run.name, "drafter": str(drafter_path), "meta_lora": str(meta_path) if has_meta else None,
            "drafter_kind": getattr(model.config, "kind", "block"),
            "block_size": model.config.block_size, "prompt_len": cfg.prompt_len,
            "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
            "rule": cfg.rule if cfg.temperature > 0 else "greedy", "ttt_steps": ttt.steps if cfg.ttt_steps is None
            else cfg.ttt_steps, "device": "cpu" if trainer_cfg.accelerator == "cpu" else trainer_cfg.accelerator}
    module = EvalModule(target, model, plan, inits, cfg, list(cfg.splits), eos, run.seed, out_dir, meta, feature_head,
                        warmup_prompt=prompts[0]["prompt"] if prompts else None)
    trainer = L.Trainer(
        default_root_dir=out_dir, logger=TensorBoardLogger(save_dir=str(out_dir), name="tb"),
        accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy, enable_progress_bar=trainer_cfg.enable_progress_bar and has_terminal(),
        callbacks=progress_callbacks(trainer_cfg, "eval"),
        inference_mode=False,  # prefill TTT takes gradients
        use_distributed_sampler=False,  # prompts are sharded below: no padding duplicates
        enable_model_summary=False,
    )

    class _Shard(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(range(trainer.global_rank, len(prompts), trainer.world_size))

        def __getitem__(self, i: int) -> dict:
            return prompts[trainer.global_rank + i * trainer.world_size]

    trainer.test(module, dataloaders=DataLoader(_Shard(), batch_size=None))
    if trainer.is_global_zero:
        log.info("evaluation report written to %s", out_dir / "report.md")
    return module.summary


# --- real models: mask token, data preparation, hidden-state cache -------------------------------


def resolve_mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str, target: FrozenTarget) -> int:
    """`mask_token`'s id; if the tokenizer lacks it but the target's embedding has rows past the
    tokenizer's vocabulary (Qwen3: 151,669 tokens, 151,936 rows), the first such row — an untrained
    row, which is what DFlash drafters for Qwen3 use as their mask (`dflash_config.mask_token_id`)."""
    try:
        return mask_token_id(tokenizer, mask_token)
    except ValueError:
        rows = getattr(target.embed_tokens, "num_embeddings", 0)
        if len(tokenizer) < rows:
            log.warning("the tokenizer has no %r: the drafter's mask is embedding row %d, the first past the "
                        "tokenizer's %d tokens", mask_token, len(tokenizer), len(tokenizer))
            return len(tokenizer)
        raise


def check_feature_cache(dm, target: FrozenTarget) -> None:
    """With `data.feature_cache`, the cache must hold the layers the target taps."""
    cache = dm.features() if hasattr(dm, "features") else None
    if cache is not None:
        cache.check(target.layer_ids, target.hidden_size * len(target.layer_ids))
        log.info("reading target features from the cache %s (%d sequences): the target is not run",
                 cache.path, len(cache))


def run_prepare(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, data: dict, prepare) -> dict:
    """Chat data → (target-regenerated) tokenized Arrow folders in `prepare.output_dir` (default
    {out}/data/{train,validation}); then, with `prepare.cache_features`, the hidden-state cache of the
    `data` section's sequences in `data.feature_cache`. Reruns reuse finished work."""
    from metattt.data.feature_cache import write_feature_cache
    from metattt.data.prepare import prepare_chat_data

    if not (prepare.train_files or prepare.val_files or prepare.cache_features):
        raise ValueError("prepare has nothing to do: set prepare.train_files (chat data to tokenize) and/or "
                         "prepare.cache_features=true (with data.feature_cache)")
    if prepare.cache_features and not data.get("feature_cache"):
        raise ValueError("prepare.cache_features=true needs data.feature_cache: <folder> (where the cache goes)")
    target: FrozenTarget | None = None

    def get_target() -> FrozenTarget:
        nonlocal target
        if target is None:
            target = load_target(target_cfg, drafter_args.num_hidden_layers)
            if torch.cuda.is_available():
                target.to("cuda")
        return target

    tokenizer = load_tokenizer(target_cfg.path)
    result: dict = {}
    if prepare.train_files or prepare.val_files:
        out_dir = prepare_output_dir(run, prepare)
        if prepare.records == "text":
            result["data"] = prepare_text_continuations(prepare, tokenizer, out_dir, lambda: get_target().model,
                                                        str(target_cfg.path), run.seed)
        else:
            result["data"] = prepare_chat_data(prepare, tokenizer, out_dir, data.get("chat_template_kwargs"),
                                               load_model=lambda: get_target().model)
    if prepare.cache_features:
        kwargs = {k: v for k, v in data.items() if k != "feature_cache"}
        dm = build_datamodule(kwargs, tokenizer, run.seed, drafter_args.block_size)
        t = get_target()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        result["feature_cache"] = {}
        for split, ds in (("train", dm.train_dataset), ("validation", dm.val_dataset)):
            if ds is not None and len(ds):
                result["feature_cache"][split] = write_feature_cache(
                    t, ds, data["feature_cache"], dtype=prepare.cache_dtype, batch_size=prepare.cache_batch_size,
                    shard_bytes=prepare.cache_shard_mb << 20, target_name=str(target_cfg.path), pad_id=pad,
                    progress=True)
    return result


def prepare_output_dir(run: RunConfig, prepare) -> Path:
    return Path(prepare.output_dir) if prepare.output_dir else run.out_dir / "data"


def prepare_text_continuations(prepare, tokenizer, out_dir: Path, load_model, model_name: str, seed: int) -> dict:
    """`prepare.records: text`: train (and validation) folders of prompts continued by the target."""
    from metattt.data.continuations import prepare_continuations

    if prepare.regenerate != "transformers":
        raise ValueError("prepare.records=text continues prompts with the local target: set "
                         "prepare.regenerate=transformers")
    if prepare.greedy_fraction < 1.0 and prepare.temperature <= 0:
        raise ValueError("prepare.greedy_fraction < 1 samples the other prompts: set prepare.temperature > 0")
    manifests = {}
    for split, files, limit in (("train", prepare.train_files, prepare.max_records),
                                ("validation", prepare.val_files, prepare.max_val_records or prepare.max_records)):
        if files:
            manifests[split] = prepare_continuations(
                files, out_dir / split, tokenizer, load_model, prompt_lens=prepare.text_prompt_lens,
                windows_per_doc=prepare.windows_per_doc, max_new_tokens=prepare.max_new_tokens,
                greedy_fraction=prepare.greedy_fraction, temperature=prepare.temperature, max_records=limit,
                seed=seed + (split == "validation"), batch_size=prepare.generate_batch_size, model_name=model_name,
                overwrite=prepare.overwrite)
    return manifests


# --- draft-guided decoding on context-learning tasks (metattt.guided) ---------------------------------
def load_eval_stack(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, lora: LoraArgs,
                    drafter_path: str | None, meta_lora_path: str | None) -> dict:
    """What eval and guided-eval load: the target, its tokenizer,
    the peft-wrapped drafter, the exported TTT config, the LoRA inits ("zero", and "meta" when a
    meta-learned adapter exists) and the learned feature head (or None)."""
    from metattt.losses import default_gamma
    from metattt.models.lora import adapter_base_drafter, add_lora, copy_lora, load_ttt_adapter
    from metattt.ttt.tasks import TTTConfig

    meta_path = Path(meta_lora_path) if meta_lora_path else run.out_dir / "meta_lora"
    has_meta = (meta_path / "adapter_config.json").is_file()
    # by default the adapter's base (the meta-trained drafter when update_base was on), else {out}/drafter
    path = Path(drafter_path) if drafter_path else \
        (adapter_base_drafter(meta_path) if has_meta else None) or run.out_dir / "drafter"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no drafter at {path}: run `make distill` (and `make meta-train`) first")
    target = load_target(target_cfg, drafter_args.num_hidden_layers)
    tokenizer = load_tokenizer(target_cfg.path)
    drafter = build_drafter(DrafterArgs(init_from=str(path)), target, tokenizer)
    feature_head = None
    if has_meta:
        model, ttt, feature_head = load_ttt_adapter(drafter, meta_path)
    else:
        model = add_lora(drafter, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                         target_modules=lora_target_modules(lora, drafter), seed=run.seed)
        ttt = TTTConfig(gamma=default_gamma(drafter.config.block_size))
    inits = {"zero": _zero_init_lora(path, target, model.peft_config["default"], run.seed)}
    if has_meta:
        inits["meta"] = copy_lora(model)
    return dict(target=target, tokenizer=tokenizer, model=model, ttt=ttt, inits=inits, feature_head=feature_head,
                drafter_path=path, meta_path=meta_path if has_meta else None)


def run_guided_eval(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, lora: LoraArgs,
                    trainer_cfg: TrainerConfig, cfg) -> list[dict]:
    """Draft-guided decoding on context-learning tasks: category × temperature × α × TTT (+ null
    control); writes {out}/guided/report.{json,md}, accuracy_by_alpha.png and tasks.jsonl."""
    from metattt.clbench import make_judge, save_tasks
    from metattt.guided import load_guided_tasks, run_guided_matrix, write_guided_report
    from metattt.ttt.tasks import TTTConfig

    cfg.validate()
    L.seed_everything(run.seed, workers=True)
    judge = make_judge(cfg.judge, cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env, cfg.judge_timeout_s)
    tasks = load_guided_tasks(cfg, run.seed)
    s = load_eval_stack(run, target_cfg, drafter_args, lora, cfg.drafter_path, cfg.meta_lora_path)
    ttt = TTTConfig(**{**s["ttt"].__dict__})
    if cfg.ttt_steps is not None:
        ttt.steps = cfg.ttt_steps
    if cfg.ttt_lr is not None:
        ttt.lr, ttt.learned_lrs = cfg.ttt_lr, None
    init_name = cfg.ttt_init if cfg.ttt_init in s["inits"] else "zero"
    if init_name != cfg.ttt_init:
        log.warning("no meta-learned LoRA at %s: guided-eval starts TTT from the zero init",
                    Path(cfg.meta_lora_path) if cfg.meta_lora_path else run.out_dir / "meta_lora")
    use_cuda = trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    target, model = s["target"].to(device), s["model"].to(device)
    init = {n: t.to(device) for n, t in s["inits"][init_name].items()}
    feature_head = s["feature_head"].to(device) if s["feature_head"] is not None else None
    out_dir = run.out_dir / "guided"
    save_tasks(tasks, out_dir / "tasks.jsonl")
    log.info("guided-eval: %d tasks, %d questions, on %s", len(tasks), sum(len(t.questions) for t in tasks), device)
    records = run_guided_matrix(target, model, s["tokenizer"], tasks, cfg, init, ttt, judge, run.seed, feature_head)
    meta = {"recipe": run.name, "drafter": str(s["drafter_path"]), "meta_lora": str(s["meta_path"]),
            "lora_init": init_name, "tasks": cfg.tasks or f"synthetic {list(cfg.synthetic_categories)} (seed {run.seed})",
            "num_tasks": len(tasks), "alpha_rule": cfg.alpha_rule if cfg.alpha_rule == "fixed"
            else f"kl (kl_tau={cfg.kl_tau:g})", "ttt_steps": ttt.steps, "ttt_lr": ttt.lr,
            "max_new_tokens": cfg.max_new_tokens, "top_p": cfg.top_p, "judge": getattr(judge, "name", cfg.judge),
            "device": str(device)}
    rows = write_guided_report(records, out_dir, meta)
    log.info("guided-eval report written to %s", out_dir / "report.md")
    return rows


def run_sweep_stage(run: RunConfig, target_cfg: TargetConfig, drafter_args: DrafterArgs, lora: LoraArgs,
                    eval_cfg, cfg) -> list[dict]:
    """The TTT sweep (metattt.sweep) over the recipe's drafter and meta-learned adapter; {out}/sweep/."""
    from dataclasses import replace

    from metattt.models.lora import add_lora, copy_lora
    from metattt.sweep import PLACEMENTS, Arm, plan_for, run_sweep, sweep_prompts

    L.seed_everything(run.seed, workers=True)
    s = load_eval_stack(run, target_cfg, drafter_args, lora, eval_cfg.drafter_path, eval_cfg.meta_lora_path)
    model, target, tokenizer = s["model"], s["target"], s["tokenizer"]
    peft_cfg = model.peft_config["default"]
    rank, modules = int(peft_cfg.r), sorted(peft_cfg.target_modules)
    scale = float(peft_cfg.lora_alpha) / rank
    placement = next((n for n, m in PLACEMENTS.items() if sorted(m) == modules), "+".join(modules))
    default_arm = f"r{rank} {placement}"
    has_meta = "meta" in s["inits"]
    arms = [Arm(default_arm, model, s["inits"], plan_for(cfg, s["ttt"], has_meta, rank_arm=False))]
    available = {n.rsplit(".", 1)[-1] for n, _ in s["model"].get_base_model().named_modules()}
    layouts = [(r, modules) for r in cfg.ranks if r != rank]
    for name in cfg.placements:
        if name not in PLACEMENTS:
            raise ValueError(f"sweep.placements: unknown {name!r}; choose from {list(PLACEMENTS)}")
        if sorted(PLACEMENTS[name]) == modules:
            continue
        if not set(PLACEMENTS[name]) <= available:
            log.warning("sweep: the drafter has no %s: placement %s left out", set(PLACEMENTS[name]) - available, name)
            continue
        layouts.append((rank, PLACEMENTS[name]))
    for r, mods in layouts:
        fresh = build_drafter(DrafterArgs(init_from=str(s["drafter_path"])), target, tokenizer)
        m = add_lora(fresh, r=r, alpha=max(1, round(scale * r)), target_modules=mods, seed=run.seed)
        name = f"r{r} {next((n for n, p in PLACEMENTS.items() if sorted(p) == sorted(mods)), '+'.join(mods))}"
        arms.append(Arm(name, m, {"zero": copy_lora(m)}, plan_for(cfg, s["ttt"], False, rank_arm=True)))
    prompts = sweep_prompts(eval_cfg, cfg, tokenizer, run.seed)
    ecfg = replace(eval_cfg, max_new_tokens=cfg.max_new_tokens, temperature=0.0, conditions=[])
    meta = {"recipe": run.name, "drafter": str(s["drafter_path"]), "meta_lora": str(s["meta_path"]),
            "default_arm": default_arm, "prompt_len": cfg.prompt_len or eval_cfg.prompt_len,
            "max_new_tokens": cfg.max_new_tokens, "prompts_per_split": cfg.num_prompts, "temperature": 0.0}
    log.info("TTT sweep: %d LoRA layouts, %d conditions, %d prompts", len(arms), sum(len(a.plan) for a in arms),
             len(prompts))
    return run_sweep(target, arms, prompts, ecfg, tokenizer.eos_token_id, run.seed, run.out_dir / "sweep", meta)
