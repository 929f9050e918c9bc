"""Tasks batched in meta-training (metattt.ttt.meta): the batched meta step equals the per-task one,
its meta-gradients match finite differences and closed forms, and the inner loop reads nothing
back from the device."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import MASK_ID, check_meta_gradient_by_central_differences, qwen3_config
from torch.utils._python_dispatch import TorchDispatchMode

from metattt.config import MetaConfig
from metattt.lit.meta import MetaTrainModule
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, lora_parameters
from metattt.models.target import FrozenTarget
from metattt.ttt.inner import Functional, inner_loop
from metattt.ttt.meta import meta_batch
from metattt.ttt.tasks import (
    TTTConfig,
    TTTObjective,
    continuation_anchors,
    continuation_loss,
    make_tasks,
    ttt_adapt,
)

V, S = 24, 4
LENGTHS = (40, 29, 36, 33)  # ragged rows: contexts and continuations of different lengths


def _models(dtype: torch.dtype = torch.float32):
    cfg = qwen3_config(vocab_size=V)
    cfg.initializer_range = 0.3
    target = FrozenTarget.from_config(cfg, num_draft_layers=2, seed=0).to(dtype)
    dcfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                          num_hidden_layers=2, block_size=S, attn_implementation="eager")
    torch.manual_seed(0)
    model = add_lora(BlockDrafter(dcfg).to(dtype).attach_target(target), r=2, alpha=4).to(dtype)
    with torch.no_grad():  # B ≠ 0, so every LoRA tensor has a non-trivial meta-gradient
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return target, model


def _batch(lengths=LENGTHS, holes: bool = True, seed: int = 0) -> dict:
    """Right-padded rows; with `holes`, a stretch of untrained tokens inside a context (loss mask 0)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    attn = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(2, V, (len(lengths), T), generator=g) * attn
    loss_mask = attn.clone()
    if holes:
        loss_mask[1, 4:9] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def _lrs(model, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Meta-SGD lrs, one per tensor and not all alike, that take gradients."""
    return {n: torch.tensor(0.2 + 0.05 * (i % 4), dtype=dtype, requires_grad=True)
            for i, n in enumerate(lora_parameters(model))}


def _run(model, phi, tasks, batched: bool, seed: int = 5, **kw):
    args = dict(algorithm="maml", steps=2, lr=0.3, clip=1.0, inner_anchors=8, outer_anchors=8,
                objective=TTTObjective(), gamma=4.0)
    args.update(kw)
    return meta_batch(model, phi, tasks, generator=torch.Generator().manual_seed(seed), batched=batched, **args)


CASES = {
    "maml": dict(algorithm="maml"),
    "maml_checkpointed": dict(algorithm="maml", checkpoint=True),
    "maml_prequential": dict(algorithm="maml", prequential=True, steps=3),
    "maml_clm_feature": dict(algorithm="maml", objective=TTTObjective(block=1.0, clm=0.5, feature=0.5)),
    "fomaml": dict(algorithm="fomaml"),
    "reptile": dict(algorithm="reptile", steps=3),
}


def run_both_with_a_nan_task(case: str, check_tasks=None, **kw):
    """One meta step per task and one batched, on 4 ragged tasks of which task 2 has a NaN feature
    (its inner loss is NaN from the first step on) -> ((result, grads) per task, (result, grads)
    batched, φ, lrs); grads are of the meta loss w.r.t. φ, the lrs and the feature head."""
    target, model = _models()
    batch = _batch()
    feats = target(batch["input_ids"]).features.clone()
    feats[2, 0] = float("nan")
    phi = lora_parameters(model)
    lrs = _lrs(model)
    head = torch.nn.Linear(32, 32, bias=False) if "feature" in case else None
    trained = [*phi.values(), *lrs.values(), *(head.parameters() if head else [])]
    got = {}
    for batched in (False, True):
        tasks = make_tasks(batch, feats, 10, 20, S, torch.Generator().manual_seed(3))
        if check_tasks:
            check_tasks(tasks)
        res = _run(model, phi, tasks, batched, lr=lrs, clip=0.5, feature_head=head, **kw)
        got[batched] = res, torch.autograd.grad(res.loss, trained, allow_unused=True)
    return got[False], got[True], phi, lrs


def assert_same_meta_step(per_task, g_per_task, rows, g_rows) -> None:
    """The batched step dropped the same task and gave the same loss, meta-gradient, inner losses and
    per-block outer losses as the per-task step."""
    assert (per_task.used, per_task.skipped) == (rows.used, rows.skipped) == (3, 1)
    torch.testing.assert_close(rows.loss, per_task.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_rows, g_per_task):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows.inner, per_task.inner, rtol=1e-6, atol=1e-6)
    for mine, theirs in ((rows.after, per_task.after), (rows.before, per_task.before)):
        assert len(mine) == len(theirs)
        for x, y in zip(mine, theirs):
            torch.testing.assert_close(x.loss.detach(), y.loss.detach(), rtol=1e-6, atol=1e-6, equal_nan=True)
            n = y.weights.shape[1]  # a padded row has more (weightless) blocks than its task alone
            assert torch.equal(x.weights[:, :n], y.weights) and not x.weights[:, n:].any()
            assert torch.equal(x.correct[:, :n] & (y.weights > 0), y.correct & (y.weights > 0))


@pytest.mark.parametrize("case", list(CASES))
def test_batched_meta_step_equals_per_task_with_a_non_finite_task_dropped_in_both(case):
    def ragged(tasks):
        assert len({t.context_len for t in tasks}) > 1 and len(tasks) == 4

    (per_task, g_per_task), (rows, g_rows), phi, lrs = run_both_with_a_nan_task(case, ragged, **CASES[case])
    assert_same_meta_step(per_task, g_per_task, rows, g_rows)
    if case != "reptile":  # reptile's meta-gradient is φ − mean θ_k: nothing for the lrs
        assert all(g.abs().max() > 1e-4 for g in g_rows[len(phi):len(phi) + len(lrs)])  # the lrs learn


def _float64_problem():
    target, model = _models(torch.float64)
    batch = _batch(lengths=(30, 22, 26), holes=False)
    feats = target(batch["input_ids"]).features
    return model, batch, feats


@pytest.mark.parametrize("prequential", [False, True])
def test_batched_maml_meta_gradient_matches_finite_differences_float64(prequential):
    model, batch, feats = _float64_problem()
    phi = lora_parameters(model)
    lrs = _lrs(model, torch.float64)
    wrt = {**phi, **{f"lr:{n}": t for n, t in lrs.items()}}

    def meta_loss() -> torch.Tensor:
        tasks = make_tasks(batch, feats, 10, 16, S, torch.Generator().manual_seed(3))
        return _run(model, phi, tasks, True, lr=lrs, clip=0.5, steps=3 if prequential else 2,
                    prequential=prequential).loss

    checked = check_meta_gradient_by_central_differences(
        meta_loss, wrt, lambda n: "layers.1.self_attn.v_proj" in n or ".fc." in n, eps=1e-5, rtol=1e-5)
    assert checked >= 12


def _adapted_alone(model, phi, batch, feats, steps: int):
    """Each task adapted by itself (`ttt_adapt`, first order) from φ, with the anchors meta_batch draws."""
    tasks = make_tasks(batch, feats, 10, 16, S, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(5)
    ttt = TTTConfig(steps=steps, lr=0.3, clip=0.5, num_anchors=8, gamma=4.0)
    out = []
    for task in tasks:  # context anchors, then continuation anchors, task after task: meta_batch's order
        theta = ttt_adapt(model, phi, task.context_ids, task.context_features, ttt, g).params
        out.append((task, theta, continuation_anchors(task, 8, S, g)))
    return tasks, out


def test_batched_fomaml_meta_gradient_is_the_outer_gradient_at_the_adapted_weights_float64():
    model, batch, feats = _float64_problem()
    phi = lora_parameters(model)
    tasks, alone = _adapted_alone(model, phi, batch, feats, steps=2)
    res = _run(model, phi, tasks, True, algorithm="fomaml", clip=0.5)
    shift = {n: torch.zeros_like(p, requires_grad=True) for n, p in phi.items()}

    def outer_at_adapted() -> torch.Tensor:  # mean over tasks of L_out(θ_k + shift): its gradient at 0 is FOMAML's
        losses = [continuation_loss(Functional(model, {n: theta[n] + shift[n] for n in theta}), task, a, ok, 4.0).loss
                  for task, theta, (a, ok) in alone]
        return torch.stack(losses).mean()

    torch.testing.assert_close(res.loss, outer_at_adapted(), rtol=1e-12, atol=0)
    g_meta = dict(zip(phi, torch.autograd.grad(res.loss, list(phi.values()))))
    checked = check_meta_gradient_by_central_differences(outer_at_adapted, shift, lambda n: True, eps=1e-5,
                                                         rtol=1e-5, per_tensor=1)
    assert checked == len(phi)
    for n, g_fd in zip(shift, torch.autograd.grad(outer_at_adapted(), list(shift.values()))):
        torch.testing.assert_close(g_meta[n], g_fd, rtol=1e-10, atol=1e-13)


def test_batched_reptile_meta_gradient_is_phi_minus_the_mean_adapted_weights_float64():
    model, batch, feats = _float64_problem()
    phi = lora_parameters(model)
    tasks, alone = _adapted_alone(model, phi, batch, feats, steps=3)
    res = _run(model, phi, tasks, True, algorithm="reptile", steps=3, clip=0.5)
    grads = torch.autograd.grad(res.loss, list(phi.values()))
    for (n, p), g in zip(phi.items(), grads):
        mean_theta = torch.stack([theta[n] for _, theta, _ in alone]).mean(0)
        torch.testing.assert_close(g, p.detach() - mean_theta, rtol=1e-10, atol=1e-13)
    assert any(g.abs().max() > 1e-4 for g in grads)


def test_batched_inner_loss_never_sees_a_continuation():
    """Rows are padded to the longest context: the tokens behind a shorter one are its continuation."""
    target, model = _models()
    batch = _batch(holes=False)
    changed = {k: v.clone() for k, v in batch.items()}
    tasks = make_tasks(batch, target(batch["input_ids"]).features, 10, 20, S, torch.Generator().manual_seed(3))
    for r, t in enumerate(tasks):
        n = int(batch["attention_mask"][r].sum()) - t.context_len
        changed["input_ids"][r, t.context_len:t.context_len + n] = torch.randint(2, V, (n,))
    changed_tasks = make_tasks(changed, target(changed["input_ids"]).features, 10, 20, S,
                               torch.Generator().manual_seed(3))
    assert [t.context_len for t in tasks] == [t.context_len for t in changed_tasks]
    phi = lora_parameters(model)
    a = _run(model, phi, tasks, True, algorithm="fomaml", steps=3)
    b = _run(model, phi, changed_tasks, True, algorithm="fomaml", steps=3)
    assert not torch.allclose(a.loss, b.loss)  # the continuations did change
    torch.testing.assert_close(a.inner, b.inner, rtol=1e-6, atol=1e-6)


class _DeviceReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value back (item, bool) or a
    shape that depends on values (nonzero, boolean-mask indexing)."""

    READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
             "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.READS or (name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_inner_loop_reads_nothing_back_from_the_device():
    w = torch.randn(3, 5, requires_grad=True)
    target = torch.randn(3, 5)

    def loss_fn(params, step):  # (3,) per-row losses
        return ((params["w"] - target) ** 2).sum(-1)

    with _DeviceReads() as reads:
        out = inner_loop(loss_fn, {"w": w}, steps=4, lr=0.1, clip=1.0, create_graph=True, clip_per_row=True,
                         check_finite=False)
    assert reads.count == 0 and out.finite.shape == (3,)
    bad = inner_loop(lambda p, s: loss_fn(p, s) * torch.tensor([1.0, float("nan"), 1.0]), {"w": w}, steps=2,
                     lr=0.1, clip_per_row=True, check_finite=False)
    assert bad.finite.tolist() == [True, False, True] and not bad.skipped


def test_batched_meta_step_reads_from_the_device_do_not_grow_with_inner_steps():
    """(The per-task path's losses index their supervised drafts by a mask at every step.)"""
    target, model = _models()
    batch = _batch()
    feats = target(batch["input_ids"]).features
    phi = lora_parameters(model)
    counts = []
    for steps in (1, 4):
        tasks = make_tasks(batch, feats, 10, 20, S, torch.Generator().manual_seed(3))
        with _DeviceReads() as reads:
            res = _run(model, phi, tasks, True, steps=steps, lr=_lrs(model), score_before=False)
            res.loss.backward()
        counts.append(reads.count)
    assert counts[0] == counts[1], f"device reads with 1 and 4 inner steps: {counts}"


def test_training_scores_before_adaptation_on_logging_steps_only(monkeypatch):
    import metattt.lit.meta as lit_meta

    target, model = _models()
    calls = []
    real = lit_meta.meta_batch

    def recording(*args, **kwargs):
        calls.append(kwargs["score_before"])
        return real(*args, **kwargs)

    monkeypatch.setattr(lit_meta, "meta_batch", recording)
    cfg = MetaConfig(algorithm="fomaml", ttt=TTTConfig(steps=2, lr=0.3, num_anchors=8), outer_anchors=8,
                     context_min=10, context_max=20, warmup_ratio=0.0)
    module = MetaTrainModule(target, model, cfg)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=2)
    batches = [_batch(seed=s) for s in range(4)]
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert calls == [False, True, False, True]
    assert "train/cont_loss_before" in trainer.callback_metrics and "train/cont_acc_before" in trainer.callback_metrics
