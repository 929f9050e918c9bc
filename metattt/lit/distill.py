"""Stage 1: distill a drafter from the frozen target. Thin: the math is in metattt.losses."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from metattt.anchors import sample_anchors, valid_anchor_mask
from metattt.checkpointing import step_generator
from metattt.config import default_gamma
from metattt.losses import block_prediction_loss
from metattt.metrics import BlockAccuracy
from metattt.models.target import FrozenTarget


class FrozenTargetCheckpointing:
    """Mixin: keep the frozen target's weights out of Lightning checkpoints.

    The target is reloaded from its own folder; checkpoints carry only what trains.
    """

    strict_loading = False

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("target.")]:
            del state[key]


class DistillModule(FrozenTargetCheckpointing, L.LightningModule):
    def __init__(
        self,
        target: FrozenTarget,
        drafter: nn.Module,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.04,
        num_anchors: int = 512,
        gamma: float | None = None,
        seed: int = 0,
        kl_weight: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= kl_weight <= 1.0:
            raise ValueError(f"distill.kl_weight must be in [0, 1] (0: CE only, 1: KL only), got {kl_weight}")
        self.kl_weight = kl_weight
        self.target = target
        self.drafter = drafter.attach_target(target)
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.num_anchors = num_anchors
        self.block_size = drafter.config.block_size
        self.gamma = gamma if gamma is not None else default_gamma(self.block_size)
        self.seed = seed
        self.train_acc = BlockAccuracy(self.block_size)
        self.val_acc = BlockAccuracy(self.block_size)
        self.save_hyperparameters(ignore=["target", "drafter"])

    def _step(self, batch: dict, batch_idx: int, stage: str):
        ids, attn, lmask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        final_hidden = None
        if "features" in batch:  # offline hidden-state cache (data.feature_cache)
            if self.kl_weight > 0:
                raise ValueError("distill.kl_weight > 0 needs the target's forward; the batch holds cached features")
            features = batch["features"]  # (B, T, n·H)
        else:
            out = self.target(ids, attention_mask=attn, return_logits=False, return_final_hidden=self.kl_weight > 0)
            features, final_hidden = out.features, out.final_hidden  # (B, T, n·H), (B, T, H) or None
        valid = valid_anchor_mask(lmask, attn, self.block_size)
        anchors, ok = sample_anchors(valid, self.num_anchors, step_generator(
            self.seed, self.global_step if stage == "train" else batch_idx, self.global_rank, stage))
        return block_prediction_loss(
            self.drafter, features, ids, attn, lmask, anchors, ok,
            self.block_size, self.drafter.config.mask_token_id, self.gamma,
            target_hidden=final_hidden, kl_weight=self.kl_weight,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._step(batch, batch_idx, "train")
        self.train_acc.update(out.correct, out.weights > 0)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if out.kl is not None:
            self.log_dict({"train/ce": out.ce, "train/kl": out.kl}, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (self.global_step % max(1, self.trainer.log_every_n_steps)) == 0:
            self._log_acc(self.train_acc, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._step(batch, batch_idx, "val")
        self.val_acc.update(out.correct, out.weights > 0)
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        if out.kl is not None:
            self.log_dict({"val/ce": out.ce, "val/kl": out.kl}, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def on_validation_epoch_end(self) -> None:
        self._log_acc(self.val_acc, "val")

    def _log_acc(self, metric: BlockAccuracy, stage: str) -> None:
        res = metric.compute()
        metric.reset()
        self.log(f"{stage}/acc", res["mean"], prog_bar=stage == "val", sync_dist=False)
        self.log(f"{stage}/tau_proxy", res["tau_proxy"], prog_bar=True, sync_dist=False)
        for k, acc in enumerate(res["per_position"].tolist(), start=1):
            self.log(f"{stage}_acc_by_position/pos{k:02d}", acc, sync_dist=False)

    def configure_optimizers(self):
        params = [p for p in self.drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_schedule_with_warmup(opt, int(self.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
