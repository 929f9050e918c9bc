"""One meta-training step over a batch of context/continuation tasks, as a plain function.

Two paths compute the same meta-gradient:

- batched (the default): every task of the batch adapts at once. The tasks are rows of one padded
  batch, each with its own fast weights (φ expanded to (R, ...), metattt.models.batched_lora), so an
  inner step is one forward and one backward for the whole batch, each row's gradient clipped by
  its own norm and stepped with the same (Meta-SGD) lrs as alone (metattt.ttt.batched).
- per task: a Python loop, one `meta_objective` per task (kept for the attention-entropy objective,
  which is not a sum of per-row terms, and as the reference the batched path is tested against).

With `meta.ttt.online` (`online`), a task's inner loop goes on past the context: the continuation is
walked in chunks, each scored with the fast weights from before training on it, then trained on by
an update on the blocks anchored in its most recent `online.window` tokens (what decoding's online
TTT does with committed tokens), so the outer loss is the prequential continuation loss
(metattt.ttt.algorithms.meta_objective, `online_chunks`). Batched, rows have different numbers of
chunks: a row past its last one has nothing to train on or score there (zero loss, no update).

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

from metattt.anchors import block_targets
from metattt.config import TTTOnlineConfig
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
    chunk_anchors,
    context_anchors,
    context_loss,
    continuation_anchors,
    continuation_loss,
    online_chunks,
    online_update_anchors,
    prequential_chunks,
)

Anchors = tuple[torch.Tensor, torch.Tensor]  # (1, N) anchors and their flags


@dataclass
class Drawn:
    """One task and the anchors its meta step uses, drawn before anything runs."""

    task: Task
    inner: Anchors  # context blocks of the context steps
    outer: Anchors  # continuation blocks of the outer loss
    chunks: list[tuple[int, int]] = field(default_factory=list)  # online: [lo, hi) of each continuation chunk
    updates: list[Anchors] = field(default_factory=list)  # online: blocks of the update after each chunk


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
    online: TTTOnlineConfig | None = None,
) -> MetaBatchResult:
    """Adapt φ on each task's context, score on its continuation; average the meta losses.

    batched: all tasks in one batched inner loop (see the module doc); False, or an objective with
        attention entropy, loops over tasks. Both give the same result.
    score_before: also score each continuation with φ itself (`before`, for logging): one more
        forward, so training asks for it on logging steps only.
    online: meta.ttt.online; enabled (chunk > 0), the continuation is scored chunk by chunk with online
        updates between chunks (see the module doc). `before` and `after` score the same blocks.
    """
    S = model.config.block_size
    online = online if online is not None and online.enabled else None
    drawn = []
    for task in tasks:  # anchors first, task after task: both paths consume the generator alike
        inner = context_anchors(task, inner_anchors, S, generator)
        if online is None:
            drawn.append(Drawn(task, inner, continuation_anchors(task, outer_anchors, S, generator)))
            continue
        chunks = online_chunks(task, online, S)
        outer = continuation_anchors(task, outer_anchors, S, generator, end=chunks[-1][1] if chunks else None)
        updates = [online_update_anchors(task, hi, online, S, generator) for _, hi in chunks]
        drawn.append(Drawn(task, inner, outer, chunks, updates))
    if drawn:  # one read of the device for the whole batch
        usable = torch.stack([d.inner[1].any() & d.outer[1].any() for d in drawn]).tolist()
        drawn = [d for d, ok in zip(drawn, usable) if ok]
    kw = dict(algorithm=algorithm, steps=steps, lr=lr, clip=clip, objective=objective, gamma=gamma,
              prequential=prequential, checkpoint=checkpoint, feature_head=feature_head, score_before=score_before,
              online_steps=online.steps if online is not None else 1)
    if not drawn:
        return MetaBatchResult(loss=None)
    if batched and not objective.attn_entropy:
        return _batched(model, phi, drawn, **kw)
    return _per_task(model, phi, drawn, **kw)


def _per_task(model: nn.Module, phi: ParamDict, drawn: list[Drawn], *, algorithm: str,
              steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
              prequential: bool, checkpoint: bool, feature_head: nn.Module | None,
              score_before: bool, online_steps: int) -> MetaBatchResult:
    S = model.config.block_size
    res = MetaBatchResult(loss=None)
    outs: list[tuple[MetaOutput, BlockLoss]] = []
    for d in drawn:
        task, (ia, iok), (oa, ook) = d.task, d.inner, d.outer
        ctx = (task.context_ids, task.context_features, task.context_loss_mask)

        def inner_fn(params: ParamDict, step: int, ia=ia, iok=iok, ctx=ctx, d=d) -> torch.Tensor:
            if step >= steps:  # the update after continuation chunk u: the tokens before its end only
                u = (step - steps) // online_steps
                end = d.chunks[u][1]
                t = d.task
                return context_loss(Functional(model, params), t.ids[:, :end], t.features[:, :end],
                                    t.loss_mask[:, :end], *d.updates[u], objective, gamma, feature_head)
            a, ok = prequential_chunks(ia, iok, d.task.context_len, steps, step) if prequential else (ia, iok)
            return context_loss(Functional(model, params), *ctx, a, ok, objective, gamma, feature_head)

        scored: list[BlockLoss] = []
        if d.chunks:
            weights = block_targets(task.ids, task.loss_mask, oa, ook, S, gamma)[1]  # every chunk's blocks
            total = weights.sum()

            def outer_fn(params: ParamDict, c: int, d=d, oa=oa, ook=ook, total=total, scored=scored) -> torch.Tensor:
                lo, hi = d.chunks[c]
                out = continuation_loss(Functional(model, params), d.task, oa, chunk_anchors(oa, ook, lo, hi), gamma)
                scored.append(out)
                return _share(out.loss, out.weights.sum(), total)
        else:
            def outer_fn(params: ParamDict, task=task, oa=oa, ook=ook, scored=scored) -> torch.Tensor:
                out = continuation_loss(Functional(model, params), task, oa, ook, gamma)
                scored.append(out)
                return out.loss

        if score_before:
            with torch.no_grad():
                res.before.append(continuation_loss(model, task, oa, ook, gamma))
        out = meta_objective(algorithm, phi, inner_fn, outer_fn, steps, lr, clip, prequential, checkpoint,
                             check_finite=False, online_chunks=len(d.chunks), online_steps=online_steps)
        if d.chunks:  # every block as scored before its chunk's update
            after = BlockLoss(loss=out.outer_loss, correct=torch.stack([x.correct for x in scored]).any(0),
                              weights=weights)
        else:
            after = scored[-1]
        outs.append((out, after))
    finite = torch.stack([out.inner.finite for out, _ in outs]).tolist()  # the step's one finiteness read
    losses, inner = [], []
    for (out, after), ok in zip(outs, finite):
        if not ok:  # its graph is simply never backpropagated
            res.skipped += 1
            continue
        res.after.append(after)
        context_steps = out.inner.losses[:steps]  # logged per step; online updates' steps vary per task
        inner.append(torch.stack(context_steps).detach() if context_steps else out.loss.new_zeros(0))
        losses.append(out.loss)
    res.used = len(losses)
    if losses:
        res.loss = torch.stack(losses).mean()
        res.inner = torch.stack(inner)
    return res


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """R × (1, L_i, ...) -> (R, max L_i, ...), zeros after each row's own."""
    return pad_sequence([t[0] for t in rows], batch_first=True)


