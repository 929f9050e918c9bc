"""Meta-gradients against closed forms on quadratics (meta-gradient correctness)."""

from __future__ import annotations

import pytest
import torch

from metattt.ttt.algorithms import meta_objective
from metattt.ttt.inner import clip_by_global_norm, inner_loop


def _problem(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def spd():
        m = torch.randn(n, n, generator=g, dtype=torch.float64)
        return m @ m.T / n + 0.5 * torch.eye(n, dtype=torch.float64)

    A, B = spd(), spd()
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    theta0 = torch.randn(n, generator=g, dtype=torch.float64)

    def inner(params, step):
        d = params["w"] - a
        return 0.5 * d @ A @ d

    def outer(params):
        d = params["w"] - b
        return 0.5 * d @ B @ d

    return A, B, a, b, theta0, inner, outer


def _theta_k(theta0, A, a, alpha, k):
    th = theta0.clone()
    for _ in range(k):
        th = th - alpha * A @ (th - a)
    return th


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_maml_matches_closed_form(k, checkpoint):
    A, B, a, b, theta0, inner, outer = _problem()
    alpha = 0.1
    phi = {"w": theta0.clone().requires_grad_(True)}
    out = meta_objective("maml", phi, inner, outer, steps=k, lr=alpha, clip=None, checkpoint=checkpoint)
    (grad,) = torch.autograd.grad(out.loss, [phi["w"]])
    th = _theta_k(theta0, A, a, alpha, k)
    M = torch.linalg.matrix_power(torch.eye(5, dtype=torch.float64) - alpha * A, k)
    torch.testing.assert_close(grad, M @ B @ (th - b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [1, 4])
def test_fomaml_and_reptile_match_closed_forms(k):
    A, B, a, b, theta0, inner, outer = _problem(seed=1)
    alpha = 0.1
    th = _theta_k(theta0, A, a, alpha, k)
    phi = {"w": theta0.clone().requires_grad_(True)}
    (g_fo,) = torch.autograd.grad(meta_objective("fomaml", phi, inner, outer, k, alpha, clip=None).loss, [phi["w"]])
    torch.testing.assert_close(g_fo, B @ (th - b), rtol=1e-10, atol=1e-10)
    (g_rep,) = torch.autograd.grad(meta_objective("reptile", phi, inner, outer, k, alpha, clip=None).loss, [phi["w"]])
    torch.testing.assert_close(g_rep, theta0 - th, rtol=1e-10, atol=1e-10)
    # and the first-order gradient is genuinely different from the exact one
    (g_so,) = torch.autograd.grad(meta_objective("maml", phi, inner, outer, k, alpha, clip=None).loss, [phi["w"]])
    assert (g_so - g_fo).abs().max() > 1e-3


def test_meta_sgd_learned_lr_gradient_matches_finite_difference():
    A, B, a, b, theta0, inner, outer = _problem(seed=2)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def meta_loss(lr_value):
        phi = {"w": theta0.clone().requires_grad_(True)}
        return meta_objective("maml", phi, inner, outer, 3, {"w": lr_value}, clip=None).loss

    (g,) = torch.autograd.grad(meta_loss(lr), [lr])
    eps = 1e-6
    fd = (meta_loss(torch.tensor(0.1 + eps, dtype=torch.float64)) - meta_loss(torch.tensor(0.1 - eps, dtype=torch.float64))) / (2 * eps)
    torch.testing.assert_close(g, fd.detach(), rtol=1e-6, atol=1e-8)


def test_inner_clip_limits_the_update_norm():
    grads = [torch.full((3,), 10.0), torch.full((4,), 10.0)]  # float32 here
    clipped = clip_by_global_norm(grads, 1.0)
    total = torch.sqrt(sum((g**2).sum() for g in clipped))
    assert abs(total.item() - 1.0) < 1e-5
    small = [torch.full((2,), 0.01)]
    torch.testing.assert_close(clip_by_global_norm(small, 1.0)[0], small[0])


@pytest.mark.parametrize("per_row", [False, True])
def test_inner_clip_of_a_zero_gradient_has_a_finite_derivative(per_row):
    """An inner step with no block to train on has gradient 0; differentiating through its clip
    (maml) must not give NaN, which would poison the whole meta-gradient."""
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]] if per_row else [0.0, 0.0, 0.0], dtype=torch.float64,
                     requires_grad=True)
    (clipped,) = clip_by_global_norm([x * 1.0], 1.0, per_row=per_row)
    (d,) = torch.autograd.grad(clipped.sum(), x)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d[0] if per_row else d, torch.ones(3, dtype=torch.float64))  # scale 1 near 0


