"""Stage 2: meta-train the drafter's LoRA initialization. Thin: the math is in metattt.ttt."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from metattt.checkpointing import step_generator
from metattt.config import MetaConfig, TTTConfig
from metattt.errors import RecipeError
from metattt.lit.distill import FrozenTargetCheckpointing
from metattt.metrics import BlockAccuracy
from metattt.models.base import set_attn_implementation
from metattt.models.lora import lora_parameters
from metattt.models.target import FrozenTarget
from metattt.ttt.meta import MetaBatchResult, meta_batch
from metattt.ttt.tasks import make_tasks

log = logging.getLogger("metattt")


class MetaTrainModule(FrozenTargetCheckpointing, L.LightningModule):
    def __init__(self, target: FrozenTarget, drafter: nn.Module, cfg: MetaConfig, seed: int = 0):
        """`drafter`: the peft-wrapped drafter; its LoRA tensors are the initialization φ."""
        super().__init__()
        self.automatic_optimization = False  # one backward of the meta loss; reptile-style grads too
        self.target = target
        self.drafter = drafter
        self.cfg = cfg
        self.seed = seed
        self.block_size = drafter.config.block_size
        self.gamma = cfg.ttt.gamma_for(self.block_size)
        self.objective = cfg.ttt.objective
        online = cfg.ttt.online
        if online.enabled and online.window < self.block_size:
            raise RecipeError(f"meta.ttt.online.window={online.window}: an online update trains on blocks of "
                              f"{self.block_size} tokens inside the window; make it >= the block size")
        self.fast_names = list(lora_parameters(drafter))
        if not self.fast_names:
            raise ValueError("the drafter carries no LoRA tensors: wrap it with metattt.models.lora.add_lora")
        for name, p in drafter.named_parameters():
            p.requires_grad_(name in self.fast_names or (cfg.update_base and "lora_" not in name))
        if cfg.algorithm == "maml" or cfg.ttt.objective.attn_entropy:
            # Double backward does not pass through the fused SDPA kernels; plain matmul/softmax does.
            set_attn_implementation(drafter, "eager")
            log.info("meta-train: drafter attention switched to eager (%s)",
                     "second-order gradients" if cfg.algorithm == "maml" else "attention entropy")
        if cfg.ttt.objective.attn_entropy:
            for m in drafter.modules():
                if hasattr(m, "track_entropy"):
                    m.track_entropy = True
        # Meta-SGD lrs are learned as logs: exp keeps every inner lr positive whatever the outer
        # optimizer does (a negative lr makes TTT ascend its loss); `inner_lrs` is the lrs themselves
        self.log_inner_lrs = nn.Parameter(torch.full((len(self.fast_names),), math.log(cfg.ttt.lr))) \
            if cfg.learn_inner_lr else None
        H = drafter.config.hidden_size
        self.feature_head = nn.Linear(H, H, bias=False) if cfg.ttt.objective.feature else None
        self.before_acc = BlockAccuracy(self.block_size)
        self.after_acc = BlockAccuracy(self.block_size)
        self.val_before_acc = BlockAccuracy(self.block_size)
        self.val_after_acc = BlockAccuracy(self.block_size)
        self.skipped_total = 0
        self.skipped_steps = 0  # outer steps not applied: their meta-gradient was not finite

    # --- pieces ---------------------------------------------------------------------------------
    def _generator(self, batch_idx: int, stage: str) -> torch.Generator:
        return step_generator(self.seed, self.global_step if stage == "train" else batch_idx, self.global_rank, stage)

    @property
    def inner_lrs(self) -> torch.Tensor | None:
        """The learned per-tensor inner lrs (Meta-SGD), > 0 by construction; None without learn_inner_lr."""
        return None if self.log_inner_lrs is None else self.log_inner_lrs.exp()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints from before the log-parametrization hold the lrs themselves
        state = checkpoint.get("state_dict", {})
        if "inner_lrs" in state and "log_inner_lrs" not in state:
            old = state.pop("inner_lrs")
            if not bool((old > 0).all()):
                raise RecipeError("the meta-training checkpoint being resumed holds learned inner lrs <= 0 "
                                  f"({old.min().item():.3g}), which make TTT ascend its loss: start afresh with "
                                  "--run.resume=false")
            state["log_inner_lrs"] = old.log()

    @property
    def clip(self) -> float | None:
        clip = self.cfg.ttt.clip
        return clip if clip is not None and clip > 0 else None

    def inner_lr(self) -> float | dict[str, torch.Tensor]:
        warm = self.cfg.inner_lr_warmup_steps
        factor = min(1.0, (self.global_step + 1) / warm) if warm > 0 and self.training else 1.0
        if self.inner_lrs is None:
            return self.cfg.ttt.lr * factor
        return {n: self.inner_lrs[i] * factor for i, n in enumerate(self.fast_names)}

    def ttt_config(self) -> TTTConfig:
        learned = None
        if self.inner_lrs is not None:
            learned = dict(zip(self.fast_names, self.inner_lrs.detach().cpu().tolist()))
        return TTTConfig(**{**self.cfg.ttt.__dict__, "learned_lrs": learned, "gamma": self.gamma,
                            "clip": self.clip})

    def _meta(self, batch: dict, batch_idx: int, stage: str, algorithm: str, score_before: bool = True
              ) -> MetaBatchResult:
        if "features" in batch:  # offline hidden-state cache (data.feature_cache)
            features = batch["features"]  # (B, T, n·H)
        else:
            features = self.target(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   return_logits=False).features  # (B, T, n·H)
        g = self._generator(batch_idx, stage)
        tasks = make_tasks(batch, features, self.cfg.context_min, self.cfg.context_max, self.block_size, g,
                           self.cfg.context)
        phi = {n: p for n, p in self.drafter.named_parameters() if n in self.fast_names}
        return meta_batch(
            self.drafter, phi, tasks, algorithm=algorithm, steps=self.cfg.ttt.steps, lr=self.inner_lr(),
            clip=self.clip, inner_anchors=self.cfg.ttt.num_anchors,
            outer_anchors=self.cfg.outer_anchors, objective=self.objective, gamma=self.gamma, generator=g,
            prequential=self.cfg.prequential, checkpoint=self.cfg.checkpoint_inner_steps,
            feature_head=self.feature_head, batched=self.cfg.batch_tasks, score_before=score_before,
            online=self.cfg.ttt.online,
        )

    def _log_result(self, res: MetaBatchResult, stage: str, before: BlockAccuracy, after: BlockAccuracy) -> None:
        if not res.after:
            return
        n = len(res.after)
        # tensors, not .item(): the values stay on the device until Lightning writes them out
        a = torch.stack([x.loss.detach() for x in res.after]).mean()
        sync = stage == "val"
        self.log(f"{stage}/cont_loss_after", a, prog_bar=True, batch_size=n, sync_dist=sync)
        if res.before:  # scored on logging steps only: it costs a forward of its own
            b = torch.stack([x.loss for x in res.before]).mean()
            self.log(f"{stage}/cont_loss_before", b, batch_size=n, sync_dist=sync)
            self.log(f"{stage}/adapt_gain", b - a, prog_bar=True, batch_size=n, sync_dist=sync)
            # the same steps feed both accuracies, so before and after compare the same blocks
            for x in res.before:
                before.update(x.correct, x.weights > 0)
            for x in res.after:
                after.update(x.correct, x.weights > 0)
        if res.inner is not None and res.inner.shape[1]:
            for j, v in enumerate(res.inner.mean(0)):
                self.log(f"{stage}_inner_loss/step{j}", v, batch_size=n, sync_dist=sync)

    def _log_acc(self, stage: str, before: BlockAccuracy, after: BlockAccuracy) -> None:
        if before.total.sum() == 0:
            return
        rb, ra = before.compute(), after.compute()
        before.reset()
        after.reset()
        self.log(f"{stage}/cont_acc_before", rb["mean"])
        self.log(f"{stage}/cont_acc_after", ra["mean"], prog_bar=stage == "val")
        self.log(f"{stage}/tau_proxy_before", rb["tau_proxy"])
        self.log(f"{stage}/tau_proxy_after", ra["tau_proxy"])

    # --- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        # Lightning writes step metrics when (step + 1) % log_every_n_steps == 0; _log_acc below agrees
        logging_step = (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0
        res = self._meta(batch, batch_idx, "train", self.cfg.algorithm, score_before=logging_step)
        self.skipped_total += res.skipped
        self.log("train/skipped_tasks", float(self.skipped_total), batch_size=1)
        opt.zero_grad()
        if res.loss is not None:
            self.manual_backward(res.loss)
        elif self.trainer.world_size > 1:
            # a rank without a usable task still joins the gradient all-reduce (zero contribution)
            self.manual_backward(sum((p * 0).sum() for p in self.parameters() if p.requires_grad))
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # one read of the device per meta step; under DDP the gradients are already all-reduced, so
        # every rank takes the same branch
        if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                log.warning("meta step %d: the meta-gradient is not finite; the step is not applied "
                            "(train/skipped_steps counts them)", self.global_step)
            opt.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        self.clip_gradients(opt, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()  # always: params without a gradient are left alone, and the step counter moves on
        sched.step()
        self._log_result(res, "train", self.before_acc, self.after_acc)
        if self.inner_lrs is not None:
            lrs = self.inner_lrs.detach()
            self.log("inner_lr/mean", lrs.mean())
            self.log("inner_lr/min", lrs.min())
            self.log("inner_lr/max", lrs.max())
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_acc("train", self.before_acc, self.after_acc)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The inner loop needs gradients even here (first order: nothing is kept).
        algo = "fomaml" if self.cfg.algorithm != "reptile" else "reptile"
        with torch.enable_grad():
            res = self._meta(batch, batch_idx, "val", algo)
        self._log_result(res, "val", self.val_before_acc, self.val_after_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_acc("val", self.val_before_acc, self.val_after_acc)

    def configure_optimizers(self):
        groups = [{"params": [p for n, p in self.drafter.named_parameters() if p.requires_grad]}]
        if self.inner_lrs is not None:
            groups.append({"params": [self.log_inner_lrs], "weight_decay": 0.0})
        if self.feature_head is not None:
            groups.append({"params": list(self.feature_head.parameters())})
        opt = torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.95))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = get_cosine_schedule_with_warmup(opt, int(math.ceil(self.cfg.warmup_ratio * total)), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
