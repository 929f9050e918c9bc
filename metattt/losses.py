"""Block sampling and the block-prediction loss, as plain functions of tensors.

Distillation, the meta-learning inner and outer losses and test-time training all use these.
Conventions: a sequence has T tokens; an anchor at position a opens the block
`[x_a, MASK × (S-1)]`; block position k (1 ≤ k < S) predicts token x_{a+k} from the target
features of positions < a. Anchors are sampled only where the whole block fits inside the
real tokens and the first predicted token is a training target (loss mask).

Both drafter kinds score the same drafts against the same labels: `draft_hidden` gives the hidden
state behind the drafts of x_{a+1}..x_{a+S-1} for either kind (the autoregressive drafter is
teacher-forced, see metattt.models.ar_drafter), and `decayed_draft_ce` scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metattt.models.ar_drafter import drafter_kind


def default_gamma(block_size: int) -> float:
    """DFlash's decay constants: γ = 7 for S = 16, 5 for 10, 4 for 8; else ~S/2.3."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, round(block_size / 2.3, 1)))


def position_weights(block_size: int, gamma: float, device=None) -> torch.Tensor:
    """exp(-(k-1)/γ) for block positions k = 1..S-1 -> (S-1,)."""
    k = torch.arange(1, block_size, device=device, dtype=torch.float32)
    return torch.exp(-(k - 1) / gamma)


def valid_anchor_mask(
    loss_mask: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor | None,  # (B, T)
    block_size: int,
    lo: torch.Tensor | int = 1,  # first allowed anchor, per row (B,) or scalar
    hi: torch.Tensor | int | None = None,  # last allowed anchor + block - 1 must be < hi (exclusive end)
) -> torch.Tensor:
    """(B, T) bool: positions a with lo ≤ a, a + S - 1 < min(length, hi), loss_mask[a + 1] = 1."""
    B, T = loss_mask.shape
    device = loss_mask.device
    length = attention_mask.long().sum(-1) if attention_mask is not None else torch.full((B,), T, device=device)
    end = length if hi is None else torch.minimum(length, torch.as_tensor(hi, device=device).expand(B))
    pos = torch.arange(T, device=device)[None]  # (1, T)
    lo_t = torch.as_tensor(lo, device=device).expand(B)[:, None]
    ok = (pos >= lo_t) & (pos + block_size - 1 < end[:, None])
    next_is_target = torch.zeros_like(ok)
    next_is_target[:, :-1] = loss_mask[:, 1:].bool()
    return ok & next_is_target


def sample_anchors(
    valid: torch.Tensor,  # (B, T) bool
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_anchors` distinct valid positions per row, uniformly, sorted.

    Returns anchors (B, N) and anchor_ok (B, N); rows with fewer valid positions are padded
    with anchor 0 and anchor_ok False (their loss weight is zero).
    """
    B, T = valid.shape
    n = min(num_anchors, T)
    scores = torch.rand(B, T, generator=generator, device="cpu").to(valid.device)
    scores = scores.masked_fill(~valid, -1.0)
    top, idx = scores.topk(n, dim=-1)  # (B, n)
    ok = top >= 0
    idx = torch.where(ok, idx, torch.zeros_like(idx))
    # sort real anchors by position, padding last
    key = torch.where(ok, idx, torch.full_like(idx, T))
    order = key.argsort(dim=-1)
    return idx.gather(1, order), ok.gather(1, order)


def make_blocks(
    input_ids: torch.Tensor,  # (B, T)
    anchors: torch.Tensor,  # (B, N)
    block_size: int,
    mask_token_id: int,
) -> torch.Tensor:
    """Block inputs (B, N, S): the anchor token followed by S-1 mask tokens."""
    B, N = anchors.shape
    blocks = torch.full((B, N, block_size), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    blocks[:, :, 0] = input_ids.gather(1, anchors)
    return blocks


def block_targets(
    input_ids: torch.Tensor,  # (B, T)
    loss_mask: torch.Tensor,  # (B, T)
    anchors: torch.Tensor,  # (B, N)
    anchor_ok: torch.Tensor,  # (B, N)
    block_size: int,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, N, S-1) = x_{a+k}, and weights (B, N, S-1) = exp(-(k-1)/γ)·loss_mask·anchor_ok."""
    T = input_ids.shape[1]
    offs = torch.arange(1, block_size, device=anchors.device)
    pos = (anchors[:, :, None] + offs).clamp(max=T - 1)  # (B, N, S-1)
    labels = input_ids.gather(1, pos.flatten(1)).view_as(pos)
    w = position_weights(block_size, gamma, anchors.device)[None, None]
    w = w * loss_mask.gather(1, pos.flatten(1)).view_as(pos).float() * anchor_ok[:, :, None].float()
    return labels, w


@dataclass
class BlockLoss:
    loss: torch.Tensor  # scalar, weighted mean of (1 - w_kl)·CE + w_kl·KL (CE alone without a teacher)
    correct: torch.Tensor  # (B, N, S-1) bool: argmax == label
    weights: torch.Tensor  # (B, N, S-1)
    ce: torch.Tensor | None = None  # scalar, detached: weighted mean CE (with a teacher)
    kl: torch.Tensor | None = None  # scalar, detached: weighted mean KL(target ‖ drafter) (with a teacher)


def teacher_positions(anchors: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """(B, N, S-1): positions a..a+S-2, whose next-token distributions are the target's own for
    the drafts of x_{a+1}..x_{a+S-1} (the autoregressive drafter's chain sits at the same positions)."""
    return (anchors[:, :, None] + torch.arange(block_size - 1, device=anchors.device)).clamp(max=seq_len - 1)


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
) -> torch.Tensor:
    """The hidden state behind each draft: (B, N, S-1, H), entry k-1 drafting x_{a+k} (k = 1..S-1).

    block:          one forward of [x_a, MASK × (S-1)]; its outputs at block positions 1..S-1.
    autoregressive: teacher forcing, the chain [x_a, ..., x_{a+S-2}] at positions a..a+S-2 (chain
                    output j predicts x_{a+j+1}), every chain position seeing features < a, which
                    is exactly what incremental drafting from the committed token x_a computes.
    Either way the drafts of a block read only target features of positions before its anchor.
    """
    if drafter_kind(drafter) == "autoregressive":
        pos = teacher_positions(anchors, block_size, input_ids.shape[1])
        chain = input_ids.gather(1, pos.flatten(1)).view_as(pos)  # (B, N, S-1): true tokens x_a..x_{a+S-2}
        return drafter(chain, anchors, context_features=context_features, context_valid=context_valid)
    blocks = make_blocks(input_ids, anchors, block_size, mask_token_id)  # (B, N, S)
    hidden = drafter(blocks, anchors, context_features=context_features, context_valid=context_valid)
    return hidden[:, :, 1:]


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
