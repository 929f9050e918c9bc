"""The block-prediction loss, as plain functions of tensors (blocks and anchors: metattt.anchors).

Distillation, the meta-learning inner and outer losses and test-time training all use these.

Both drafter kinds score the same drafts against the same labels: `draft_hidden` gives the hidden
state behind the drafts of x_{a+1}..x_{a+S-1} for either kind (the autoregressive drafter is
teacher-forced, see metattt.models.ar_drafter), and `decayed_draft_ce` scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metattt.anchors import block_targets, teacher_positions
from metattt.models.base import ContextCache
from metattt.models.registry import kind_of


@dataclass
class BlockLoss:
    loss: torch.Tensor  # scalar, weighted mean of (1 - w_kl)·CE + w_kl·KL (CE alone without a teacher)
    correct: torch.Tensor  # (B, N, S-1) bool: argmax == label
    weights: torch.Tensor  # (B, N, S-1)
    ce: torch.Tensor | None = None  # scalar, detached: weighted mean CE (with a teacher)
    kl: torch.Tensor | None = None  # scalar, detached: weighted mean KL(target ‖ drafter) (with a teacher)


def decayed_block_ce(
    hidden: torch.Tensor,  # (B, N, S, H) block drafter output after final norm
    lm_head,  # callable H -> V
    labels: torch.Tensor,  # (B, N, S-1)
    weights: torch.Tensor,  # (B, N, S-1)
    chunk_size: int = 4096,
) -> BlockLoss:
    """Σ w·CE / Σ w over block positions 1..S-1 (position 0, the anchor, drafts nothing)."""
    return decayed_draft_ce(hidden[:, :, 1:], lm_head, labels, weights, chunk_size)


def decayed_draft_ce(
    hidden: torch.Tensor,  # (B, N, S-1, H) hidden state behind each draft, aligned with labels
    lm_head,  # callable H -> V
    labels: torch.Tensor,  # (B, N, S-1)
    weights: torch.Tensor,  # (B, N, S-1)
    chunk_size: int = 4096,
    teacher_hidden: torch.Tensor | None = None,  # (B, N, S-1, H) target's final hidden before each draft
    kl_weight: float = 0.0,
) -> BlockLoss:
    """Σ w·CE / Σ w over the drafts of every block, computing logits in chunks.

    At real vocab sizes the logits dominate memory; chunking bounds the live fp32 logits to
    `chunk_size` positions at a time (each chunk is still part of the autograd graph).
    With `teacher_hidden` (the target's normed last-layer state at the position before each
    draft: `lm_head` of it is the target's distribution of that token), each draft's loss is
    (1 - kl_weight)·CE + kl_weight·KL(p_target ‖ p_drafter).
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (M, H)
    y = labels.reshape(-1)
    w = weights.reshape(-1)
    keep = w > 0  # only supervised positions get logits
    h, y, w_kept = h[keep], y[keep], w[keep]
    t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep] if teacher_hidden is not None else None
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least; fp64 stays fp64 (tests)
    total = torch.zeros((), device=hidden.device, dtype=acc_dtype)
    ce_total = torch.zeros((), device=hidden.device, dtype=acc_dtype)
    kl_total = torch.zeros((), device=hidden.device, dtype=acc_dtype)
    correct_kept = torch.zeros_like(y, dtype=torch.bool)
    for start in range(0, h.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = lm_head(h[chunk]).to(acc_dtype)  # (m, V)
        if t is None:
            per_draft = ce = F.cross_entropy(logits, y[chunk], reduction="none")  # (m,)
        else:
            logp = torch.log_softmax(logits, -1)  # (m, V), shared by CE and KL
            ce = F.nll_loss(logp, y[chunk], reduction="none")  # (m,)
            with torch.no_grad():
                t_logp = torch.log_softmax(lm_head(t[chunk]).to(acc_dtype), -1)  # (m, V)
            kl = (t_logp.exp() * (t_logp - logp)).sum(-1)  # (m,)
            per_draft = (1.0 - kl_weight) * ce + kl_weight * kl
            ce_total = ce_total + (ce.detach() * w_kept[chunk]).sum()
            kl_total = kl_total + (kl.detach() * w_kept[chunk]).sum()
        total = total + (per_draft * w_kept[chunk]).sum()
        correct_kept[chunk] = logits.detach().argmax(-1) == y[chunk]
    if h.shape[0] == 0:  # no supervised position in this batch: a zero loss that still has a graph
        total = hidden.sum().to(acc_dtype) * 0.0
    denom = w.sum().clamp_min(1e-8)
    correct = torch.zeros_like(labels, dtype=torch.bool).reshape(-1)
    correct[keep] = correct_kept
    parts = dict(ce=ce_total / denom, kl=kl_total / denom) if t is not None else {}
    return BlockLoss(loss=total / denom, correct=correct.view_as(labels), weights=weights, **parts)


def expected_acceptance_length(correct: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Teacher-forced proxy for τ: 1 + mean length of the all-correct prefix of each block.

    `correct`, `ok` (B, N, S-1) bool; blocks with no supervised position are ignored.
    """
    prefix = torch.cumprod((correct & ok).long(), dim=-1).sum(-1).float()  # (B, N)
    has = ok.any(-1)
    if not has.any():
        return torch.tensor(math.nan)
    return 1.0 + prefix[has].mean()


def draft_hidden(
    drafter,  # either kind, its peft wrapper, or a functional_call wrapper
    input_ids: torch.Tensor,  # (B, T)
    anchors: torch.Tensor,  # (B, N)
    block_size: int,
    mask_token_id: int,
    context_features: torch.Tensor,  # (B, C, n·H)
    context_valid: torch.Tensor | None = None,  # (B, C) bool
    cache: ContextCache | None = None,  # one request's context K/V of the positions before cache.length
) -> torch.Tensor:
    """The hidden state behind each draft: (B, N, S-1, H), entry k-1 drafting x_{a+k} (k = 1..S-1),
    as the drafter's kind computes it teacher-forced (metattt.models.registry). Either way the
    drafts of a block read only target features of positions before its anchor. With `cache`, its
    slots stand in for the features before `cache.length` (constants: no gradient reaches the
    weights through them) and only the later features are read."""
    return kind_of(drafter).teacher_forced_hidden(drafter, input_ids, anchors, context_features, context_valid,
                                                  block_size, mask_token_id, cache=cache)


def block_prediction_loss(
    drafter,  # either drafter kind (or a functional_call wrapper with the same signature)
    features: torch.Tensor,  # (B, T, n·H) target features of the visible positions
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor | None,  # (B, T)
    loss_mask: torch.Tensor,  # (B, T)
    anchors: torch.Tensor,  # (B, N)
    anchor_ok: torch.Tensor,  # (B, N)
    block_size: int,
    mask_token_id: int,
    gamma: float,
    target_hidden: torch.Tensor | None = None,  # (B, T, H) target's final hidden states, for KL
    kl_weight: float = 0.0,
) -> BlockLoss:
    """The drafter's training objective: decayed CE of every sampled block (mixed with KL to the
    target's own next-token distributions when `target_hidden` is given, see `decayed_draft_ce`).

    Callers decide what the drafter may see by what they pass: the meta inner loss passes the
    context prefix only, so no continuation token or feature can reach it.
    """
    labels, weights = block_targets(input_ids, loss_mask, anchors, anchor_ok, block_size, gamma)
    valid = attention_mask.bool() if attention_mask is not None else None
    hidden = draft_hidden(drafter, input_ids, anchors, block_size, mask_token_id, features, valid)  # (B, N, S-1, H)
    teacher = None
    if target_hidden is not None:
        pos = teacher_positions(anchors, block_size, input_ids.shape[1])  # (B, N, S-1)
        teacher = target_hidden.gather(1, pos.flatten(1)[:, :, None].expand(-1, -1, target_hidden.shape[-1]))
        teacher = teacher.view(*pos.shape, -1)  # (B, N, S-1, H)
    return decayed_draft_ce(hidden, drafter.logits, labels, weights, teacher_hidden=teacher, kl_weight=kl_weight)
