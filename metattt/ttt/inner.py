"""The inner loop, written once: test-time training of fast weights (the LoRA tensors).

Meta-training differentiates through it (second order: `create_graph=True`) or not (first
order, Reptile), and evaluation calls the very same function on a prompt at inference time.
It is functional: the model's own parameters are never modified; fast weights live in a
dict and enter the forward through `torch.func.functional_call`. Gradients come from
`torch.autograd.grad` (not `torch.func.grad`, which breaks activation checkpointing).
"""

from __future__ import annotations

import math
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
    losses: list[torch.Tensor] = field(default_factory=list)  # inner loss at each step, before its update
    skipped: bool = False  # a non-finite loss or gradient: params are the initial ones, drop this task
    reason: str = ""


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
        norm = torch.sqrt(sum((up(g) ** 2).flatten(1).sum(1) for g in grads))  # (R,)
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return [g * scale.to(g.dtype).view(-1, *(1,) * (g.dim() - 1)) for g in grads]
    norm = torch.sqrt(sum((up(g) ** 2).sum() for g in grads))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale.to(g.dtype) for g in grads]


def _sgd_step(
    loss_fn: Callable[[ParamDict, int], torch.Tensor],
    names: list[str],
    lrs: list[torch.Tensor | float],
    clip: float | None,
    clip_per_row: bool,
    create_graph: bool,
    step: int,
    *values: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    params = dict(zip(names, values))
    loss = loss_fn(params, step)
    grads = torch.autograd.grad(loss, values, create_graph=create_graph, allow_unused=True)
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
) -> InnerResult:
    """`steps` steps of SGD on `loss_fn(params, step)` over the fast weights `params`.

    lr: a scalar, or one learned (Meta-SGD) lr tensor per fast weight, keyed like `params`.
    create_graph: keep the graph of every step, so a later backward is exactly second order.
    checkpoint: recompute each inner step in the backward (non-reentrant), trading compute
        for the memory of `steps` retained graphs.
    clip_per_row: fast weights carry a leading request dim; clip each row's gradient by its own
        global norm (see `clip_by_global_norm`).

    Returns the adapted weights; on a non-finite loss or gradient, the initial weights with
    `skipped=True` (the caller counts and drops the task; the run goes on).
    """
    names = list(params)
    values = tuple(params[n] for n in names)
    lrs = [lr[n] if isinstance(lr, dict) else lr for n in names]
    losses: list[torch.Tensor] = []
    for step in range(steps):
        if checkpoint and create_graph:
            out = activation_checkpoint(_sgd_step, loss_fn, names, lrs, clip, clip_per_row, create_graph, step, *values,
                                        use_reentrant=False)
        else:
            out = _sgd_step(loss_fn, names, lrs, clip, clip_per_row, create_graph, step, *values)
        loss, new = out[0], out[1:]
        if not math.isfinite(loss.item()) or not all(torch.isfinite(v).all() for v in new):
            return InnerResult(params=dict(params), losses=losses, skipped=True,
                               reason=f"non-finite inner loss or gradient at step {step}")
        losses.append(loss)
        values = new
    return InnerResult(params=dict(zip(names, values)), losses=losses)
