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


@dataclass
class MetaOutput:
    loss: torch.Tensor  # backward() on this gives the meta-gradient
    outer_loss: torch.Tensor  # continuation loss after adaptation (for logging; detached)
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
) -> MetaOutput:
    """Adapt φ with `steps` inner SGD steps on `inner_loss_fn`, score with `outer_loss_fn`.

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
    result = inner_loop(inner_loss_fn, phi, steps, lr, clip, create_graph=second_order,
                        checkpoint=checkpoint and second_order)
    if result.skipped:
        zero = sum((p * 0).sum() for p in phi.values())  # keeps every φ in the graph with a zero gradient
        return MetaOutput(loss=zero, outer_loss=torch.tensor(float("nan")), inner=result)
    if algorithm == "reptile":
        with torch.no_grad():
            outer = outer_loss_fn(result.params)
        loss = sum((phi[n] * (phi[n] - result.params[n]).detach()).sum() for n in phi)
        return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)
    outer = outer_loss_fn(result.params)
    loss = outer
    if prequential and result.losses:
        loss = (outer + torch.stack(result.losses).sum()) / (1 + len(result.losses))
    return MetaOutput(loss=loss, outer_loss=outer.detach(), inner=result)
