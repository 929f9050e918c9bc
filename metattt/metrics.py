"""torchmetrics metrics: they accumulate per process and sync across ranks on compute()."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class BlockAccuracy(Metric):
    """Teacher-forced accuracy at each block position 1..S-1, plus the implied acceptance length.

    `update(correct, ok)` takes (..., S-1) bool tensors: was the drafter's argmax right at this
    position, and was the position supervised. `compute()` returns a dict with the per-position
    accuracy (S-1,), the mean accuracy, and `tau_proxy` = 1 + mean all-correct prefix length,
    the acceptance length a greedy verifier would give on these blocks.
    """

    full_state_update = False

    def __init__(self, block_size: int, **kwargs):
        super().__init__(**kwargs)
        n = block_size - 1
        self.add_state("correct", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prefix_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("blocks", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, ok: torch.Tensor) -> None:
        correct = correct.reshape(-1, correct.shape[-1]).bool()
        ok = ok.reshape(-1, ok.shape[-1]).bool()
        self.correct += (correct & ok).sum(0).double()
        self.total += ok.sum(0).double()
        has = ok[:, 0]  # a block counts for τ when its first draft position is supervised
        prefix = torch.cumprod((correct & ok).long(), dim=-1).sum(-1)
        self.prefix_sum += prefix[has].sum().double()
        self.blocks += has.sum().double()

    def compute(self) -> dict[str, torch.Tensor]:
        per_pos = self.correct / self.total.clamp_min(1)
        return {
            "per_position": per_pos.float(),
            "mean": (self.correct.sum() / self.total.sum().clamp_min(1)).float(),
            "tau_proxy": (1 + self.prefix_sum / self.blocks.clamp_min(1)).float(),
        }