def _share(loss: torch.Tensor, chunk_weight: torch.Tensor, total_weight: torch.Tensor) -> torch.Tensor:
    """A chunk's loss (normalised by its own blocks' weights) as its share of the continuation loss
    (normalised by every chunk's): the shares sum to the continuation loss, each block counted once."""
    return loss * chunk_weight.to(loss.dtype) / total_weight.to(loss.dtype).clamp_min(1e-8)


def _batched(model: nn.Module, phi: ParamDict, drawn: list[Drawn], *, algorithm: str,
             steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
             prequential: bool, checkpoint: bool, feature_head: nn.Module | None,
             score_before: bool, online_steps: int) -> MetaBatchResult:
    S = model.config.block_size
    res = MetaBatchResult(loss=None)
    if score_before:  # φ itself: 2-D LoRA weights, peft's own forward for every row
        tasks = [d.task for d in drawn]
        ids, feats, valid, mask = _rows(tasks)
        scored = score_drafts(ids, mask, *pad_anchors([d.outer for d in drawn]), S, gamma)
        with torch.no_grad():
            losses, correct = batched_continuation_loss(model, ids, feats, valid, scored)
        res.before = _block_losses(losses, correct, scored.weights)
    keep = list(range(len(drawn)))
    while keep:
        out, after = _adapt_rows(model, phi, [drawn[r] for r in keep], algorithm=algorithm, steps=steps, lr=lr,
                                 clip=clip, objective=objective, gamma=gamma, prequential=prequential,
                                 checkpoint=checkpoint, feature_head=feature_head, online_steps=online_steps)
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
    context_steps = out.inner.losses[:steps]  # as the per-task path logs them
    res.inner = torch.stack(context_steps, 1).detach() if context_steps else out.loss.new_zeros(len(keep), 0)
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


