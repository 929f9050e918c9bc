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
`layers.*`, `norm.weight`) so `save_pretrained`/`from_pretrained` read and write that layout.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DrafterConfig:
    """Dimensions of the block drafter. `hidden_size` must equal the target's."""

    hidden_size: int
    vocab_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    num_hidden_layers: int = 5
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # RoPE beyond rope_theta, as the target's config names it (`rope_type` + its parameters, e.g.
    # Llama 3.1's llama3); None = plain RoPE. cos/sin come from transformers' own rope functions.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    block_size: int = 16
    attention_bias: bool = False
    # "sdpa" is fast; "eager" is plain matmul/softmax, which supports double backward
    # (second-order meta-gradients). Meta-training switches to eager on its own.
    attn_implementation: str = "sdpa"
    extra: dict = field(default_factory=dict)  # unknown config.json keys, kept for round trips
    # top-level keys of the config.json this was read from (None: built here); export writes them back
    source_keys: list[str] | None = field(default=None, repr=False, compare=False)
    # folder this was imported from (None: built here); export copies its non-weight files
    source_path: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (anchor + at least one draft), got {self.block_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        rope_type(self)  # an unknown or unsupported rope_scaling fails here, not at the first forward

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    @classmethod
    def from_target(cls, target_config, mask_token_id: int, target_layer_ids: list[int], **overrides) -> DrafterConfig:
        """Width and head layout from the target's config, as the published DFlash drafters do."""
        text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
        rope_theta = getattr(text, "rope_theta", None)
        if rope_theta is None:  # transformers 5 keeps it in rope_parameters
            rope_theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if set(scaling) <= {"rope_type", "type"} and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None  # plain RoPE: the config says nothing beyond rope_theta
        base = dict(
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", text.num_attention_heads),
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=getattr(text, "max_position_embeddings", 40960),
            num_target_layers=text.num_hidden_layers,
        )
        base.update(overrides)
        return cls(mask_token_id=mask_token_id, target_layer_ids=list(target_layer_ids), **base)

    # --- DFlash checkpoint layout (config.json); the rules live in metattt.export.dflash ---------
    def to_dflash_dict(self) -> dict:
        from metattt.export.dflash import config_to_dflash

        return config_to_dflash(self)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DrafterConfig:
        """Read `path/config.json` (peft calls this on the adapter's base model when saving)."""
        return cls.from_dflash_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_dflash_dict(cls, d: dict) -> DrafterConfig:
        from metattt.export.dflash import config_from_dflash

        return config_from_dflash(d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # bf16 -> fp32; fp64 stays fp64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_type(config: DrafterConfig) -> str:
    """The config's `rope_type` ("default" for plain RoPE); raises for what the drafter cannot apply."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = config.rope_scaling or {}
    if any(isinstance(v, dict) for v in scaling.values()):
        raise ValueError(f"rope_scaling {scaling} is nested per layer type; the drafter has one RoPE for all layers")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"rope_scaling {scaling}: partial rotary embeddings are not supported (the drafter "
                         "rotates whole heads, as Qwen3 does)")
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {kind!r} is not one transformers {_transformers_version()} implements: "
                         f"choose one of {['default', *ROPE_INIT_FUNCTIONS]}")
    return kind


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@functools.lru_cache(maxsize=64)
def _rope_frequencies(spec: str, seq_len: int | None, device: str) -> tuple[torch.Tensor, float]:
    """transformers' own inverse frequencies and attention scaling for one RoPE setting.

    `spec` is the JSON of `_rope_spec`; the config is the Qwen3Config that DFlash's drafter (and
    vLLM's, through transformers) reads, so every rope_type transformers supports comes out as it
    computes it. `seq_len` only for the length-dependent types (dynamic, longrope).
    """
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = json.loads(spec)
    scaling = d.pop("rope_scaling")
    kind, extra = d.pop("rope_type"), {}
    if kind == "longrope":  # transformers 4 reads it from the config, 5 from rope_parameters
        extra["original_max_position_embeddings"] = scaling.get("original_max_position_embeddings",
                                                                d["max_position_embeddings"])
    hf = Qwen3Config(**d, **extra, rope_scaling=dict(scaling) if scaling else None)
    if kind == "default":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

        # transformers 4 lists "default" among the init functions; 5 keeps it on the model's rotary class
        init = ROPE_INIT_FUNCTIONS.get("default", Qwen3RotaryEmbedding.compute_default_rope_parameters)
    else:
        init = ROPE_INIT_FUNCTIONS[kind]
    inv_freq, scale = init(hf) if seq_len is None else init(hf, seq_len=seq_len)
    return inv_freq.float().to(device), float(scale)


def _rope_spec(config: DrafterConfig, kind: str) -> str:
    return json.dumps({
        "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": float(config.rope_theta),
        "rope_scaling": config.rope_scaling or None, "rope_type": kind,
    }, sort_keys=True)


def rope_depends_on_length(config: DrafterConfig) -> bool:
    """True for the RoPE types whose frequencies change with the sequence length (dynamic NTK,
    longrope): a forward's positions must then be rotated with the same length."""
    kind = rope_type(config)
    return "dynamic" in kind or kind == "longrope"


def rotary_cos_sin(positions: torch.Tensor, config: DrafterConfig, dtype: torch.dtype, seq_len: int | None = None):
    """cos/sin tables for integer positions (..., T) -> (..., T, head_dim), as transformers'
    rotary embedding computes them for `config`'s RoPE (rope_theta + rope_scaling).

    `seq_len`: the length the length-dependent types (dynamic, longrope) scale for; None = the
    largest position here + 1, what transformers' rotary embedding uses for one forward. The
    other types ignore it.
    """
    kind = rope_type(config)
    key_len = None
    if rope_depends_on_length(config):
        n = seq_len if seq_len is not None else (int(positions.max()) + 1 if positions.numel() else 0)
        if kind == "longrope":  # transformers switches between its short and long factors
            original = (config.rope_scaling or {}).get("original_max_position_embeddings",
                                                       config.max_position_embeddings)
            key_len = original + 1 if n > original else None
        else:  # dynamic NTK rescales only past max_position_embeddings
            key_len = max(n, config.max_position_embeddings)
    inv_freq, scale = _rope_frequencies(_rope_spec(config, kind), key_len, str(positions.device))
    if kind == "longrope":  # transformers keeps the attention scaling computed at init
        scale = _rope_frequencies(_rope_spec(config, kind), None, str(positions.device))[1]
    angles = positions.float()[..., None] * inv_freq  # (..., T, d/2)
    emb = torch.cat([angles, angles], dim=-1)  # (..., T, d)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, d); cos/sin (B, T, d)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InjectedAttention(nn.Module):
    """Qwen3 attention whose keys/values also cover the projected context features."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.impl = cfg.attn_implementation
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
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)  # (B, h, C+Q, d)
        v = v.repeat_interleave(groups, dim=1)
        if self.impl == "eager":
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, h, Q, C+Q)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
            if self.track_entropy:
                self.last_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            out = probs.to(q.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Q, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, Q, self.n_heads * self.head_dim))


def set_attn_implementation(model: nn.Module, impl: str) -> None:
    """Switch every drafter attention to `impl` ("sdpa" or "eager"), e.g. for double backward."""
    for m in model.modules():
        if isinstance(m, InjectedAttention):
            m.impl = impl
        if isinstance(getattr(m, "config", None), DrafterConfig):
            m.config.attn_implementation = impl


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = InjectedAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, ctx_kv, cos_q, sin_q, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx_kv, cos_q, sin_q, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class ContextCache:
    """Per-layer K/V of the drafter's context (committed positions), for decoding."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, kv, C, d) each
    length: int


class TargetFeatureReader(nn.Module):
    """What every drafter kind shares: the target's borrowed embedding and lm_head, and the
    reader that turns target features into per-layer context keys/values (`fc` + `hidden_norm`,
    then each layer's context attention). Subclasses name that attention in `context_attention`."""

    context_attention = "self_attn"  # attribute of each layer whose `context_kv` reads the features

    def __init__(self, config: DrafterConfig, layer_cls: type[nn.Module]):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.num_features * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, config.rms_norm_eps)
        self.layers = nn.ModuleList(layer_cls(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self._shared: tuple[nn.Module, nn.Module] | None = None  # target's (embed_tokens, lm_head)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # --- the target's frozen embedding and head, borrowed, never saved ---------------------
    def attach_target(self, target):
        """Borrow `target.embed_tokens` and `target.lm_head` (kept outside this module's
        parameters and state dict, so they are neither trained nor exported)."""
        self._shared = (target.embed_tokens, target.lm_head)
        return self

    def _require_shared(self) -> tuple[nn.Module, nn.Module]:
        if self._shared is None:
            raise RuntimeError("drafter has no embedding/lm_head: call drafter.attach_target(target) first")
        return self._shared

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._require_shared()[0](ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._require_shared()[1](hidden)

    # --- context -----------------------------------------------------------------------------
    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, n·H) raw target features -> (B, C, H)."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor,
                   seq_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer context K/V; `seq_len` as in `rotary_cos_sin` (the forward's, for dynamic RoPE)."""
        ctx = self.project_context(features)  # (B, C, H)
        cos, sin = rotary_cos_sin(positions, self.config, ctx.dtype, seq_len)
        return [getattr(layer, self.context_attention).context_kv(ctx, cos, sin) for layer in self.layers]

    def extend_cache(self, cache: ContextCache | None, features: torch.Tensor) -> ContextCache:
        """Append target features of newly committed positions (B, c, n·H) to the cache."""
        start = 0 if cache is None else cache.length
        B, c, _ = features.shape
        positions = torch.arange(start, start + c, device=features.device).expand(B, c)
        new = self.context_kv(features, positions)
        if cache is None:
            return ContextCache(kv=new, length=c)
        kv = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(cache.kv, new)]
        return ContextCache(kv=kv, length=start + c)


class BlockDrafter(TargetFeatureReader):
    def __init__(self, config: DrafterConfig):
        super().__init__(config, DrafterLayer)

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        block_ids: torch.Tensor,  # (B, N, S) [anchor, MASK, ...] per block
        anchors: torch.Tensor,  # (B, N) position of each anchor in the sequence
        context_features: torch.Tensor | None = None,  # (B, C, n·H) target features at positions 0..C-1
        context_valid: torch.Tensor | None = None,  # (B, C) bool, False on padding
        cache: ContextCache | None = None,  # instead of context_features: all cached positions are visible
    ) -> torch.Tensor:
        """Hidden states after the final norm, (B, N, S, H). Use `.logits(h)` for vocab logits."""
        B, N, S = block_ids.shape
        x = self.embed(block_ids).reshape(B, N * S, -1).to(self.fc.weight.dtype)  # (B, N·S, H)
        block_pos = (anchors[:, :, None] + torch.arange(S, device=anchors.device)).reshape(B, N * S)
        if cache is not None:
            cos_q, sin_q = rotary_cos_sin(block_pos, self.config, x.dtype)
            ctx_kv = cache.kv
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

    # --- checkpoint I/O: DFlash layout (metattt.export.dflash) -------------------------------
    def save_pretrained(self, path: str | Path, dtype: str | torch.dtype | None = None,
                        max_shard_bytes: int | None = None) -> Path:
        """config.json + model.safetensors with unprefixed weights, written atomically
        (optionally cast, e.g. to bfloat16, and sharded)."""
        from metattt.export.dflash import export_dflash

        return export_dflash(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path: str | Path, attn_implementation: str = "sdpa", strict: bool = True) -> BlockDrafter:
        """A DFlash-layout folder: ours, or a released drafter (sharded or not, bf16, extra keys)."""
        from metattt.export.dflash import import_dflash

        return import_dflash(path, attn_implementation=attn_implementation, strict=strict)
