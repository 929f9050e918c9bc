"""The inner loop, written once: test-time training of fast weights (the LoRA tensors).

Meta-training differentiates through it (second order: `create_graph=True`) or not (first
order, Reptile), and evaluation calls the very same function on a prompt at inference time.
It is functional: the model's own parameters are never modified; fast weights live in a
dict and enter the forward through `torch.func.functional_call`. Gradients come from
`torch.autograd.grad` (not `torch.func.grad`, which breaks activation checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint as activation_checkpoint

ParamDict = dict[str, torch.Tensor]


class Functional:
    """`model` called with some of its parameters replaced by `params` (others unchanged).

    Behaves like the drafter for the loss functions: `f(blocks, anchors, ...)` and `f.logits(h)`.
    """

    def __init__(self, model: nn.Module, params: ParamDict):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs, strict=False)

    def __getattr__(self, name: str):  # logits, config, ... come from the model itself
        return getattr(self.model, name)


@dataclass
class InnerResult:
    params: ParamDict  # adapted fast weights
    losses: list[torch.Tensor] = field(default_factory=list)  # inner loss at each step, before its update: () or (R,)
    skipped: bool = False  # a non-finite loss or gradient: params are the initial ones, drop this task
    reason: str = ""
    # () or (R,) bool on the weights' device: every step's loss and update were finite (per row with
    # clip_per_row); with check_finite=False the caller reads it, once for a whole meta step
    finite: torch.Tensor | None = None


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float | None,
                        per_row: bool = False) -> list[torch.Tensor]:
    """Differentiable global-norm clipping (TTT-E2E clips inner gradients at 1.0).

    per_row: every gradient carries a leading request dim (R, ...) of independent fast weights
    (metattt.ttt.batched); each row is clipped by its own global norm, as if adapted alone.
    """
    if max_norm is None or max_norm <= 0:
        return grads
    # at least float32 (bf16 squares overflow and lose digits), and float64 stays float64: a float32
    # norm would make clipped float64 inner steps, and their meta-gradients, only float32-exact
    def up(g: torch.Tensor) -> torch.Tensor:
        return g.to(torch.promote_types(g.dtype, torch.float32))

    if per_row:
        scale = _clip_scale(sum((up(g) ** 2).flatten(1).sum(1) for g in grads), max_norm)  # (R,)
        return [g * scale.to(g.dtype).view(-1, *(1,) * (g.dim() - 1)) for g in grads]
    scale = _clip_scale(sum((up(g) ** 2).sum() for g in grads), max_norm)
    return [g * scale.to(g.dtype) for g in grads]


def _clip_scale(squared_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / ‖g‖), differentiable also where g = 0 (an inner step with no block to train
    on): sqrt's derivative is infinite at 0, and infinity times the clamp's zero derivative is NaN
    in a second-order meta-gradient, so a zero norm takes a branch that never reaches sqrt."""
    nonzero = squared_norm > 0
    norm = torch.where(nonzero, torch.where(nonzero, squared_norm, 1.0).sqrt(), 0.0)
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def _sgd_step(
    loss_fn: Callable[[ParamDict, int], torch.Tensor],
    names: list[str],
    lrs: list[torch.Tensor | float],
    clip: float | None,
    clip_per_row: bool,
    create_graph: bool,
    retain_graph: bool,
    step: int,
    *values: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    params = dict(zip(names, values))
    loss = loss_fn(params, step)  # () or (R,) per-row losses
    # row b's loss reaches only row b's fast weights, so the gradient of the sum is each row's own
    grads = torch.autograd.grad(loss.sum(), values, create_graph=create_graph, retain_graph=create_graph or retain_graph,
                                allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads)]
    grads = clip_by_global_norm(grads, clip, clip_per_row)
    new = tuple(v - lr * g for v, lr, g in zip(values, lrs, grads))
    return (loss, *new)


def inner_loop(
    loss_fn: Callable[[ParamDict, int], torch.Tensor],
    params: ParamDict,
    steps: int,
    lr: float | ParamDict,
    clip: float | None = 1.0,
    create_graph: bool = False,
    checkpoint: bool = False,
    clip_per_row: bool = False,
    check_finite: bool = True,
    retain_graph: bool = False,
) -> InnerResult:
    """`steps` steps of SGD on `loss_fn(params, step)` over the fast weights `params`.

    lr: a scalar, or one learned (Meta-SGD) lr tensor per fast weight, keyed like `params`.
    create_graph: keep the graph of every step, so a later backward is exactly second order.
    checkpoint: recompute each inner step in the backward (non-reentrant), trading compute
        for the memory of `steps` retained graphs.
    clip_per_row: fast weights carry a leading request dim; clip each row's gradient by its own
        global norm (see `clip_by_global_norm`). `loss_fn` may then return the (R,) per-row losses.
    check_finite: after the last step, look once at whether every loss and update was finite.
        False: never look (no host sync at all); `finite` says it, per row, for the caller to check
        together with the other tasks of its meta step.
    retain_graph: keep every step's loss graph after its gradient is taken (first order), so a caller
        can differentiate the losses themselves at the weights they were computed with (the
        prequential scores of fomaml); implied by create_graph.

    Returns the adapted weights and `finite`; when a check finds a non-finite loss or gradient, the
    initial weights with `skipped=True` (the caller counts and drops the task; the run goes on).
    """
    names = list(params)
    values = tuple(params[n] for n in names)
    lrs = [lr[n] if isinstance(lr, dict) else lr for n in names]
    losses: list[torch.Tensor] = []
    step_finite: list[torch.Tensor] = []  # per step, on device: reading one would stall the stream
    for step in range(steps):
        if checkpoint and create_graph:
            out = activation_checkpoint(_sgd_step, loss_fn, names, lrs, clip, clip_per_row, create_graph, retain_graph,
                                        step, *values, use_reentrant=False)
        else:
            out = _sgd_step(loss_fn, names, lrs, clip, clip_per_row, create_graph, retain_graph, step, *values)
        loss, new = out[0], out[1:]
        ok = torch.isfinite(loss.detach())  # () or (R,)
        for v in new:
            v_ok = torch.isfinite(v.detach())
            ok = ok & (v_ok.flatten(1).all(1) if clip_per_row else v_ok.all())
        step_finite.append(ok)
        losses.append(loss)
        values = new
    rows = values[0].shape[0] if clip_per_row and values else None
    finite = torch.ones(() if rows is None else (rows,), dtype=torch.bool, device=values[0].device if values else None)
    for ok in step_finite:
        finite = finite & ok
    if check_finite and step_finite and not bool(finite.all()):  # the loop's only host sync
        bad = int((~torch.stack([ok.all() for ok in step_finite])).nonzero()[0])
        return InnerResult(params=dict(params), losses=losses[:bad], skipped=True, finite=finite,
                           reason=f"non-finite inner loss or gradient at step {bad}")
    return InnerResult(params=dict(zip(names, values)), losses=losses, finite=finite)
