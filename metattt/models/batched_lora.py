"""Request-batched LoRA for the drafter: R requests in one forward, each with its own adapter.

Multi-LoRA serving (Punica's BGMV, S-LoRA, vLLM's `lora_shrink`/`lora_expand`) computes one
shared base matmul for the whole batch plus each row's own low-rank term x·A_bᵀ·B_bᵀ. Here that
is two `bmm`s per projection beside the frozen base weight, on the modules peft wrapped (`fc`,
`q_proj`, ... for the block drafter; the cross-attention query and MLP for the autoregressive one).

Fast weights keep peft's names (`base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight`)
and gain a leading request dim: A (R, r, in), B (R, out, r). They enter the model the way the
inner loop's fast weights always do, through `torch.func.functional_call` (e.g.
`metattt.ttt.inner.Functional`), while `batched_lora(model)` is active:

    with batched_lora(model):
        hidden = Functional(model, repeat_lora(copy_lora(model), R))(blocks, anchors, context_features=f)

Inside the context a LoRA layer whose weights arrive 3-D applies them row by row; with 2-D
weights (the model's own parameters, or one adapter for all rows) it runs peft's own forward
unchanged, so the context is harmless around code that does not batch adapters. Because row b's
output depends on slice b of every A and B only, one backward of the summed row losses gives
each row its own gradient (metattt.ttt.batched).

`stack_lora` / `repeat_lora` load peft adapters (`metattt.models.lora.copy_lora`, a TTT result)
into the rows; `unstack_lora` gives each row back under peft's names and shapes, ready for
`set_lora`, `Functional` or a peft adapter folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

ParamDict = dict[str, torch.Tensor]


def lora_linears(model: nn.Module) -> dict[str, LoraLinear]:
    """peft's LoRA `Linear` modules of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _check_supported(name: str, layer: LoraLinear) -> None:
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(f"{name}: LoRA variant {type(layer.lora_variant[adapter]).__name__} "
                                      "(DoRA, ...) has no request-batched path; use plain LoRA")
        if layer.lora_B[adapter].bias is not None:
            raise NotImplementedError(f"{name}: lora_bias=True has no request-batched path")
        if getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: fan_in_fan_out (Conv1D) has no request-batched path")


def _batched_forward(layer: LoraLinear, original, row_scale: torch.Tensor | None):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        batched = [a for a in active if layer.lora_A[a].weight.dim() == 3]
        if not batched or layer.disable_adapters or kwargs.get("adapter_names") is not None:
            return original(x, *args, **kwargs)
        if layer.merged:
            raise RuntimeError("request-batched LoRA on a layer with merged adapters: unmerge first")
        result = layer.base_layer(x, *args, **kwargs)  # (R, ..., out): one shared base matmul
        out_dtype = result.dtype
        R = x.shape[0]
        for adapter in active:
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if A.dim() == 2:  # one adapter shared by every row: peft's own term
                x_a = x.to(A.dtype)
                result = result + layer.lora_B[adapter](layer.lora_A[adapter](layer.lora_dropout[adapter](x_a))) \
                    * layer.scaling[adapter]
                continue
            if B.dim() != 3 or A.shape[0] != R or B.shape[0] != R:
                raise ValueError(f"request-batched LoRA: x has {R} rows but lora_A is {tuple(A.shape)} and "
                                 f"lora_B {tuple(B.shape)} (want (R, r, in) and (R, out, r))")
            x_a = layer.lora_dropout[adapter](x.to(A.dtype)).reshape(R, -1, A.shape[-1])  # (R, T, in)
            delta = torch.bmm(torch.bmm(x_a, A.transpose(1, 2)), B.transpose(1, 2))  # (R, T, out)
            scale = layer.scaling[adapter]
            if row_scale is not None:
                scale = scale * row_scale.to(delta.device, delta.dtype).view(R, 1, 1)
            # scaling after B, in peft's order, so rows holding one adapter match peft's forward closely
            result = result + (delta * scale).reshape(result.shape)
        return result.to(out_dtype)

    return forward


@contextlib.contextmanager
def batched_lora(model: nn.Module, scale: torch.Tensor | None = None) -> Iterator[dict[str, LoraLinear]]:
    """While active, every peft LoRA `Linear` of `model` applies 3-D fast weights per request.

    scale: (R,) per-request factor on each layer's peft scaling (alpha / r); 0 turns a row's
        LoRA off (a static row in a batch of adapted ones). None: peft's scaling for every row.

    Yields the patched layers by name. Works through `functional_call` (weights swapped in by
    name) and under autograd; nested use restores each layer's previous forward on exit.
    """
    layers = lora_linears(model)
    if not layers:
        raise ValueError("batched_lora: the model has no peft LoRA Linear layers (wrap it with add_lora first)")
    if scale is not None and scale.dim() != 1:
        raise ValueError(f"batched_lora: scale must be (R,), got shape {tuple(scale.shape)}")
    for name, layer in layers.items():
        _check_supported(name, layer)
    saved = {}
    try:
        for name, layer in layers.items():
            saved[name] = layer.__dict__.get("forward")
            layer.forward = _batched_forward(layer, layer.forward, scale)
        yield layers
    finally:
        for name, previous in saved.items():
            if previous is None:
                del layers[name].forward  # back to the class's forward
            else:
                layers[name].forward = previous


def stack_lora(adapters: Sequence[ParamDict]) -> ParamDict:
    """R adapters with the same names (peft's) -> one dict of (R, ...) tensors, row b = adapters[b]."""
    if not adapters:
        raise ValueError("stack_lora: no adapters")
    names = list(adapters[0])
    for i, a in enumerate(adapters):
        if set(a) != set(names):
            raise ValueError(f"stack_lora: adapter {i} has other tensors than adapter 0")
    return {n: torch.stack([a[n] for a in adapters]) for n in names}


def repeat_lora(adapter: ParamDict, rows: int) -> ParamDict:
    """One adapter (e.g. the meta-learned init, `copy_lora(model)`) in each of `rows` rows (copies)."""
    if rows < 1:
        raise ValueError(f"repeat_lora: rows must be >= 1, got {rows}")
    return {n: t.unsqueeze(0).expand(rows, *t.shape).clone() for n, t in adapter.items()}


def unstack_lora(batched: ParamDict) -> list[ParamDict]:
    """(R, ...) fast weights -> R adapters under peft's names and shapes (views into `batched`)."""
    sizes = {t.shape[0] for t in batched.values()}
    if len(sizes) != 1:
        raise ValueError(f"unstack_lora: tensors disagree on the number of rows: {sorted(sizes)}")
    return [{n: t[b] for n, t in batched.items()} for b in range(sizes.pop())]
