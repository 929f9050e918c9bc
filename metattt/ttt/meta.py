"""One meta-training step over a batch of context/continuation tasks, as a plain function.

Two paths compute the same meta-gradient:

- batched (the default): every task of the batch adapts at once. The tasks are rows of one padded
  batch, each with its own fast weights (φ expanded to (R, ...), metattt.models.batched_lora), so an
  inner step is one forward and one backward for the whole batch, each row's gradient clipped by
  its own norm and stepped with the same (Meta-SGD) lrs as alone (metattt.ttt.batched).
- per task: a Python loop, one `meta_objective` per task (kept for the attention-entropy objective,
  which is not a sum of per-row terms, and as the reference the batched path is tested against).

Both draw every anchor in the same order from the same generator. `inner_loop` reads nothing back
from the device: finiteness is tracked there (`InnerResult.finite`) and read once per meta step; a
task that turned non-finite is dropped and counted. The batched path then adapts the remaining
tasks again without it, since the dropped row's NaNs would otherwise reach φ through the shared
backward (0·NaN = NaN). Its losses find the drafts they supervise once per meta step
(`metattt.ttt.batched.Scored`), so no inner step waits on the device; the per-task losses select
them by mask at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from metattt.losses import BlockLoss
from metattt.models.batched_lora import batched_lora
from metattt.ttt.algorithms import MetaOutput, meta_objective
from metattt.ttt.batched import (
    batched_context_loss,
    batched_continuation_loss,
    context_targets,
    pad_anchors,
    score_drafts,
)
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

Anchors = tuple[torch.Tensor, torch.Tensor]  # (1, N) anchors and their flags


@dataclass
class MetaBatchResult:
    loss: torch.Tensor | None  # mean meta loss over usable tasks (None: no usable task)
    used: int = 0
    skipped: int = 0  # tasks dropped for a non-finite inner loss or gradient
    before: list[BlockLoss] = field(default_factory=list)  # continuation, with the initialization (score_before)
    after: list[BlockLoss] = field(default_factory=list)  # continuation, after adaptation
    inner: torch.Tensor | None = None  # (used, k) inner loss of each used task at each step, detached

    @property
    def inner_losses(self) -> list[list[float]]:
        """Per used task, per inner step (reads the device: for logging steps)."""
        return [] if self.inner is None else self.inner.tolist()


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
    batched: bool = True,
    score_before: bool = True,
) -> MetaBatchResult:
    """Adapt φ on each task's context, score on its continuation; average the meta losses.

    batched: all tasks in one batched inner loop (see the module doc); False, or an objective with
        attention entropy, loops over tasks. Both give the same result.
    score_before: also score each continuation with φ itself (`before`, for logging): one more
        forward, so training asks for it on logging steps only.
    """
    S = model.config.block_size
    drawn = []
    for task in tasks:  # anchors first, task after task: both paths consume the generator alike
        drawn.append((task, context_anchors(task, inner_anchors, S, generator),
                      continuation_anchors(task, outer_anchors, S, generator)))
    if drawn:  # one read of the device for the whole batch
        usable = torch.stack([i[1].any() & o[1].any() for _, i, o in drawn]).tolist()
        drawn = [d for d, ok in zip(drawn, usable) if ok]
    kw = dict(algorithm=algorithm, steps=steps, lr=lr, clip=clip, objective=objective, gamma=gamma,
              prequential=prequential, checkpoint=checkpoint, feature_head=feature_head, score_before=score_before)
    if not drawn:
        return MetaBatchResult(loss=None)
    if batched and not objective.attn_entropy:
        return _batched(model, phi, drawn, **kw)
    return _per_task(model, phi, drawn, **kw)


def _per_task(model: nn.Module, phi: ParamDict, drawn: list[tuple[Task, Anchors, Anchors]], *, algorithm: str,
              steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
              prequential: bool, checkpoint: bool, feature_head: nn.Module | None,
              score_before: bool) -> MetaBatchResult:
    res = MetaBatchResult(loss=None)
    outs: list[tuple[MetaOutput, list[BlockLoss]]] = []
    for task, (ia, iok), (oa, ook) in drawn:
        ctx = (task.context_ids, task.context_features, task.context_loss_mask)

        def inner_fn(params: ParamDict, step: int, ia=ia, iok=iok, ctx=ctx, task=task) -> torch.Tensor:
            a, ok = prequential_chunks(ia, iok, task.context_len, steps, step) if prequential else (ia, iok)
            return context_loss(Functional(model, params), *ctx, a, ok, objective, gamma, feature_head)

        scored: list[BlockLoss] = []

        def outer_fn(params: ParamDict, task=task, oa=oa, ook=ook, scored=scored) -> torch.Tensor:
            out = continuation_loss(Functional(model, params), task, oa, ook, gamma)
            scored.append(out)
            return out.loss

        if score_before:
            with torch.no_grad():
                res.before.append(continuation_loss(model, task, oa, ook, gamma))
        out = meta_objective(algorithm, phi, inner_fn, outer_fn, steps, lr, clip, prequential, checkpoint,
                             check_finite=False)
        outs.append((out, scored))
    finite = torch.stack([out.inner.finite for out, _ in outs]).tolist()  # the step's one finiteness read
    losses, inner = [], []
    for (out, scored), ok in zip(outs, finite):
        if not ok:  # its graph is simply never backpropagated
            res.skipped += 1
            continue
        res.after.append(scored[-1])
        inner.append(torch.stack(out.inner.losses).detach() if out.inner.losses else out.loss.new_zeros(0))
        losses.append(out.loss)
    res.used = len(losses)
    if losses:
        res.loss = torch.stack(losses).mean()
        res.inner = torch.stack(inner)
    return res


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """R × (1, L_i, ...) -> (R, max L_i, ...), zeros after each row's own."""
    return pad_sequence([t[0] for t in rows], batch_first=True)


