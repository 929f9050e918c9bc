"""Context/continuation tasks, the TTT objectives, and test-time adaptation of a prompt.

A task is one sequence split at `context_len`. The inner (TTT) loss sees the context only —
its tokens and the target features of its positions, sliced before anything is computed —
exactly what a prompt gives at inference. The outer loss scores blocks anchored in the
continuation, each conditioned (as at inference) on the target features of everything
before its anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metattt.anchors import block_targets, sample_anchors, valid_anchor_mask
from metattt.config import CONTEXT_MODES, TTTConfig, TTTObjective, TTTOnlineConfig
from metattt.losses import BlockLoss, decayed_draft_ce, draft_hidden
from metattt.models.base import ContextCache
from metattt.models.lora import set_lora
from metattt.ttt.inner import Functional, InnerResult, ParamDict, inner_loop


@dataclass
class Task:
    ids: torch.Tensor  # (1, T) real tokens only
    features: torch.Tensor  # (1, T, n·H) target features of every position
    loss_mask: torch.Tensor  # (1, T)
    context_len: int

    @property
    def context_ids(self) -> torch.Tensor:
        return self.ids[:, : self.context_len]

    @property
    def context_features(self) -> torch.Tensor:
        return self.features[:, : self.context_len]

    @property
    def context_loss_mask(self) -> torch.Tensor:
        return self.loss_mask[:, : self.context_len]


def make_tasks(
    batch: dict[str, torch.Tensor],
    features: torch.Tensor,  # (B, T, n·H)
    context_min: int,
    context_max: int,
    block_size: int,
    generator: torch.Generator,
    context: str = "random",
) -> list[Task]:
    """One task per row that has room for a block in its context and one in its continuation.

    context="random": the split point is drawn in [context_min, context_max]; the inner loss trains
    on the context's loss-masked tokens.
    context="prompt": the split point is the row's first trained token (the prompt of a record the
    target continued, the turns before an assistant's), and the inner loss trains on every token of
    that prompt, as TTT does at inference; context_min / context_max bound the prompts used.
    """
    if context not in CONTEXT_MODES:
        raise ValueError(f"context={context!r}: choose one of {CONTEXT_MODES}")
    tasks = []
    lengths = batch["attention_mask"].sum(-1).tolist()
    for row, length in enumerate(lengths):
        ids = batch["input_ids"][row : row + 1, :length]
        loss_mask = batch["loss_mask"][row : row + 1, :length]
        if context == "prompt":
            trained = loss_mask[0].nonzero()
            ctx = int(trained[0]) if trained.numel() else length
            if not (max(context_min, block_size + 1) <= ctx <= min(context_max, length - block_size)):
                continue
            loss_mask = loss_mask.clone()
            loss_mask[:, :ctx] = 1
        else:
            lo = max(context_min, block_size + 1)
            hi = min(context_max, length - block_size)
            if hi < lo:
                continue
            ctx = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        tasks.append(Task(ids=ids, features=features[row : row + 1, :length], loss_mask=loss_mask, context_len=ctx))
    return tasks


def context_anchors(task: Task, num_anchors: int, block_size: int, generator: torch.Generator):
    valid = valid_anchor_mask(task.context_loss_mask, None, block_size)  # blocks end inside the context
    return sample_anchors(valid, num_anchors, generator)


def continuation_anchors(task: Task, num_anchors: int, block_size: int, generator: torch.Generator,
                         end: int | None = None):
    """Blocks anchored in the continuation; with `end`, anchored before it (online: in the scored chunks)."""
    hi = None if end is None else end + block_size - 1
    valid = valid_anchor_mask(task.loss_mask, None, block_size, lo=task.context_len, hi=hi)
    return sample_anchors(valid, num_anchors, generator)


def online_chunks(task: Task, online: TTTOnlineConfig, block_size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each continuation chunk the online meta-objective walks (meta.ttt.online): chunks
    of `online.chunk` tokens from the context's end, as many as can hold a block's anchor, at most
    `online.max_chunks`. Chunk c is scored on the blocks anchored in it; the update after it trains
    on the tokens before its `hi`."""
    C, T = task.context_len, task.ids.shape[1]
    n = online.chunk
    room = T - block_size + 1 - C  # anchors a in [C, T - S] hold a whole block
    count = min(online.max_chunks, -(-room // n)) if room > 0 else 0
    return [(C + c * n, min(T, C + (c + 1) * n)) for c in range(count)]


def online_update_anchors(task: Task, end: int, online: TTTOnlineConfig, block_size: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors of the update once the first `end` tokens are known: up to `online.num_anchors` blocks
    anchored in the last `online.window` of them with every label before `end`, as
    metattt.ttt.online.online_anchors draws them over committed tokens during decoding."""
    valid = valid_anchor_mask(task.loss_mask[:, :end], None, block_size, lo=max(1, end - online.window))
    return sample_anchors(valid, online.num_anchors, generator)


def chunk_anchors(anchors: torch.Tensor, anchor_ok: torch.Tensor, lo: int | torch.Tensor,
                  hi: int | torch.Tensor) -> torch.Tensor:
    """anchor_ok of the anchors in [lo, hi) (ints, or (R, 1) per row of (R, N) anchors)."""
    return anchor_ok & (anchors >= lo) & (anchors < hi)


def _attn_entropy(model) -> torch.Tensor:
    values = [m.last_entropy for m in model.modules() if getattr(m, "last_entropy", None) is not None]
    return torch.stack(values).mean() if values else torch.zeros(())


def feature_error(feature_head: torch.nn.Module | None, hidden: torch.Tensor, features: torch.Tensor,
                  anchors: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The feature objective's squared error per block position, (B, N, S-1): the drafter's hidden
    states `hidden` (B, N, S-1, H) through `feature_head` against the target's last tapped state
    (the last H channels of `features`, (B, C, n·H))."""
    if feature_head is None:
        raise ValueError("objective.feature > 0 needs a feature_head")
    H, k = hidden.shape[-1], hidden.shape[-2]
    # block position k stands where the target's state at a+k-1 predicts token a+k
    pos = (anchors[:, :, None] + torch.arange(k, device=anchors.device)).clamp(max=seq_len - 1)
    want = features[..., -H:].gather(1, pos.flatten(1)[..., None].expand(-1, -1, H)).view(*pos.shape, H)
    return (feature_head(hidden) - want.to(hidden.dtype)).pow(2).mean(-1)


def context_loss(
    f,  # drafter-like callable: Functional(model, fast) or the model itself
    ids: torch.Tensor,  # (1, C) context tokens
    features: torch.Tensor,  # (1, C, n·H) context features
    loss_mask: torch.Tensor,  # (1, C)
    anchors: torch.Tensor,  # (1, N)
    anchor_ok: torch.Tensor,  # (1, N)
    objective: TTTObjective,
    gamma: float,
    feature_head: torch.nn.Module | None = None,
    cache: ContextCache | None = None,  # the drafter's K/V of the first cache.length context positions
) -> torch.Tensor:
    """The inner (TTT) loss. Everything it reads is passed in: callers pass the context only.
    `cache` (online updates): the drafter reads those slots instead of recomputing the first
    `cache.length` positions' K/V from `features` (see `draft_hidden`)."""
    cfg = f.config
    S = cfg.block_size
    total = torch.zeros((), device=ids.device, dtype=torch.promote_types(features.dtype, torch.float32))
    if objective.block or objective.feature or objective.attn_entropy:
        labels, w = block_targets(ids, loss_mask, anchors, anchor_ok, S, gamma)
        hidden = draft_hidden(f, ids, anchors, S, cfg.mask_token_id, features, cache=cache)  # (1, N, S-1, H)
        if objective.block:
            total = total + objective.block * decayed_draft_ce(hidden, f.logits, labels, w).loss
        if objective.feature:
            err = feature_error(feature_head, hidden, features, anchors, ids.shape[1])  # (1, N, S-1)
            total = total + objective.feature * (err * (w > 0)).sum() / (w > 0).sum().clamp_min(1)
        if objective.attn_entropy:
            total = total + objective.attn_entropy * _attn_entropy(f.model if isinstance(f, Functional) else f)
    if objective.clm:
        valid = valid_anchor_mask(loss_mask, None, 2)
        a = valid[0].nonzero().flatten()[None]  # (1, M) every position with a next target token
        if a.numel():
            labels, w = block_targets(ids, loss_mask, a, torch.ones_like(a, dtype=torch.bool), 2, gamma)
            hidden = draft_hidden(f, ids, a, 2, cfg.mask_token_id, features, cache=cache)
            total = total + objective.clm * decayed_draft_ce(hidden, f.logits, labels, w).loss
    return total


def continuation_loss(f, task: Task, anchors: torch.Tensor, anchor_ok: torch.Tensor, gamma: float) -> BlockLoss:
    """The outer loss: blocks in the continuation, each seeing all target features before it."""
    cfg = f.config
    S = cfg.block_size
    labels, w = block_targets(task.ids, task.loss_mask, anchors, anchor_ok, S, gamma)
    hidden = draft_hidden(f, task.ids, anchors, S, cfg.mask_token_id, task.features)
    return decayed_draft_ce(hidden, f.logits, labels, w)


def prequential_chunks(anchors: torch.Tensor, anchor_ok: torch.Tensor, context_len: int | torch.Tensor, steps: int,
                       step: int):
    """Anchors of the `step`-th of `steps` equal slices of the context (TTT-E2E's prequential order).

    context_len: an int, or (R, 1) per row of (R, N) anchors (tasks batched, metattt.ttt.meta)."""
    lo, hi = context_len * step // steps, context_len * (step + 1) // steps
    return anchors, anchor_ok & (anchors >= lo) & (anchors < hi)


def ttt_adapt(
    model: torch.nn.Module,
    init: ParamDict,
    prompt_ids: torch.Tensor,  # (1, P)
    prompt_features: torch.Tensor,  # (1, P, n·H)
    ttt: TTTConfig,
    generator: torch.Generator | None = None,
    feature_head: torch.nn.Module | None = None,
) -> InnerResult:
    """Test-time training on a prompt: the meta-training inner loop, from `init`, first order.

    Returns detached adapted weights; `init` is never modified, so every request starts again
    from the initialization and nothing leaks from one prompt to the next.
    """
    generator = generator or torch.Generator().manual_seed(0)
    S = model.config.block_size
    loss_mask = torch.ones_like(prompt_ids)
    task = Task(prompt_ids, prompt_features, loss_mask, prompt_ids.shape[1])
    anchors, ok = context_anchors(task, ttt.num_anchors, S, generator)
    start = {n: t.detach().clone().requires_grad_(True) for n, t in init.items()}
    if not ok.any() or ttt.steps == 0:
        return InnerResult(params={n: t.detach() for n, t in start.items()})

    def loss_fn(params: ParamDict, step: int) -> torch.Tensor:
        return context_loss(Functional(model, params), prompt_ids, prompt_features, loss_mask, anchors, ok,
                            ttt.objective, ttt.gamma_for(S), feature_head)

    with torch.enable_grad():
        result = inner_loop(loss_fn, start, ttt.steps, ttt.lr_for(list(start)), ttt.clip, create_graph=False)
    result.params = {n: t.detach() for n, t in result.params.items()}
    result.losses = [loss.detach() for loss in result.losses]
    return result


def prefill_ttt(model, init: ParamDict, ids: torch.Tensor, ttt: TTTConfig, seed: int, feature_head,
                losses: list[float]):
    """An `on_prefill` hook for `speculative_generate`: TTT from `init` on the features of the
    prefill that decoding itself runs (one target forward of the prompt, as in serving), then
    the adapted LoRA goes into `model`; the TTT losses are appended to `losses`."""

    def adapt(features: torch.Tensor) -> None:
        out = ttt_adapt(model, init, ids, features, ttt, torch.Generator().manual_seed(seed), feature_head)
        set_lora(model, out.params)
        losses.extend(x.item() for x in out.losses)

    return adapt