@pytest.mark.parametrize("per_row", [False, True])
def test_inner_clip_is_exact_in_float64(per_row):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 7, generator=g, dtype=torch.float64) * 3, torch.randn(2, 5, generator=g, dtype=torch.float64)]
    clipped = clip_by_global_norm(grads, 0.5, per_row=per_row)
    assert all(c.dtype == torch.float64 for c in clipped)
    dims = (1,) if per_row else (0, 1)
    norm = torch.sqrt(sum((x**2).sum(dims) for x in grads))
    after = torch.sqrt(sum((c**2).sum(dims) for c in clipped))
    # the clip scales by max_norm / (norm + 1e-6); a float32 norm would be off by ~1e-8 relative
    torch.testing.assert_close(after, 0.5 * norm / (norm + 1e-6), rtol=1e-13, atol=0)


def test_maml_with_an_engaged_clip_matches_central_differences_float64():
    A, B, a, b, theta0, inner, outer = _problem(seed=3)
    k, alpha, clip = 3, 0.1, 0.05
    assert torch.linalg.vector_norm(A @ (theta0 - a)) > 10 * clip  # the clip acts on every step

    def meta_loss(theta):
        return meta_objective("maml", {"w": theta.requires_grad_(True)}, inner, outer, k, alpha, clip=clip).loss

    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(meta_loss(theta), [theta])
    eps = 1e-6
    fd = torch.stack([(meta_loss(theta0 + eps * e) - meta_loss(theta0 - eps * e)) / (2 * eps)
                      for e in torch.eye(5, dtype=torch.float64)])
    torch.testing.assert_close(grad, fd.detach(), rtol=1e-7, atol=1e-10)


def test_non_finite_inner_loss_is_flagged_not_raised():
    def bad(params, step):
        return (params["w"] * float("nan")).sum()

    w = torch.ones(3, requires_grad=True)
    res = inner_loop(bad, {"w": w}, steps=2, lr=0.1)
    assert res.skipped and "non-finite" in res.reason
    assert res.params["w"] is w
    out = meta_objective("maml", {"w": w}, bad, lambda p: p["w"].sum(), 2, 0.1)
    (g,) = torch.autograd.grad(out.loss, [w])
    assert torch.equal(g, torch.zeros(3))


def _online_problem(steps: int, chunks: int, online_steps: int, prequential: bool, seed: int = 10):
    """The quadratic task walked chunk by chunk (meta.ttt.online): inner step j (context steps first, then
    `online_steps` per continuation chunk) descends 0.5 (w - a_j)ᵀ A_j (w - a_j), and continuation chunk c
    scores 0.5 (w - b_c)ᵀ B_c (w - b_c). Each from `_problem`, so every step and chunk differs."""
    total = steps + chunks * online_steps
    inner_terms = [(A, a) for A, _, a, *_ in (_problem(seed=seed + j) for j in range(total))]  # of step j
    outer_terms = [(B, b) for _, B, _, b, *_ in (_problem(seed=seed + 100 + c) for c in range(chunks))]
    theta0 = _problem(seed=seed)[4]

    def inner(params, step):
        A, a = inner_terms[step if prequential or step >= steps else 0]  # one context chunk unless prequential
        d = params["w"] - a
        return 0.5 * d @ A @ d

    def outer(params, c):
        B, b = outer_terms[c]
        d = params["w"] - b
        return 0.5 * d @ B @ d

    return theta0, inner_terms, outer_terms, inner, outer


def _walk(theta0, inner_terms, steps: int, prequential: bool, alpha: float, upto: int):
    """θ after the first `upto` inner steps, and the Jacobian dθ/dθ0 (closed forms of plain SGD)."""
    th, J = theta0.clone(), torch.eye(len(theta0), dtype=torch.float64)
    for j in range(upto):
        A, a = inner_terms[j if prequential or j >= steps else 0]
        th = th - alpha * A @ (th - a)
        J = (torch.eye(len(theta0), dtype=torch.float64) - alpha * A) @ J
    return th, J


