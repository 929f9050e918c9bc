"""Autoregressive cross-attention drafter: one token per forward, reading the target through
cross-attention. The second drafter kind (`drafter.kind: autoregressive`), read top to bottom.

Like the block drafter (metattt.models.drafter; what both share: metattt.models.base) it has no
embedding and no lm_head of its own: it
borrows the frozen target's. Its width is the target's hidden size, and it reads the same target
features: the outputs of decoder layers `target_layer_ids`, concatenated to (T, n·H), projected by
`fc` + `hidden_norm` to (T, H). What differs is how it reads them and how it drafts:

- It is a small causal decoder. Each layer is Qwen3-style pre-norm with three sublayers:
  self-attention over the drafter's own tokens, cross-attention whose queries come from those
  tokens and whose keys/values are the projected target features (per-layer `cross_k_proj` /
  `cross_v_proj`, cacheable across drafting steps), and the SiLU-gated MLP. Features never enter
  the residual stream; a query can attend to the one context position that matters wherever it is.
- It drafts one token per forward, feeding its own drafts back through self-attention with a KV
  cache (`ChainCache`).

Conventions (positions index the prompt + generated tokens x_0, x_1, ...; f_p is the target's
feature at position p, computed from x_0..x_p, the state that predicts x_{p+1}):

- A *chain* is anchored at the last committed token x_a. Chain position k (k = 0, 1, ...) sits at
  sequence position a + k; its input is x_{a+k} (k = 0: the committed anchor token; k ≥ 1: the
  drafter's own k-th draft) and its output predicts x_{a+k+1}.
- Every chain position cross-attends to target features f_0..f_{a-1} only, i.e. to committed
  positions strictly before the anchor (the anchor's own feature does not exist yet at inference:
  the target has not run on x_a). Features of drafted tokens are never read.
- Self-attention is causal inside the chain and sees nothing else: the committed history reaches
  the drafter only through the target features. (The drafter has no KV cache of committed tokens,
  so no drafter state ever depends on how earlier verification steps went.)
- RoPE positions are sequence positions, for queries and keys of both attentions; the RoPE is
  the target's (rope_theta and rope_scaling, computed by transformers' rope functions).

Inference (metattt.spec.decode): after the target committed x_0..x_c, the cross-attention cache
holds f_0..f_{c-1} (the same context cache as the block drafter's: every committed position but
the newest token); γ = block_size - 1 drafts come from γ forwards of one token each: x_c at c,
then d_1 at c+1, ..., d_{γ-1} at c+γ-1, all reading f_0..f_{c-1}. The target verifies
[x_c, d_1..d_γ] in one forward, as with the block drafter, so 1 ≤ τ ≤ block_size for both kinds.

Training (`ARDrafter.teacher_forced_hidden`) is exactly that, teacher-forced: sample anchors a as the
block drafter does; the chain's inputs are the true tokens [x_a, ..., x_{a+S-2}] (S = block_size),
output k predicts x_{a+k+1}, and every chain position sees features < a. Many chains of one
sequence share one forward; the attention masks keep them apart. With the true tokens as inputs
the teacher-forced logits equal the incremental (KV-cached) drafting logits of the same tokens
(tests/test_ar_drafter.py checks it), so train and inference match exactly.

A query with no visible feature (an anchor at position 0, or an empty cache) reads nothing
through cross-attention (its output there is zero, not a softmax over nothing).

Checkpoints: `config.json` with `architectures: ["ARCrossAttnDraftModel"]` and the config fields,
plus `model.safetensors` with unprefixed weights (`fc.*`, `hidden_norm.*`, `layers.*`, `norm.*`).
`metattt.models.registry.load_drafter` picks the kind of a folder by its `architectures`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from metattt.atomic import atomic_dir
from metattt.errors import check_safetensors
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
from metattt.models.dflash import to_dtype
from metattt.models.drafter import Chooser

ARCHITECTURE = "ARCrossAttnDraftModel"
KIND = "autoregressive"


@dataclass
class ARDrafterConfig(BaseDrafterConfig):
    """Dimensions of the autoregressive drafter (the block drafter's, read the same way).

    `block_size` keeps its meaning for verification: the anchor + block_size - 1 drafts per step.
    `mask_token_id` is unused (no mask tokens are drafted); it is kept so both kinds share the
    config interface (-1 when the tokenizer has none).
    """

    kind: str = KIND

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != KIND:
            raise ValueError(f"ARDrafterConfig.kind must be {KIND!r}, got {self.kind!r}")

    def to_dict(self) -> dict:
        skip = {"extra", "source_keys", "source_path", "attn_implementation"}
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return {"architectures": [ARCHITECTURE], "model_type": "metattt_ar_drafter", **self.extra, **own}

    @classmethod
    def from_dict(cls, d: dict) -> ARDrafterConfig:
        d = dict(d)
        archs = d.pop("architectures", None) or [ARCHITECTURE]
        if archs != [ARCHITECTURE]:
            raise ValueError(f"architectures {archs} is not [{ARCHITECTURE!r}]: not an autoregressive drafter")
        d.pop("model_type", None)
        names = {f.name for f in fields(cls)} - {"extra", "source_keys", "source_path", "attn_implementation"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**known, extra=d)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ARDrafterConfig:
        """Read `path/config.json` (peft calls this on the adapter's base model when saving)."""
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))


