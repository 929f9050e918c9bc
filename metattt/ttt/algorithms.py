"""Meta-learning algorithms over the inner loop: maml (exact second order, as TTT-E2E),
fomaml (first order) and reptile. Each returns a scalar whose gradient w.r.t. the
initialization φ (and learned inner lrs) is that algorithm's meta-gradient, so one
`backward()` — which DDP syncs like any other — serves all three.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metattt.ttt.inner import InnerResult, ParamDict, inner_loop

ALGORITHMS = ("maml", "fomaml", "reptile")


class _Rows(torch.autograd.Function):
    """φ -> (R, ...) rows that are views of it, one task's fast weights each. The backward sums the
    rows' gradients into one laid out like φ (an expand's would keep the strides of the batched
    matmul's transposed operand, and callers view gradients flat)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, rows: int) -> torch.Tensor:
        return p.unsqueeze(0).expand(rows, *p.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.sum(0).contiguous(), None


@dataclass
class MetaOutput:
    loss: torch.Tensor  # backward() on this gives the meta-gradient; (R,) per task with `rows`
    outer_loss: torch.Tensor  # continuation loss after adaptation (for logging; detached), () or (R,)
    inner: InnerResult


def meta_objective(
    algorithm: str,
    phi: ParamDict,
    inner_loss_fn: Callable[[ParamDict, int], torch.Tensor],
    outer_loss_fn: Callable[..., torch.Tensor],
    steps: int,
    lr: float | ParamDict,
    clip: float | None = 1.0,
    prequential: bool = False,
    checkpoint: bool = False,
    rows: int | None = None,
    check_finite: bool = True,
    online_chunks: int = 0,
    online_steps: int = 1,
) -> MetaOutput:
    """Adapt φ with `steps` inner SGD steps on `inner_loss_fn`, score with `outer_loss_fn`.

    rows: R tasks at once, each adapting its own copy of φ (fast weights (R, ...), each row
        clipped by its own norm); both loss functions then return (R,) per-task losses (a row's
        loss reading only its own row of the fast weights) and `loss` is (R,): the caller averages
        the rows it keeps. None: one task, scalar losses.
    check_finite: passed to `inner_loop`; False leaves `inner.finite` for the caller to check.
    online_chunks: 0: `outer_loss_fn(θ)` scores the continuation once, after the context steps.
        C > 0 (meta.ttt.online): the continuation is walked in C chunks. `outer_loss_fn(θ, c)` is
        chunk c's share of the continuation loss (Σ w·CE over its blocks / Σ w over every chunk's
        blocks), scored with the weights θ^(c) in use before training on it: θ^(0) = θ_k after the
        context steps, θ^(c+1) = θ^(c) after `online_steps` more steps of the one inner loop, inner
        steps numbered on from `steps` (k + c·online_steps + i). L_out = Σ_c share_c(θ^(c)), each
        block of the continuation scored as decoding with online updates would draft it. The update
        after the last chunk is run for reptile only: no score depends on it.

    maml:    loss = L_out, graph through every inner step (exact meta-gradient).
    fomaml:  loss = L_out with the inner gradients treated as constants, so
             ∇φ = ∇θ L_out(θ_k), online: Σ_c ∇θ share_c(θ^(c)), each chunk's gradient at the fast
             weights in use when it was scored.
    With `prequential` (both): each inner step's loss on its context chunk, scored before its own
             update as TTT-E2E does, is averaged in: loss = (L_out + Σ_j L_j(θ_j)) / (1 + k); the
             first order form adds Σ_j ∇θ L_j(θ_j).
    reptile: loss = Σ ⟨φ, sg(φ − θ_T)⟩, so ∇φ = φ − θ_T with θ_T the final fast weights (after the
             context steps, and online after every chunk's update, the last one's included); an
             outer SGD step with lr ε gives φ ← φ + ε(θ_T − φ) (mean over tasks when the caller
             averages). L_out is computed for logging only.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown meta algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    second_order = algorithm == "maml"
    # views, not copies: the meta-gradient of φ sums its rows' in the backward
    start = phi if rows is None else {n: _Rows.apply(p, rows) for n, p in phi.items()}
    kw = dict(lr=lr, clip=clip, create_graph=second_order, checkpoint=checkpoint and second_order,
              clip_per_row=rows is not None, check_finite=check_finite)
    # first order keeps the prequential losses' graphs: their gradients at θ_j are the meta-gradient's
    result = inner_loop(inner_loss_fn, start, steps, retain_graph=prequential and algorithm == "fomaml", **kw)
    if result.skipped:
        return _skipped(phi, rows, result)
    scored = torch.no_grad() if algorithm == "reptile" else contextlib.nullcontext()
    if online_chunks:
        params, losses, finite = result.params, list(result.losses), result.finite
        shares = []
        updates = online_chunks if algorithm == "reptile" else online_chunks - 1
        for c in range(online_chunks):
            with scored:
                shares.append(outer_loss_fn(params, c))
            if c >= updates:
                continue
            offset = steps + c * online_steps
            step = inner_loop(lambda p, i, offset=offset: inner_loss_fn(p, offset + i), params, online_steps, **kw)
            if step.skipped:
                return _skipped(phi, rows, InnerResult(params=result.params, losses=losses + step.losses, skipped=True,
                                                        reason=step.reason, finite=step.finite))
            params, finite = step.params, finite & step.finite
            losses.extend(step.losses)
        outer = torch.stack(shares).sum(0)
        result = InnerResult(params=params, losses=losses, finite=finite)
    else:
        with scored:
            outer = outer_loss_fn(result.params)
    if algorithm == "reptile":
        if rows is None:
            loss = sum((phi[n] * (phi[n] - result.params[n]).detach()).sum() for n in phi)
        else:
            loss = sum((phi[n] * (phi[n] - result.params[n]).detach()).flatten(1).sum(1) for n in phi)  # (R,)
        return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)
    loss = outer
    if prequential and steps:
        loss = (outer + torch.stack(result.losses[:steps]).sum(0)) / (1 + steps)
    return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)


def _skipped(phi: ParamDict, rows: int | None, result: InnerResult) -> MetaOutput:
    zero = sum((p * 0).sum() for p in phi.values())  # keeps every φ in the graph with a zero gradient
    if rows is not None:
        zero = zero.expand(rows)
    return MetaOutput(loss=zero, outer_loss=torch.full(zero.shape, float("nan")), inner=result)
