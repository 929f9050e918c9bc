"""Acceptance metrics of speculative decoding, as torchmetrics (sum-reduced, so they sync).

Definitions (the README's "Evaluation"): per verification step, τ_step = accepted drafts + 1 (the target's own
correction or bonus token); τ = mean over steps, 1 ≤ τ ≤ S for a block drafter. DFlash reports
the mean of per-prompt means; a list of per-prompt means cannot be a sum-reduced state, so the
metrics here pool steps across prompts and ranks, and `summarize_tau` gives the per-prompt
mean ± standard error on one process.

Both metrics take the same input, the accepted-draft count of each step: per-position
acceptance follows from it (a step with a accepted drafts reached positions 1..min(a+1, S-1)
and accepted positions 1..a).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric

from metattt.stats import mean_and_stderr


def _as_counts(accepted: torch.Tensor | Sequence[int] | int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(accepted, dtype=torch.long, device=device).reshape(-1)


class _SumStateMetric(Metric):
    """Sum-reduced states; `merge_state` also drops the cached `compute()` result.

    torchmetrics 1.9 caches `compute()` and resets the cache on `update`, not on `merge_state`,
    so a metric computed before merging would keep returning its old value.
    """

    full_state_update = False

    def merge_state(self, incoming_state) -> None:
        super().merge_state(incoming_state)
        self._computed = None


class AcceptanceLength(_SumStateMetric):
    """τ = Σ(accepted + 1) / steps, pooled over every step given to `update` (on every rank)."""
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # integer counts: exact under summation across ranks
        self.add_state("length_sum", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("steps", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accepted: torch.Tensor | Sequence[int] | int) -> None:
        """`accepted`: accepted drafts per verification step (e.g. `GenerationResult.accepted`)."""
        a = _as_counts(accepted, self.length_sum.device)
        if (a < 0).any():
            raise ValueError("accepted draft counts must be >= 0")
        self.length_sum += (a + 1).sum()
        self.steps += a.numel()

    def compute(self) -> torch.Tensor:
        if self.steps == 0:
            return torch.tensor(float("nan"))
        return self.length_sum.double().div(self.steps).float()


class PerPositionAcceptance(_SumStateMetric):
    """Per block position k = 1..S-1: how often d_k was checked, and accepted.

    `compute()` returns a dict of (S-1,) tensors: `conditional` = P(d_k accepted | d_1..d_{k-1}
    accepted) (NaN where never reached), `marginal` = P(d_k accepted) per step, and the raw
    `accepted` / `reached` counts.
    """

    def __init__(self, block_size: int, **kwargs):
        super().__init__(**kwargs)
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        self.block_size = block_size
        n = block_size - 1
        self.add_state("accepted", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("reached", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("steps", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accepted: torch.Tensor | Sequence[int] | int) -> None:
        a = _as_counts(accepted, self.accepted.device)
        n = self.block_size - 1
        if ((a < 0) | (a > n)).any():
            raise ValueError(f"accepted draft counts must lie in 0..{n} for block size {self.block_size}")
        k = torch.arange(1, n + 1, device=a.device)  # block positions
        self.accepted += (k[None] <= a[:, None]).sum(0)
        self.reached += (k[None] <= (a[:, None] + 1)).sum(0)  # d_{a+1} was checked (and rejected)
        self.steps += a.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        acc, reach = self.accepted.double(), self.reached.double()
        conditional = torch.where(reach > 0, acc / reach.clamp_min(1), torch.full_like(acc, float("nan")))
        marginal = acc / self.steps.clamp_min(1).double()
        return {"conditional": conditional.float(), "marginal": marginal.float(),
                "accepted": self.accepted.clone(), "reached": self.reached.clone()}


def summarize_tau(per_prompt_accepted: Iterable[Sequence[int]]) -> dict[str, float]:
    """τ over prompts, both ways: DFlash's mean of per-prompt means (± stderr) and pooled steps.

    Takes each prompt's accepted-per-step list (`GenerationResult.accepted`); prompts without
    a verification step (they ended on the first token) have no τ and are skipped.
    """
    lists = [list(a) for a in per_prompt_accepted if len(a) > 0]
    per_prompt = [sum(x + 1 for x in a) / len(a) for a in lists]
    mean, stderr = mean_and_stderr(per_prompt)
    steps = sum(len(a) for a in lists)
    pooled = sum(sum(x + 1 for x in a) for a in lists) / steps if steps else float("nan")
    return {"tau": mean, "tau_stderr": stderr, "tau_pooled": pooled,
            "num_prompts": float(len(lists)), "num_steps": float(steps)}