def is_ar_checkpoint(path: str | Path) -> bool:
    """True if `path/config.json` names this drafter's architecture."""
    config = Path(path) / "config.json"
    return config.is_file() and ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


# --- attention ------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Causal self-attention over the drafter's own chain tokens, with an optional KV cache."""

    def __init__(self, cfg: ARDrafterConfig):
        super().__init__()
        self.cfg = cfg
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

    def forward(
        self,
        x: torch.Tensor,  # (B, Q, H) normed chain tokens
        cos: torch.Tensor,  # (B, Q, d)
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (1, 1, Q, P + Q) bool, or None = attend everywhere
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, kv, P, d) each: earlier chain tokens
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """-> output (B, Q, H) and the K/V of past + these tokens (B, kv, P + Q, d), to cache."""
        B, Q, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, Q, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, h, Q, d)
        k = self.k_norm(self.k_proj(x).view(B, Q, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, kv, Q, d)
        v = self.v_proj(x).view(B, Q, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = attend(q, k, v, mask, self.cfg.attn_implementation, self)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim)), (k, v)


class CrossAttention(nn.Module):
    """Queries from the chain tokens; keys/values from the projected target features."""

    def __init__(self, cfg: ARDrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        # distinct leaf names, so LoRA (which names modules by their last name) can pick them alone
        self.cross_q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.cross_k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.cross_v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.cross_o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.track_entropy = False
        self.last_entropy: torch.Tensor | None = None

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """K/V of projected context features (B, C, H) -> (B, kv, C, d) each; cacheable."""
        B, C, _ = ctx.shape
        k = self.k_norm(self.cross_k_proj(ctx).view(B, C, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.cross_v_proj(ctx).view(B, C, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,  # (B, Q, H) normed chain tokens
        ctx_kv: tuple[torch.Tensor, torch.Tensor],  # (B, kv, C, d) each
        cos: torch.Tensor,  # (B, Q, d) of the queries' positions
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # (B, 1, Q, C) bool, or None = every feature visible
    ) -> torch.Tensor:
        B, Q, _ = x.shape
        if ctx_kv[0].shape[2] == 0:  # no committed feature at all: nothing to read
            return x.new_zeros(B, Q, self.cfg.hidden_size)
        q = self.q_norm(self.cross_q_proj(x).view(B, Q, self.n_heads, self.head_dim)).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        sees_any = None
        if mask is not None:
            # a query that sees no feature (anchor 0) attends nowhere: let it attend everywhere
            # (finite for every kernel, also in the backward) and zero its output afterwards
            sees_any = mask.any(-1, keepdim=True)  # (B, 1, Q, 1)
            mask = mask | ~sees_any
        out = attend(q, ctx_kv[0], ctx_kv[1], mask, self.cfg.attn_implementation, self)  # (B, h, Q, d)
        if sees_any is not None:
            out = out * sees_any.to(out.dtype)
        return self.cross_o_proj(out.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim))


class ARDrafterLayer(nn.Module):
    def __init__(self, cfg: ARDrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.cross_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, self_mask, ctx_kv, cross_mask, past=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, self_mask, past)
        x = x + h
        x = x + self.cross_attn(self.cross_attention_layernorm(x), ctx_kv, cos, sin, cross_mask)
        return x + self.mlp(self.post_attention_layernorm(x)), kv


# --- masks ----------------------------------------------------------------------------------


def chain_self_mask(num_chains: int, length: int, device=None) -> torch.Tensor:
    """(1, 1, N·L, N·L) bool: chain position k of chain n sees positions 0..k of chain n only."""
    idx = torch.arange(num_chains * length, device=device)
    chain, pos = idx // length, idx % length
    sees = (chain[:, None] == chain[None, :]) & (pos[None, :] <= pos[:, None])
    return sees[None, None]


def chain_cross_mask(anchors: torch.Tensor, context_len: int, length: int,
                     context_valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, N·L, C) bool: every position of the chain anchored at a sees features p < a."""
    B, N = anchors.shape
    sees = torch.arange(context_len, device=anchors.device)[None, None, :] < anchors[:, :, None]  # (B, N, C)
    if context_valid is not None:
        sees = sees & context_valid[:, None, :].bool()
    return sees[:, :, None, :].expand(B, N, length, context_len).reshape(B, N * length, context_len)[:, None]


@dataclass
class ChainCache:
    """Self-attention K/V of the chain drafted so far (one chain: N = 1), grown in place by forward."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer (B, kv, L, d) each
    length: int = 0  # chain positions already processed


# --- the drafter ----------------------------------------------------------------------------


class ARDrafter(TargetFeatureReader):
    context_attention = "cross_attn"  # target features enter through cross-attention
    config_class = ARDrafterConfig
    #: LoRA targets when `lora.target_modules` is null: the cross-attention query and the MLP
    default_lora_targets = ("cross_q_proj", "gate_proj", "up_proj", "down_proj")
    #: modules whose weights enter the cached context keys/values (an update of their LoRA rebuilds the cache)
    context_modules = ("fc", "cross_k_proj", "cross_v_proj")

    def __init__(self, config: ARDrafterConfig):
        super().__init__(config, ARDrafterLayer)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        block_ids: torch.Tensor,  # (B, N, L) chain inputs [x_a, x_{a+1}, ...] per chain
        anchors: torch.Tensor,  # (B, N) position a of each chain's first token
        context_features: torch.Tensor | None = None,  # (B, C, n·H) target features at positions 0..C-1
        context_valid: torch.Tensor | None = None,  # (B, C) bool, False on padding
        cache: ContextCache | None = None,  # instead of context_features: its slots (those `cache.valid` marks)
        chain_cache: ChainCache | None = None,  # decoding: continue this chain (N = 1); extended in place
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, N, L, H): entry k predicts x_{a+k+1}.

        Without `chain_cache` the L tokens are a whole chain starting at its anchor (training:
        teacher forcing). With it, they continue the chain after its `chain_cache.length` cached
        positions (at a + length, ...), and their self-attention K/V is appended to the cache.
        """
        B, N, L = block_ids.shape
        if cache is not None and context_features is not None:
            cache = self.cache_then_features(cache, context_features)
        x = self.embed(block_ids).reshape(B, N * L, -1).to(self.fc.weight.dtype)  # (B, N·L, H)
        offset = 0 if chain_cache is None else chain_cache.length
        pos = (anchors[:, :, None] + offset + torch.arange(L, device=anchors.device)).reshape(B, N * L)
        # uncached: one length for the chains and the features, as one rotary call over both
        span = None
        if cache is None and context_features is not None and rope_depends_on_length(self.config):
            span = max(context_features.shape[1], int(pos.max()) + 1)
        cos, sin = rotary_cos_sin(pos, self.config, x.dtype, span)
        if chain_cache is None:
            self_mask = chain_self_mask(N, L, anchors.device)
        else:
            if N != 1:
                raise ValueError(f"a chain cache continues one chain per row (N = 1), got N = {N}")
            # new token i (at chain position offset + i) sees cached positions and new tokens <= i
            keys = torch.arange(offset + L, device=anchors.device)
            new = offset + torch.arange(L, device=anchors.device)
            self_mask = None if L == 1 else (keys[None, :] <= new[:, None])[None, None]  # (1, 1, L, offset + L)
        if cache is not None:
            ctx_kv = cache.kv
            if cache.valid is not None:
                # batched decoding: every valid slot is a committed position before the row's anchor
                if N != 1:
                    raise ValueError(f"a cache with per-row valid slots takes one chain per row, got N = {N}")
                cross_mask = cache.valid[:, None, None, :].expand(B, 1, L, cache.length)  # (B, 1, L, C)
            else:
                cross_mask = None if N == 1 else chain_cross_mask(anchors, cache.length, L)
        else:
            if context_features is None:
                raise ValueError("give context_features or a cache")
            C = context_features.shape[1]
            ctx_kv = self.context_kv(context_features, torch.arange(C, device=anchors.device).expand(B, C), span)
            cross_mask = chain_cross_mask(anchors, C, L, context_valid)
        new_kv = []
        for i, (layer, kv) in enumerate(zip(self.layers, ctx_kv)):
            past = chain_cache.kv[i] if chain_cache is not None and chain_cache.kv else None
            x, self_kv = layer(x, cos, sin, self_mask, kv, cross_mask, past)
            new_kv.append(self_kv)
        if chain_cache is not None:
            chain_cache.kv, chain_cache.length = new_kv, offset + L
        return self.norm(x).reshape(B, N, L, -1)

    # --- what the rest of metattt calls (metattt.models.registry): drafting, one next token,
    # --- teacher-forced training states ------------------------------------------------------
    def draft(self, last_token: int, position: int, cache: ContextCache, choose: Chooser):
        """S-1 forwards of one token each, starting at the committed `last_token` (at `position`) and
        feeding each chosen draft back through the chain's KV cache; every step reads the same
        context cache (features before `position`), never features of drafted tokens. Row k of the
        returned distribution is what d_{k+1} was drawn from given d_1..d_k."""
        device = self.fc.weight.device
        anchors = torch.tensor([[position]], device=device)  # (1, 1)
        chain = ChainCache()
        token = last_token
        drafts, qs = [], []
        for _ in range(self.config.block_size - 1):
            hidden = self(torch.tensor([[[token]]], device=device), anchors, cache=cache, chain_cache=chain)
            picked, q = choose(self.logits(hidden[0, 0, -1:]).float())  # (1, V) -> (1,), (1, V) | None
            token = int(picked[0])
            drafts.append(token)
            if q is not None:
                qs.append(q[0])
        return torch.tensor(drafts, device=device), (torch.stack(qs) if qs else None)

    def draft_rows(self, last_tokens: torch.Tensor, positions: torch.Tensor, cache: ContextCache,
                   choose: Chooser) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`draft` for R requests at once: last_tokens (R,) at positions (R,), a batched cache
        (`cache.valid`); S-1 forwards of one token per row, every row's chain as long as the others'.
        `choose` turns (R, 1, V) logits into tokens (R, 1) and q (R, 1, V) | None. Returns drafts
        (R, S-1) and q (R, S-1, V) | None."""
        chain = ChainCache()
        token = last_tokens
        drafts, qs = [], []
        for _ in range(self.config.block_size - 1):
            hidden = self(token[:, None, None], positions[:, None], cache=cache, chain_cache=chain)  # (R, 1, 1, H)
            picked, q = choose(self.logits(hidden[:, 0, -1:]).float())  # (R, 1, V) -> (R, 1), (R, 1, V) | None
            token = picked[:, 0]
            drafts.append(token)
            if q is not None:
                qs.append(q)
        return torch.stack(drafts, 1), (torch.cat(qs, 1) if qs else None)

    def next_token_logits(self, last_token: int, position: int, cache: ContextCache) -> torch.Tensor:
        """The drafter's distribution of the token after `last_token` (V,): one chain step."""
        device = self.fc.weight.device
        hidden = self(torch.tensor([[[last_token]]], device=device), torch.tensor([[position]], device=device),
                      cache=cache, chain_cache=ChainCache())
        return self.logits(hidden[0, 0, -1]).float()

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
        """The hidden state behind each draft (B, N, S-1, H), teacher-forced: the chain of true
        tokens [x_a, ..., x_{a+S-2}] at positions a..a+S-2 (chain output j predicts x_{a+j+1}),
        every chain position seeing features < a — what incremental drafting from x_a computes."""
        T = input_ids.shape[1]
        pos = (anchors[:, :, None] + torch.arange(block_size - 1, device=anchors.device)).clamp(max=T - 1)
        chain = input_ids.gather(1, pos.flatten(1)).view_as(pos)  # (B, N, S-1)
        return forward(chain, anchors, context_features=context_features, context_valid=context_valid, cache=cache)

    # --- checkpoint I/O ----------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, dtype: str | torch.dtype | None = None) -> Path:
        """config.json + model.safetensors (unprefixed weights), written atomically, optionally cast."""
        from safetensors.torch import save_file

        cast = to_dtype(dtype)
        state = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            state[k] = (v.to(cast) if cast is not None and v.is_floating_point() else v).contiguous().cpu()
        if any("lora_" in k for k in state):
            raise ValueError("the drafter still carries LoRA tensors: merge them (merge_and_unload) or export the base")
        config = self.config.to_dict()
        float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(float_dtypes) == 1:
            config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
        path = Path(path)
        with atomic_dir(path) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str = "sdpa", strict: bool = True) -> ARDrafter:
        """A folder written by `save_pretrained`; built in the dtype of its weights."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no drafter at {path}: expected config.json + model.safetensors")
        config = ARDrafterConfig.from_pretrained(path)
        config.extra.pop("torch_dtype", None)
        config.attn_implementation = attn_implementation
        check_safetensors(path / "model.safetensors")  # a truncated file: name it and the stage that writes it
        state = load_file(str(path / "model.safetensors"))
        model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"drafter weights in {path} do not match its config: missing {missing}, "
                             f"unexpected {unexpected}")
        float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        return model.to(float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
