"""Meta-learning algorithms over the inner loop: maml (exact second order, as TTT-E2E),
fomaml (first order) and reptile. Each returns a scalar whose gradient w.r.t. the
initialization φ (and learned inner lrs) is that algorithm's meta-gradient, so one
`backward()` — which DDP syncs like any other — serves all three.
"""

from __future__ import annotations

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
    outer_loss_fn: Callable[[ParamDict], torch.Tensor],
    steps: int,
    lr: float | ParamDict,
    clip: float | None = 1.0,
    prequential: bool = False,
    checkpoint: bool = False,
    rows: int | None = None,
    check_finite: bool = True,
) -> MetaOutput:
    """Adapt φ with `steps` inner SGD steps on `inner_loss_fn`, score with `outer_loss_fn`.

    rows: R tasks at once, each adapting its own copy of φ (fast weights (R, ...), each row
        clipped by its own norm); both loss functions then return (R,) per-task losses (a row's
        loss reading only its own row of the fast weights) and `loss` is (R,): the caller averages
        the rows it keeps. None: one task, scalar losses.
    check_finite: passed to `inner_loop`; False leaves `inner.finite` for the caller to check.

    maml:    loss = L_out(θ_k(φ)), graph through every inner step (exact meta-gradient).
             With `prequential`, each inner step's loss (scored before its own update, as
             TTT-E2E does) is averaged into the outer loss with the continuation loss.
    fomaml:  loss = L_out(θ_k) with the inner gradients treated as constants, so
             ∇φ = ∇θ L_out(θ_k).
    reptile: loss = Σ ⟨φ, sg(φ − θ_k)⟩, so ∇φ = φ − θ_k; an outer SGD step with lr ε gives
             φ ← φ + ε(θ_k − φ) (mean over tasks when the caller averages).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown meta algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if prequential and algorithm != "maml":
        raise ValueError("the prequential outer loss needs algorithm=maml (it differentiates the inner losses)")
    second_order = algorithm == "maml"
    # views, not copies: the meta-gradient of φ sums its rows' in the backward
    start = phi if rows is None else {n: _Rows.apply(p, rows) for n, p in phi.items()}
    result = inner_loop(inner_loss_fn, start, steps, lr, clip, create_graph=second_order,
                        checkpoint=checkpoint and second_order, clip_per_row=rows is not None,
                        check_finite=check_finite)
    if result.skipped:
        zero = sum((p * 0).sum() for p in phi.values())  # keeps every φ in the graph with a zero gradient
        if rows is not None:
            zero = zero.expand(rows)
        return MetaOutput(loss=zero, outer_loss=torch.full(zero.shape, float("nan")), inner=result)
    if algorithm == "reptile":
        with torch.no_grad():
            outer = outer_loss_fn(result.params)
        if rows is None:
            loss = sum((phi[n] * (phi[n] - result.params[n]).detach()).sum() for n in phi)
        else:
            loss = sum((phi[n] * (phi[n] - result.params[n]).detach()).flatten(1).sum(1) for n in phi)  # (R,)
        return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)
    outer = outer_loss_fn(result.params)
    loss = outer
    if prequential and result.losses:
        loss = (outer + torch.stack(result.losses).sum(0)) / (1 + len(result.losses))
    return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)