@pytest.mark.parametrize("prequential", [False, True])
@pytest.mark.parametrize("online_steps", [1, 2])
def test_online_meta_gradients_match_their_closed_forms(prequential, online_steps):
    """meta.ttt.online on the quadratic task: maml is the exact gradient of Σ_c L_c(θ^(c)) (+ the context
    chunks' prequential scores, averaged); fomaml is Σ_c ∇L_c at the weights each chunk was scored with;
    reptile is θ0 minus the weights after every chunk's update (the last one's too)."""
    k, chunks, alpha = 3, 4, 0.1
    theta0, inner_terms, outer_terms, inner, outer = _online_problem(k, chunks, online_steps, prequential)

    def grad(algorithm):
        phi = {"w": theta0.clone().requires_grad_(True)}
        out = meta_objective(algorithm, phi, inner, outer, k, alpha, clip=None, prequential=prequential,
                             online_chunks=chunks, online_steps=online_steps)
        return torch.autograd.grad(out.loss, [phi["w"]])[0], out

    so, fo = torch.zeros_like(theta0), torch.zeros_like(theta0)
    scores = 0.0
    for c, (B, b) in enumerate(outer_terms):
        th, J = _walk(theta0, inner_terms, k, prequential, alpha, k + c * online_steps)  # before chunk c's update
        so += J.T @ B @ (th - b)
        fo += B @ (th - b)
        scores += 0.5 * (th - b) @ B @ (th - b)
    if prequential:  # the context chunks, each scored before its own step
        for j in range(k):
            th, J = _walk(theta0, inner_terms, k, prequential, alpha, j)
            A, a = inner_terms[j]
            so += J.T @ A @ (th - a)
            fo += A @ (th - a)
        so, fo = so / (1 + k), fo / (1 + k)
    g_maml, out = grad("maml")
    torch.testing.assert_close(out.outer_loss, scores, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_maml, so, rtol=1e-10, atol=1e-10)
    g_fo, _ = grad("fomaml")
    torch.testing.assert_close(g_fo, fo, rtol=1e-10, atol=1e-10)
    assert (g_maml - g_fo).abs().max() > 1e-3
    g_rep, out = grad("reptile")
    th_final, _ = _walk(theta0, inner_terms, k, prequential, alpha, k + chunks * online_steps)
    torch.testing.assert_close(g_rep, theta0 - th_final, rtol=1e-10, atol=1e-10)
    assert len(out.inner.losses) == k + chunks * online_steps  # reptile runs the last chunk's update too


def test_online_maml_with_an_engaged_clip_and_learned_lr_matches_central_differences_float64():
    k, chunks = 2, 3
    theta0, inner_terms, _, inner, outer = _online_problem(k, chunks, 2, prequential=True, seed=20)
    clip = 0.05
    A, a = inner_terms[0]
    assert torch.linalg.vector_norm(A @ (theta0 - a)) > 10 * clip  # the clip acts

    def meta_loss(theta, lr):
        w = theta if theta.requires_grad else theta.clone().requires_grad_(True)
        return meta_objective("maml", {"w": w}, inner, outer, k, {"w": lr}, clip=clip, prequential=True,
                              online_chunks=chunks, online_steps=2).loss

    theta = theta0.clone().requires_grad_(True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    g_theta, g_lr = torch.autograd.grad(meta_loss(theta, lr), [theta, lr])
    eps = 1e-6
    fd = torch.stack([(meta_loss(theta0 + eps * e, lr) - meta_loss(theta0 - eps * e, lr)) / (2 * eps)
                      for e in torch.eye(5, dtype=torch.float64)])
    torch.testing.assert_close(g_theta, fd.detach(), rtol=1e-7, atol=1e-10)
    fd_lr = (meta_loss(theta0, lr.detach() + eps) - meta_loss(theta0, lr.detach() - eps)) / (2 * eps)
    torch.testing.assert_close(g_lr, fd_lr.detach(), rtol=1e-6, atol=1e-9)