def _batched(model: nn.Module, phi: ParamDict, drawn: list[tuple[Task, Anchors, Anchors]], *, algorithm: str,
             steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
             prequential: bool, checkpoint: bool, feature_head: nn.Module | None,
             score_before: bool) -> MetaBatchResult:
    S = model.config.block_size
    res = MetaBatchResult(loss=None)
    if score_before:  # φ itself: 2-D LoRA weights, peft's own forward for every row
        tasks = [task for task, _, _ in drawn]
        ids, feats, valid, mask = _rows(tasks)
        scored = score_drafts(ids, mask, *pad_anchors([o for _, _, o in drawn]), S, gamma)
        with torch.no_grad():
            losses, correct = batched_continuation_loss(model, ids, feats, valid, scored)
        res.before = _block_losses(losses, correct, scored.weights)
    keep = list(range(len(drawn)))
    while keep:
        out, after = _adapt_rows(model, phi, [drawn[r] for r in keep], algorithm=algorithm, steps=steps, lr=lr,
                                 clip=clip, objective=objective, gamma=gamma, prequential=prequential,
                                 checkpoint=checkpoint, feature_head=feature_head)
        finite = out.inner.finite.tolist()  # the step's one finiteness read (again only after a drop)
        if all(finite):
            break
        res.skipped += finite.count(False)
        keep = [r for r, ok in zip(keep, finite) if ok]
    if not keep:
        return res
    res.used = len(keep)
    res.loss = out.loss.mean()
    res.after = after
    res.inner = torch.stack(out.inner.losses, 1).detach() if out.inner.losses else out.loss.new_zeros(len(keep), 0)
    return res


def _rows(tasks: list[Task]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole sequences, right-padded: ids (R, T), features (R, T, n·H), valid (R, T), loss mask (R, T)."""
    ids = _pad([t.ids for t in tasks])
    lengths = torch.tensor([t.ids.shape[1] for t in tasks], device=ids.device)
    valid = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
    return ids, _pad([t.features for t in tasks]), valid, _pad([t.loss_mask for t in tasks])


def _block_losses(losses: torch.Tensor, correct: torch.Tensor, weights: torch.Tensor) -> list[BlockLoss]:
    """(R,) losses and (R, N, S-1) drafts -> one BlockLoss per row, as `continuation_loss` gives it."""
    return [BlockLoss(loss=losses[r], correct=correct[r : r + 1], weights=weights[r : r + 1])
            for r in range(losses.shape[0])]


def _adapt_rows(model: nn.Module, phi: ParamDict, drawn: list[tuple[Task, Anchors, Anchors]], *, algorithm: str,
                steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
                prequential: bool, checkpoint: bool,
                feature_head: nn.Module | None) -> tuple[MetaOutput, list[BlockLoss]]:
    """`meta_objective` of R tasks as R rows -> per-row meta losses (R,) and the continuations scored after."""
    S = model.config.block_size
    tasks = [task for task, _, _ in drawn]
    R = len(tasks)
    ids, feats, valid, mask = _rows(tasks)
    ctx_len = torch.tensor([t.context_len for t in tasks], device=ids.device)  # (R,)
    C = max(t.context_len for t in tasks)
    ctx_valid = torch.arange(C, device=ids.device)[None] < ctx_len[:, None]  # (R, C)
    # the inner loss gets contexts only: the continuation tokens a shorter context's padding covers are zeroed
    ctx_ids = torch.where(ctx_valid, ids[:, :C], 0)
    ctx_feats = torch.where(ctx_valid[..., None], feats[:, :C], 0)
    ctx_mask = torch.where(ctx_valid, mask[:, :C], 0)
    ia, iok = pad_anchors([i for _, i, _ in drawn])  # (R, N_in)
    oa, ook = pad_anchors([o for _, _, o in drawn])  # (R, N_out)
    # which drafts each step supervises depends on the anchors only: found once, not per step
    if prequential:
        chunks = [prequential_chunks(ia, iok, ctx_len[:, None], steps, j) for j in range(steps)]
        targets = [context_targets(ctx_ids, ctx_valid, a, ok, objective, gamma, S, ctx_mask) for a, ok in chunks]
    else:
        chunks = [(ia, iok)] * steps
        targets = [context_targets(ctx_ids, ctx_valid, ia, iok, objective, gamma, S, ctx_mask)] * steps
    outer = score_drafts(ids, mask, oa, ook, S, gamma)

    def inner_fn(params: ParamDict, step: int) -> torch.Tensor:
        # entered here, not around the loop: a checkpointed step is recomputed in the outer backward
        with batched_lora(model):
            return batched_context_loss(Functional(model, params), ctx_ids, ctx_feats, ctx_valid, ia, chunks[step][1],
                                        objective, gamma, feature_head, ctx_mask, targets=targets[step])  # (R,)

    scored: list[torch.Tensor] = []

    def outer_fn(params: ParamDict) -> torch.Tensor:
        with batched_lora(model):
            losses, correct = batched_continuation_loss(Functional(model, params), ids, feats, valid, outer)  # (R,)
        scored.append(correct)
        return losses

    out = meta_objective(algorithm, phi, inner_fn, outer_fn, steps, lr, clip, prequential, checkpoint, rows=R,
                         check_finite=False)
    return out, _block_losses(out.outer_loss, scored[-1], outer.weights)
