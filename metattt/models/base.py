"""What both drafter kinds share, read top to bottom: the architecture config, RMSNorm, the
target's RoPE (computed by transformers' own rope functions), the SiLU MLP, attention (eager for
double backward, SDPA otherwise), and `TargetFeatureReader` — the borrowed embedding and lm_head
and the reader that turns target features into per-layer context keys/values.

The kinds themselves: metattt.models.drafter (DFlash-style block drafter) and
metattt.models.ar_drafter (autoregressive cross-attention drafter); metattt.models.registry
names them.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BaseDrafterConfig:
    """Dimensions shared by every drafter kind. `hidden_size` must equal the target's."""

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
    def from_target(cls, target_config, mask_token_id: int, target_layer_ids: list[int], **overrides) -> BaseDrafterConfig:
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


def rope_type(config: BaseDrafterConfig) -> str:
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


def _rope_spec(config: BaseDrafterConfig, kind: str) -> str:
    return json.dumps({
        "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": float(config.rope_theta),
        "rope_scaling": config.rope_scaling or None, "rope_type": kind,
    }, sort_keys=True)


def rope_depends_on_length(config: BaseDrafterConfig) -> bool:
    """True for the RoPE types whose frequencies change with the sequence length (dynamic NTK,
    longrope): a forward's positions must then be rotated with the same length."""
    kind = rope_type(config)
    return "dynamic" in kind or kind == "longrope"


def rotary_cos_sin(positions: torch.Tensor, config: BaseDrafterConfig, dtype: torch.dtype, seq_len: int | None = None):
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


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, impl: str,
           entropy_into: nn.Module | None = None) -> torch.Tensor:
    """q (B, h, Q, d), k/v (B, kv, K, d) (grouped-query: kv divides h), mask (B|1, 1, Q, K) bool or
    None -> (B, h, Q, d).

    "eager" is plain matmul/softmax, so double backward (second-order meta-gradients) works;
    "sdpa" uses the fused kernel. With `entropy_into` (eager only, when its `track_entropy` is
    set) the mean attention entropy is kept on that module as `last_entropy` (a TTT regularizer).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, h, K, d)
    v = v.repeat_interleave(groups, dim=1)
    if impl == "eager":
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, h, Q, K)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        if entropy_into is not None and entropy_into.track_entropy:
            entropy_into.last_entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return probs.to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def set_attn_implementation(model: nn.Module, impl: str) -> None:
    """Switch every drafter attention under `model` to `impl` ("sdpa" or "eager"): attention
    modules read it from their config at every forward."""
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {impl!r}")
    for m in model.modules():
        if isinstance(getattr(m, "config", None), BaseDrafterConfig):
            m.config.attn_implementation = impl


@dataclass
class ContextCache:
    """Per-layer K/V of the drafter's context (committed positions), for decoding.

    One request: slot c holds position c, and every slot is visible. Batched requests
    (metattt.spec.batched) share one slot layout with the target's KV cache: rows are left-padded
    and keep the slots of rejected drafts, so `valid` says which slots a row's drafts may read.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (B, kv, C, d) each
    length: int  # slots C
    valid: torch.Tensor | None = None  # (B, C) bool: False on padding and dead slots; None = every slot


class TargetFeatureReader(nn.Module):
    """What every drafter kind shares: the target's borrowed embedding and lm_head, and the
    reader that turns target features into per-layer context keys/values (`fc` + `hidden_norm`,
    then each layer's context attention). Subclasses name that attention in `context_attention`."""

    context_attention = "self_attn"  # attribute of each layer whose `context_kv` reads the features

    def __init__(self, config: BaseDrafterConfig, layer_cls: type[nn.Module]):
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

    def extend_cache(self, cache: ContextCache | None, features: torch.Tensor, positions: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None) -> ContextCache:
        """Append target features of newly committed positions (B, c, n·H) to the cache.

        positions: (B, c) of the new slots; None = the slots' own indices (one request).
        valid: (B, c) bool of the new slots (batched decoding: False on padding and rejected drafts);
            None = all visible. A cache that has a `valid` mask keeps one.
        """
        start = 0 if cache is None else cache.length
        B, c, _ = features.shape
        if positions is None:
            positions = torch.arange(start, start + c, device=features.device).expand(B, c)
        new = self.context_kv(features, positions)
        mask = None
        if valid is not None or (cache is not None and cache.valid is not None):
            ones = torch.ones(B, c, dtype=torch.bool, device=features.device)
            mask = valid.bool() if valid is not None else ones
            if cache is not None:
                old = cache.valid if cache.valid is not None else ones.new_ones(B, start)
                mask = torch.cat([old, mask], 1)  # (B, start + c)
        if cache is None:
            return ContextCache(kv=new, length=c, valid=mask)
        kv = [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)) for (k0, v0), (k1, v1) in zip(cache.kv, new)]
        return ContextCache(kv=kv, length=start + c, valid=mask)

    def cache_then_features(self, cache: ContextCache, features: torch.Tensor) -> ContextCache:
        """The context of a forward given both: `cache`'s slots for positions before `cache.length`
        (one request; read as they are, gradients stop there) and K/V of `features` (B, C, n·H)
        from position `cache.length` on, computed with the weights of this call. Online TTT reads
        the decoding cache this way (metattt.ttt.online)."""
        if cache.valid is not None:
            raise ValueError("a cache read together with features holds one request's positions (no valid mask)")
        if features.shape[1] < cache.length:
            raise ValueError(f"features of {features.shape[1]} positions behind a cache of {cache.length}")
        if features.shape[1] == cache.length:
            return cache
        return self.extend_cache(cache, features[:, cache.length:])


