"""The Lightning Trainer of every stage: checkpoints, resume, logging, progress, cluster plugins."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from metattt.checkpointing import (
    AtomicCheckpointIO,
    DataPosition,
    PreemptionCheckpoint,
    StepSeeder,
    find_resumable_checkpoint,
)
from metattt.config import RunConfig, TrainerConfig
from metattt.distributed import make_strategy
from metattt.progress import ProgressLines, has_terminal

log = logging.getLogger("metattt")


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
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        inference_mode=inference_mode,
    )


def cluster_plugins() -> list:
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


def eval_trainer(run_dir, trainer: TrainerConfig) -> L.Trainer:
    """The Trainer of an evaluation (a Lightning test loop, so DDP shards the prompts)."""
    from pathlib import Path

    out_dir = Path(run_dir)
    return L.Trainer(
        default_root_dir=out_dir, logger=TensorBoardLogger(save_dir=str(out_dir), name="tb"),
        accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
        strategy=trainer.strategy, enable_progress_bar=trainer.enable_progress_bar and has_terminal(),
        callbacks=progress_callbacks(trainer, "eval"),
        inference_mode=False,  # prefill TTT takes gradients
        use_distributed_sampler=False,  # prompts are sharded by the stage: no padding duplicates
        enable_model_summary=False,
    )
