"""Stage 3: evaluation as a Lightning test loop, so DDP shards the prompts. Thin: the work is
in metattt.eval.speculative; τ and per-position acceptance are torchmetrics that sync across ranks."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
from torch import nn

from metattt.config import EvalConfig, TTTConfig
from metattt.eval.speculative import evaluate_prompt, write_report
from metattt.spec.metrics import AcceptanceLength, PerPositionAcceptance
from metattt.ttt.inner import ParamDict


def metric_key(split: str, condition: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", f"{split}__{condition}")


class EvalModule(L.LightningModule):
    def __init__(self, target: nn.Module, drafter: nn.Module, plan: list[tuple[str, TTTConfig | None]],
                 inits: dict[str, ParamDict], cfg: EvalConfig, splits: list[str], eos_token_id, seed: int,
                 out_dir: Path, meta: dict | None = None, feature_head: nn.Module | None = None,
                 warmup_prompt: list[int] | None = None):
        super().__init__()
        self.target, self.drafter, self.feature_head = target, drafter, feature_head
        self.plan, self.inits, self.cfg, self.eos, self.seed = plan, inits, cfg, eos_token_id, seed
        self.out_dir, self.meta = Path(out_dir), dict(meta or {})
        S = drafter.config.block_size
        keys = [metric_key(s, label) for s in splits for label, _ in plan if label != "target"]
        self.tau = nn.ModuleDict({k: AcceptanceLength() for k in keys})
        self.by_position = nn.ModuleDict({k: PerPositionAcceptance(S) for k in keys})
        self.records: list[dict] = []
        self.summary: dict | None = None
        self.warmup_prompt = warmup_prompt

    def on_test_start(self) -> None:
        """One short untimed generation of every condition first, so no condition's timing pays
        for first-call costs (allocator growth, kernel selection, lazy imports)."""
        if self.warmup_prompt:
            evaluate_prompt(self.target, self.drafter, self.warmup_prompt, self.plan, self.inits, self.cfg, self.eos,
                            seed=self.seed, feature_head=self.feature_head, max_new_tokens=min(16, self.cfg.max_new_tokens))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        uid = int(batch["uid"])
        recs = evaluate_prompt(self.target, self.drafter, batch["prompt"], self.plan, self.inits, self.cfg,
                               self.eos, seed=self.seed * 1_000_003 + uid, feature_head=self.feature_head,
                               order_offset=uid)
        for r in recs:
            r.update(split=batch["split"], prompt=uid)
            if r["condition"] != "target" and r["accepted"]:
                key = metric_key(batch["split"], r["condition"])
                self.tau[key].update(r["accepted"])
                self.by_position[key].update(r["accepted"])
        self.records.extend(recs)

    def on_test_epoch_end(self) -> None:
        for key, metric in self.tau.items():
            tau = metric.compute()  # synced over ranks
            if not torch.isnan(tau):
                self.log(f"tau/{key}", tau, rank_zero_only=True)
                rates = self.by_position[key].compute()["marginal"]
                for k, rate in enumerate(rates.tolist(), start=1):
                    self.log(f"acceptance_{key}/pos{k:02d}", rate, rank_zero_only=True)
        records = self.records
        if self.trainer.world_size > 1:
            gathered: list[list[dict]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, self.records)
            records = [r for part in gathered for r in part]
        if self.trainer.is_global_zero:
            records.sort(key=lambda r: (r["split"], r["prompt"]))
            self.meta["world_size"] = self.trainer.world_size
            self.summary = write_report(records, self.out_dir, self.meta)
            logger = self.logger
            if logger is not None and hasattr(logger, "experiment"):
                logger.experiment.add_text("report", (self.out_dir / "report.md").read_text(), self.global_step)