def _adapt_rows(model: nn.Module, phi: ParamDict, drawn: list[Drawn], *, algorithm: str,
                steps: int, lr: float | ParamDict, clip: float | None, objective: TTTObjective, gamma: float,
                prequential: bool, checkpoint: bool, feature_head: nn.Module | None,
                online_steps: int) -> tuple[MetaOutput, list[BlockLoss]]:
    """`meta_objective` of R tasks as R rows -> per-row meta losses (R,) and the continuations scored after."""
    S = model.config.block_size
    tasks = [d.task for d in drawn]
    R = len(tasks)
    ids, feats, valid, mask = _rows(tasks)
    ctx_len = torch.tensor([t.context_len for t in tasks], device=ids.device)  # (R,)
    C = max(t.context_len for t in tasks)
    ctx_valid = torch.arange(C, device=ids.device)[None] < ctx_len[:, None]  # (R, C)
    # the inner loss gets contexts only: the continuation tokens a shorter context's padding covers are zeroed
    ctx_ids = torch.where(ctx_valid, ids[:, :C], 0)
    ctx_feats = torch.where(ctx_valid[..., None], feats[:, :C], 0)
    ctx_mask = torch.where(ctx_valid, mask[:, :C], 0)
    ia, iok = pad_anchors([d.inner for d in drawn])  # (R, N_in)
    oa, ook = pad_anchors([d.outer for d in drawn])  # (R, N_out)
    # which drafts each step supervises depends on the anchors only: found once, not per step
    if prequential:
        chunks = [prequential_chunks(ia, iok, ctx_len[:, None], steps, j) for j in range(steps)]
        targets = [context_targets(ctx_ids, ctx_valid, a, ok, objective, gamma, S, ctx_mask) for a, ok in chunks]
    else:
        chunks = [(ia, iok)] * steps
        targets = [context_targets(ctx_ids, ctx_valid, ia, iok, objective, gamma, S, ctx_mask)] * steps
    outer = score_drafts(ids, mask, oa, ook, S, gamma)
    M = max(len(d.chunks) for d in drawn)  # online: continuation chunks of the row with the most
    updates = [_update_rows(drawn, u, ids, feats, mask, objective, gamma, S)
               for u in range(M if algorithm == "reptile" else M - 1)]  # maml/fomaml skip the last update
    bounds = [torch.tensor([d.chunks[c] if c < len(d.chunks) else (0, 0) for d in drawn], device=ids.device)
              for c in range(M)]  # (R, 2) each: [lo, hi) of chunk c per row, empty past a row's last
    chunk_scored = [score_drafts(ids, mask, oa, chunk_anchors(oa, ook, b[:, :1], b[:, 1:]), S, gamma) for b in bounds]
    total = outer.weights.sum((1, 2))  # (R,)

    def inner_fn(params: ParamDict, step: int) -> torch.Tensor:
        # entered here, not around the loop: a checkpointed step is recomputed in the outer backward
        with batched_lora(model):
            if step >= steps:  # the update after continuation chunk u
                u_ids, u_feats, u_valid, u_mask, ua, uok, u_targets = updates[(step - steps) // online_steps]
                return batched_context_loss(Functional(model, params), u_ids, u_feats, u_valid, ua, uok, objective,
                                            gamma, feature_head, u_mask, targets=u_targets)  # (R,)
            return batched_context_loss(Functional(model, params), ctx_ids, ctx_feats, ctx_valid, ia, chunks[step][1],
                                        objective, gamma, feature_head, ctx_mask, targets=targets[step])  # (R,)

    scored: list[torch.Tensor] = []

    def outer_fn(params: ParamDict, c: int | None = None) -> torch.Tensor:
        which = outer if c is None else chunk_scored[c]
        with batched_lora(model):
            losses, correct = batched_continuation_loss(Functional(model, params), ids, feats, valid, which)  # (R,)
        scored.append(correct)
        return losses if c is None else _share(losses, which.weights.sum((1, 2)), total)

    out = meta_objective(algorithm, phi, inner_fn, outer_fn, steps, lr, clip, prequential, checkpoint, rows=R,
                         check_finite=False, online_chunks=M, online_steps=online_steps)
    # online: every block as scored before its chunk's update (each chunk marks its own blocks only)
    correct = torch.stack(scored).any(0) if M else scored[-1]
    return out, _block_losses(out.outer_loss, correct, outer.weights)


def _update_rows(drawn: list[Drawn], u: int, ids: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor,
                 objective: TTTObjective, gamma: float, S: int) -> tuple:
    """The rows of the update after continuation chunk u: each row's tokens before that chunk's end
    (a row without chunk u: none, so a zero loss and no update), its anchors and supervised drafts."""
    ends = [d.chunks[u][1] if u < len(d.chunks) else 0 for d in drawn]
    P = max(ends)
    valid = torch.arange(P, device=ids.device)[None] < torch.tensor(ends, device=ids.device)[:, None]  # (R, P)
    u_ids, u_mask = torch.where(valid, ids[:, :P], 0), torch.where(valid, mask[:, :P], 0)
    # features behind a row's end are not zeroed: the drafter's attention masks them out (`valid`) and no
    # block reads past its anchor, and a copy per chunk would live as long as the second-order graph
    u_feats = feats[:, :P]
    none = (ids.new_zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool, device=ids.device))
    a, ok = pad_anchors([d.updates[u] if u < len(d.chunks) else none for d in drawn])
    return u_ids, u_feats, valid, u_mask, a, ok, context_targets(u_ids, valid, a, ok, objective, gamma, S, u_mask)
