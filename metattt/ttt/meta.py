"""One meta-training step over a batch of context/continuation tasks, as a plain function."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from metattt.losses import BlockLoss
from metattt.ttt.algorithms import meta_objective
from metattt.ttt.inner import Functional, ParamDict
from metattt.ttt.tasks import (
    Task,
    TTTObjective,
    context_anchors,
    context_loss,
    continuation_anchors,
    continuation_loss,
    prequential_chunks,
)


@dataclass
class MetaBatchResult:
    loss: torch.Tensor | None  # mean meta loss over usable tasks (None: no usable task)
    used: int = 0
    skipped: int = 0  # tasks dropped for a non-finite inner loss or gradient
    before: list[BlockLoss] = field(default_factory=list)  # continuation, with the initialization
    after: list[BlockLoss] = field(default_factory=list)  # continuation, after adaptation
    inner_losses: list[list[float]] = field(default_factory=list)  # per task, per inner step


def meta_batch(
    model: nn.Module,
    phi: ParamDict,
    tasks: list[Task],
    *,
    algorithm: str,
    steps: int,
    lr: float | ParamDict,
    clip: float | None,
    inner_anchors: int,
    outer_anchors: int,
    objective: TTTObjective,
    gamma: float,
    generator: torch.Generator,
    prequential: bool = False,
    checkpoint: bool = False,
    feature_head: nn.Module | None = None,
) -> MetaBatchResult:
    """Adapt φ on each task's context, score on its continuation; average the meta losses."""
    S = model.config.block_size
    res = MetaBatchResult(loss=None)
    losses = []
    for task in tasks:
        ia, iok = context_anchors(task, inner_anchors, S, generator)
        oa, ook = continuation_anchors(task, outer_anchors, S, generator)
        if not iok.any() or not ook.any():
            continue
        ctx = (task.context_ids, task.context_features, task.context_loss_mask)

        def inner_fn(params: ParamDict, step: int, ia=ia, iok=iok, ctx=ctx, task=task) -> torch.Tensor:
            a, ok = prequential_chunks(ia, iok, task.context_len, steps, step) if prequential else (ia, iok)
            return context_loss(Functional(model, params), *ctx, a, ok, objective, gamma, feature_head)

        scored: list[BlockLoss] = []

        def outer_fn(params: ParamDict, task=task, oa=oa, ook=ook, scored=scored) -> torch.Tensor:
            out = continuation_loss(Functional(model, params), task, oa, ook, gamma)
            scored.append(out)
            return out.loss

        with torch.no_grad():
            res.before.append(continuation_loss(model, task, oa, ook, gamma))
        out = meta_objective(algorithm, phi, inner_fn, outer_fn, steps, lr, clip, prequential, checkpoint)
        if out.inner.skipped:
            res.skipped += 1
            continue
        res.after.append(scored[-1])
        res.inner_losses.append([loss.item() for loss in out.inner.losses])
        losses.append(out.loss)
    res.used = len(losses)
    if losses:
        res.loss = torch.stack(losses).mean()
    return res
