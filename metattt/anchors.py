"""Blocks and anchors: where training blocks sit in a sequence, and what they are scored against.

Conventions: a sequence has T tokens; an anchor at position a opens the block
`[x_a, MASK × (S-1)]`; block position k (1 ≤ k < S) predicts token x_{a+k} from the target
features of positions < a. Anchors are sampled only where the whole block fits inside the real
tokens and the first predicted token is a training target (loss mask). Distillation, the meta
inner and outer losses and test-time training all sample their blocks here.
"""

from __future__ import annotations

import torch


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


def teacher_positions(anchors: torch.Tensor, block_size: int, seq_len: int) -> torch.Tensor:
    """(B, N, S-1): positions a..a+S-2, whose next-token distributions are the target's own for
    the drafts of x_{a+1}..x_{a+S-1} (the autoregressive drafter's chain sits at the same positions)."""
    return (anchors[:, :, None] + torch.arange(block_size - 1, device=anchors.device)).clamp(max=seq_len - 1)
