"""DFlash-style block drafter (arXiv 2602.06036), read top to bottom.

The drafter has no embedding and no lm_head of its own: it borrows the frozen target's.
It reads the target's hidden states from several layers, concatenated to (T, n·H) and
projected by `fc` + `hidden_norm` to the target's width H. In every drafter layer the
queries come from the block tokens only, while keys/values are the concatenation of the
projected context features and the block tokens through the same `k_proj`/`v_proj`
("KV injection"): context features never enter the residual stream.

A block is `[anchor token, MASK × (S-1)]` at positions anchor..anchor+S-1; the outputs at
block positions 1..S-1 are the drafts for tokens anchor+1..anchor+S-1. Inside a block
attention is bidirectional; a block sees context positions strictly before its anchor;
blocks never see each other. Training packs many blocks (anchors) of one sequence into a
single forward, and the attention mask keeps them apart.

Weight names follow Qwen3 / released DFlash checkpoints (`fc.weight`, `hidden_norm.weight`,
`layers.*`, `norm.weight`) so `save_pretrained`/`from_pretrained` read and write that layout
(the format rules: metattt.models.dflash). The pieces shared with the autoregressive kind
(config, norms, RoPE, attention, the feature reader) are in metattt.models.base.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metattt.models import dflash
from metattt.models.base import (
    MLP,
    BaseDrafterConfig,
    ContextCache,
    RMSNorm,
    TargetFeatureReader,
    apply_rotary,
    attend,
    rope_depends_on_length,
    rotary_cos_sin,
)

#: Chooses tokens from draft logits (n, V): returns the tokens (n,) and the distribution each was
#: drawn from (n, V), or None when decoding is greedy (metattt.spec.decode builds it). The batched
#: `draft_rows` calls one with a leading row dim: (R, n, V) -> (R, n), (R, n, V) | None.
Chooser = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass
class BlockDrafterConfig(BaseDrafterConfig):
    """The block drafter's dimensions; config.json in DFlash's layout (metattt.models.dflash)."""

    def to_dflash_dict(self) -> dict:
        return dflash.config_to_dflash(self)

    @classmethod
    def from_dflash_dict(cls, d: dict) -> BlockDrafterConfig:
        return dflash.config_from_dflash(d, cls)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BlockDrafterConfig:
        """Read `path/config.json` (peft calls this on the adapter's base model when saving)."""
        return cls.from_dflash_dict(json.loads((Path(path) / "config.json").read_text()))


def block_attention_mask(
    anchors: torch.Tensor,  # (B, N) position of each block's anchor token
    context_len: int,
    block_size: int,
    context_valid: torch.Tensor | None = None,  # (B, C) bool
) -> torch.Tensor:
    """Boolean mask (B, 1, N·S, C + N·S): True where a block query may attend.

    A query of block n sees context positions p < anchors[n] and the S tokens of block n.
    """
    B, N = anchors.shape
    S = block_size
    ctx_pos = torch.arange(context_len, device=anchors.device)
    sees_ctx = ctx_pos[None, None, :] < anchors[:, :, None]  # (B, N, C)
    if context_valid is not None:
        sees_ctx = sees_ctx & context_valid[:, None, :].bool()
    sees_ctx = sees_ctx[:, :, None, :].expand(B, N, S, context_len).reshape(B, N * S, context_len)
    block_of = torch.arange(N, device=anchors.device).repeat_interleave(S)  # (N·S,)
    sees_block = (block_of[:, None] == block_of[None, :])[None].expand(B, N * S, N * S)
    return torch.cat([sees_ctx, sees_block], dim=-1)[:, None]  # (B, 1, N·S, C + N·S)


class InjectedAttention(nn.Module):
    """Qwen3 attention whose keys/values also cover the projected context features."""

    def __init__(self, cfg: BlockDrafterConfig):
        super().__init__()
        self.cfg = cfg  # read at every forward: set_attn_implementation switches the kernel
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.track_entropy = False  # eager only: keep the mean attention entropy (a TTT regularizer)
        self.last_entropy: torch.Tensor | None = None

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, kv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, kv, T, d)
        return apply_rotary(k, cos, sin), v

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """K/V of projected context features (B, C, H); cacheable across drafting steps."""
        return self._kv(ctx, cos, sin)

    def forward(
        self,
        x: torch.Tensor,  # (B, Q, H) normed block tokens
        ctx_kv: tuple[torch.Tensor, torch.Tensor],  # (B, kv, C, d) each
        cos_q: torch.Tensor,  # (B, Q, d)
        sin_q: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, Q, C + Q) bool, or None = attend everywhere
    ) -> torch.Tensor:
        B, Q, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, Q, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, h, Q, d)
        q = apply_rotary(q, cos_q, sin_q)
        k_blk, v_blk = self._kv(x, cos_q, sin_q)  # (B, kv, Q, d)
        k = torch.cat([ctx_kv[0], k_blk], dim=2)  # (B, kv, C+Q, d)
        v = torch.cat([ctx_kv[1], v_blk], dim=2)
        out = attend(q, k, v, mask, self.cfg.attn_implementation, self)  # (B, h, Q, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: BlockDrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = InjectedAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, ctx_kv, cos_q, sin_q, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx_kv, cos_q, sin_q, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class BlockDrafter(TargetFeatureReader):
    config_class = BlockDrafterConfig
    default_lora_targets = ("fc", "q_proj", "k_proj", "v_proj")
    #: modules whose weights enter the cached context keys/values (an update of their LoRA rebuilds the cache)
    context_modules = ("fc", "k_proj", "v_proj")

    def __init__(self, config: BlockDrafterConfig):
        super().__init__(config, DrafterLayer)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        block_ids: torch.Tensor,  # (B, N, S) [anchor, MASK, ...] per block
        anchors: torch.Tensor,  # (B, N) position of each anchor in the sequence
        context_features: torch.Tensor | None = None,  # (B, C, n·H) target features at positions 0..C-1
        context_valid: torch.Tensor | None = None,  # (B, C) bool, False on padding
        cache: ContextCache | None = None,  # instead of context_features: its slots (those `cache.valid` marks)
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, N, S, H). Use `.logits(h)` for vocab logits.

        With both `cache` and `context_features`, the cache's slots stand for positions before
        `cache.length` and the features from there on are read anew (`cache_then_features`)."""
        B, N, S = block_ids.shape
        if cache is not None and context_features is not None:
            cache = self.cache_then_features(cache, context_features)
        x = self.embed(block_ids).reshape(B, N * S, -1).to(self.fc.weight.dtype)  # (B, N·S, H)
        block_pos = (anchors[:, :, None] + torch.arange(S, device=anchors.device)).reshape(B, N * S)
        if cache is not None:
            cos_q, sin_q = rotary_cos_sin(block_pos, self.config, x.dtype)
            ctx_kv = cache.kv
            if cache.valid is not None:
                # batched decoding: a slot's index is not its position, but every valid slot lies
                # before the row's anchor (the cache holds committed positions only)
                if N != 1:
                    raise ValueError(f"a cache with per-row valid slots takes one block per row, got N = {N}")
                sees_ctx = cache.valid[:, None, :].expand(B, S, cache.length)  # (B, S, C)
                mask = torch.cat([sees_ctx, sees_ctx.new_ones(B, S, S)], -1)[:, None]  # (B, 1, S, C + S)
            else:
                mask = None if N == 1 else block_attention_mask(anchors, cache.length, S)
        else:
            if context_features is None:
                raise ValueError("give context_features or a cache")
            C = context_features.shape[1]
            # one length for context and blocks, as one transformers rotary call over both positions
            span = max(C, int(block_pos.max()) + 1) if rope_depends_on_length(self.config) else None
            cos_q, sin_q = rotary_cos_sin(block_pos, self.config, x.dtype, span)
            positions = torch.arange(C, device=anchors.device).expand(B, C)
            ctx_kv = self.context_kv(context_features, positions, span)
            mask = block_attention_mask(anchors, C, S, context_valid)
        for layer, kv in zip(self.layers, ctx_kv):
            x = layer(x, kv, cos_q, sin_q, mask)
        return self.norm(x).reshape(B, N, S, -1)

    # --- what the rest of metattt calls (metattt.models.registry): drafting, one next token,
    # --- teacher-forced training states ------------------------------------------------------
    def draft(self, last_token: int, position: int, cache: ContextCache, choose: Chooser):
        """Drafts of the S-1 positions after the committed `last_token` (at `position`), all from one
        forward of [last_token, MASK × (S-1)] reading the context cache; `choose` turns the (S-1, V)
        logits into drafts: block positions are drafted in parallel, each from its own row."""
        S = self.config.block_size
        device = self.fc.weight.device
        block = torch.full((1, 1, S), self.config.mask_token_id, dtype=torch.long, device=device)  # (1, 1, S)
        block[0, 0, 0] = last_token
        hidden = self(block, torch.tensor([[position]], device=device), cache=cache)  # (1, 1, S, H)
        return choose(self.logits(hidden[0, 0, 1:]).float())  # (S-1, V) -> drafts (S-1,), q

    def draft_rows(self, last_tokens: torch.Tensor, positions: torch.Tensor, cache: ContextCache,
                   choose: Chooser) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`draft` for R requests in one forward: last_tokens (R,) at positions (R,), a batched cache
        (`cache.valid`); `choose` turns the (R, S-1, V) logits into drafts (R, S-1) and q (R, S-1, V)."""
        S = self.config.block_size
        R = last_tokens.shape[0]
        block = torch.full((R, 1, S), self.config.mask_token_id, dtype=torch.long, device=last_tokens.device)
        block[:, 0, 0] = last_tokens
        hidden = self(block, positions[:, None], cache=cache)  # (R, 1, S, H)
        return choose(self.logits(hidden[:, 0, 1:]).float())  # (R, S-1, V)

    def next_token_logits(self, last_token: int, position: int, cache: ContextCache) -> torch.Tensor:
        """The drafter's distribution of the token after `last_token` (V,): block position 1."""
        S = self.config.block_size
        device = self.fc.weight.device
        block = torch.full((1, 1, S), self.config.mask_token_id, dtype=torch.long, device=device)
        block[0, 0, 0] = last_token
        hidden = self(block, torch.tensor([[position]], device=device), cache=cache)  # (1, 1, S, H)
        return self.logits(hidden[0, 0, 1]).float()

    @staticmethod
    def teacher_forced_hidden(
        forward,  # the drafter, its peft wrapper, or a functional_call wrapper (fast weights)
        input_ids: torch.Tensor,  # (B, T)
        anchors: torch.Tensor,  # (B, N)
        context_features: torch.Tensor,  # (B, C, n·H)
        context_valid: torch.Tensor | None,  # (B, C) bool
        block_size: int,
        mask_token_id: int,
        cache: ContextCache | None = None,  # slots read instead of the features before cache.length
    ) -> torch.Tensor:
        """The hidden state behind each draft (B, N, S-1, H): one forward of [x_a, MASK × (S-1)]
        per anchor, outputs at block positions 1..S-1 (entry k-1 drafts x_{a+k})."""
        B, N = anchors.shape
        blocks = torch.full((B, N, block_size), mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
        blocks[:, :, 0] = input_ids.gather(1, anchors)  # (B, N, S)
        hidden = forward(blocks, anchors, context_features=context_features, context_valid=context_valid, cache=cache)
        return hidden[:, :, 1:]

    # --- checkpoint I/O: DFlash layout (metattt.models.dflash) -------------------------------
    def save_pretrained(self, path: str | Path, dtype: str | torch.dtype | None = None,
                        max_shard_bytes: int | None = None) -> Path:
        """config.json + model.safetensors with unprefixed weights, written atomically
        (optionally cast, e.g. to bfloat16, and sharded)."""
        return dflash.export_dflash(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str = "sdpa", strict: bool = True,
                        dtype: str | torch.dtype | None = None) -> BlockDrafter:
        """A DFlash-layout folder: ours, or a released drafter (sharded or not, bf16, extra keys), built
        in its weights' dtype unless `dtype` is given."""
        return dflash.import_dflash(path, cls, attn_implementation=attn_implementation, strict=strict, dtype=dtype)
