"""Meta-training on the drafter: LoRA wiring, meta-gradients, leakage, learning, export."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import MASK_ID, check_meta_gradient_by_central_differences, qwen3_config, recipe_args

from metattt.config import MetaConfig
from metattt.export.meta_lora import export_meta_lora, load_meta_lora
from metattt.lit.meta import MetaTrainModule
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, lora_parameters
from metattt.models.target import FrozenTarget
from metattt.ttt.inner import Functional
from metattt.ttt.meta import meta_batch
from metattt.ttt.tasks import Task, TTTConfig, TTTObjective, continuation_loss, make_tasks, ttt_adapt

V, S = 24, 4


def _pair(dtype=torch.float32, attn="eager", seed=0):
    cfg = qwen3_config(vocab_size=V)
    cfg.initializer_range = 0.3
    target = FrozenTarget.from_config(cfg, num_draft_layers=2, seed=seed).to(dtype)
    dcfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                     num_hidden_layers=2, block_size=S, attn_implementation=attn)
    torch.manual_seed(seed)
    drafter = BlockDrafter(dcfg).to(dtype).attach_target(target)
    return target, drafter


def cyclic_batch(g: torch.Generator, B: int = 4, T: int = 40) -> dict:
    """Each row walks a random 16-cycle over symbols 2..17: the context reveals the continuation."""
    ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        order = torch.randperm(16, generator=g) + 2
        start = int(torch.randint(0, 16, (1,), generator=g))
        ids[b] = order[(torch.arange(T) + start) % 16]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


def _kwargs(**over):
    kw = dict(algorithm="maml", steps=2, lr=0.3, clip=1.0, inner_anchors=8, outer_anchors=8,
              objective=TTTObjective(), gamma=4.0)
    kw.update(over)
    return kw


def test_zero_init_lora_is_bitwise_invariant():
    target, drafter = _pair(attn="sdpa")
    ids = torch.randint(2, V, (2, 20))
    anchors = torch.tensor([[5, 11], [3, 14]])
    blocks = torch.full((2, 2, S), MASK_ID)
    blocks[:, :, 0] = ids.gather(1, anchors)
    feats = target(ids).features
    ref = drafter(blocks, anchors, context_features=feats)
    model = add_lora(drafter, r=4, alpha=8)
    assert all(torch.count_nonzero(p) == 0 for n, p in lora_parameters(model).items() if "lora_B" in n)
    assert torch.equal(model(blocks, anchors, context_features=feats), ref)


def test_maml_meta_gradient_matches_finite_differences_float64():
    target, drafter = _pair(dtype=torch.float64)
    model = add_lora(drafter, r=2, alpha=4).to(torch.float64)
    phi = lora_parameters(model)
    with torch.no_grad():  # B ≠ 0 so every LoRA tensor has a non-trivial meta-gradient
        for n, p in phi.items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = cyclic_batch(torch.Generator().manual_seed(0), B=1, T=20)
    feats = target(batch["input_ids"]).features

    def meta_loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        tasks = make_tasks(batch, feats, 10, 12, S, g)
        return meta_batch(model, phi, tasks, generator=g, **_kwargs(clip=None)).loss

    checked = check_meta_gradient_by_central_differences(
        meta_loss, phi, lambda n: "layers.1" in n or ".fc." in n  # first and last layers' tensors
    )
    assert checked >= 16


def test_clipped_maml_meta_gradient_matches_finite_differences_float64(monkeypatch):
    """With the inner clip engaged on every step, the float64 meta-gradient is float64-exact (the
    global norm is taken in float64, not float32): a tolerance float32 rounding would exceed."""
    import metattt.ttt.inner as inner

    target, drafter = _pair(dtype=torch.float64)
    model = add_lora(drafter, r=2, alpha=4).to(torch.float64)
    phi = lora_parameters(model)
    with torch.no_grad():
        for n, p in phi.items():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch = cyclic_batch(torch.Generator().manual_seed(0), B=1, T=20)
    feats = target(batch["input_ids"]).features
    clip, norms = 0.05, []
    real_clip = inner.clip_by_global_norm

    def recording_clip(grads, max_norm, per_row=False):
        norms.append(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)).item())
        return real_clip(grads, max_norm, per_row)

    monkeypatch.setattr(inner, "clip_by_global_norm", recording_clip)

    def meta_loss() -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        tasks = make_tasks(batch, feats, 10, 12, S, g)
        return meta_batch(model, phi, tasks, generator=g, **_kwargs(clip=clip)).loss

    checked = check_meta_gradient_by_central_differences(
        meta_loss, phi, lambda n: "layers.1" in n or ".fc." in n, eps=1e-5, rtol=1e-5)
    assert checked >= 16
    assert norms and min(norms) > 2 * clip  # every inner step was clipped


def test_k0_meta_training_is_plain_lora_training_of_the_outer_loss():
    target, drafter = _pair()
    model = add_lora(drafter, r=4, alpha=8)
    phi = lora_parameters(model)
    with torch.no_grad():
        for n, p in phi.items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = cyclic_batch(torch.Generator().manual_seed(0))
    feats = target(batch["input_ids"]).features
    g = torch.Generator().manual_seed(3)
    tasks = make_tasks(batch, feats, 17, 24, S, g)
    res = meta_batch(model, phi, tasks, generator=g, **_kwargs(steps=0))
    g_meta = torch.autograd.grad(res.loss, list(phi.values()))
    # the same continuation blocks, scored directly with the LoRA weights
    g = torch.Generator().manual_seed(3)
    tasks = make_tasks(batch, feats, 17, 24, S, g)
    from metattt.ttt.tasks import context_anchors, continuation_anchors

    losses = []
    for t in tasks:
        context_anchors(t, 8, S, g)  # consume the generator in the same order
        oa, ok = continuation_anchors(t, 8, S, g)
        losses.append(continuation_loss(model, t, oa, ok, 4.0).loss)
    plain = torch.stack(losses).mean()
    torch.testing.assert_close(res.loss, plain)
    for a, b in zip(g_meta, torch.autograd.grad(plain, list(phi.values()))):
        torch.testing.assert_close(a, b)


def test_inner_loop_never_sees_the_continuation():
    target, drafter = _pair()
    model = add_lora(drafter, r=4, alpha=8)
    init = {n: p.detach() for n, p in lora_parameters(model).items()}
    batch = cyclic_batch(torch.Generator().manual_seed(0), B=1)
    ids = batch["input_ids"]
    C = 20
    changed = ids.clone()
    changed[0, C:] = torch.randint(2, V, (ids.shape[1] - C,), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(changed[0, C:], ids[0, C:])

    def adapted(x):
        feats = target(x).features
        task = Task(x, feats, torch.ones_like(x), C)
        ttt = TTTConfig(steps=3, lr=0.3, num_anchors=16, gamma=4.0)
        return ttt_adapt(model, init, task.context_ids, task.context_features, ttt,
                         torch.Generator().manual_seed(1)).params

    a, b = adapted(ids), adapted(changed)
    assert any(not torch.equal(a[n], init[n]) for n in a), "adaptation changed nothing"
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)

    # and the meta inner loss, run on full sequences, gives the same inner losses
    def inner_losses(x):
        feats = target(x).features
        task = Task(x, feats, torch.ones_like(x), C)
        phi = {n: t.clone().requires_grad_(True) for n, t in init.items()}
        res = meta_batch(model, phi, [task], generator=torch.Generator().manual_seed(2), **_kwargs(algorithm="fomaml"))
        return res.inner_losses[0]

    assert inner_losses(ids) == pytest.approx(inner_losses(changed), abs=1e-6)


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.n):
            yield cyclic_batch(g, B=2, T=32)


def _eval_post_adaptation(model, target, init, seed=123, n=2):
    """Mean continuation loss before/after 3 TTT steps from `init`, on fresh tasks."""
    g = torch.Generator().manual_seed(seed)
    before, after = [], []
    ttt = TTTConfig(steps=3, lr=0.5, num_anchors=32, gamma=4.0)
    for _ in range(n):
        b = cyclic_batch(g)
        feats = target(b["input_ids"]).features
        for task in make_tasks(b, feats, 17, 24, S, g):
            from metattt.ttt.tasks import continuation_anchors

            oa, ok = continuation_anchors(task, 32, S, g)
            with torch.no_grad():
                before.append(continuation_loss(Functional(model, init), task, oa, ok, 4.0).loss.item())
            adapted = ttt_adapt(model, init, task.context_ids, task.context_features, ttt, g).params
            with torch.no_grad():
                after.append(continuation_loss(Functional(model, adapted), task, oa, ok, 4.0).loss.item())
    return sum(before) / len(before), sum(after) / len(after)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
def test_meta_training_makes_adaptation_pay_off(algorithm):
    target, drafter = _pair()
    model = add_lora(drafter, r=4, alpha=8, seed=0)
    zero_init = copy_lora(model)
    zero_before, zero_after = _eval_post_adaptation(model, target, zero_init)

    cfg = MetaConfig(algorithm=algorithm, ttt=TTTConfig(steps=3, lr=0.5, num_anchors=16), outer_anchors=16,
                     context_min=17, context_max=20, lr=5e-3 if algorithm != "reptile" else 3e-2, warmup_ratio=0.0)
    module = MetaTrainModule(target, model, cfg, seed=0)
    _fit(module, steps=30, batches=30, seed=0)
    meta_init = copy_lora(model)
    meta_before, meta_after = _eval_post_adaptation(model, target, meta_init)
    msg = f"{algorithm}: zero init {zero_before:.2f}->{zero_after:.2f}, meta init {meta_before:.2f}->{meta_after:.2f}"
    # after meta-training, a few TTT steps leave a clearly lower continuation loss than the same
    # steps from peft's zero init, and than the drafter had before meta-training (zero init, no TTT)
    assert meta_after < 0.75 * zero_after, msg
    assert meta_after < 0.75 * zero_before, msg


def _fit(module: MetaTrainModule, steps: int, batches: int, seed: int) -> L.Trainer:
    """A bare CPU Trainer fitting `module` for `steps` meta steps on `batches` batches."""
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(batches, seed=seed), batch_size=None))
    return trainer


@pytest.mark.parametrize("batch_tasks", [True, False])
def test_non_finite_inner_loss_skips_the_task_and_training_goes_on(monkeypatch, batch_tasks):
    import metattt.ttt.meta as meta_mod

    target, drafter = _pair()
    model = add_lora(drafter, r=4, alpha=8)
    name = "batched_context_loss" if batch_tasks else "context_loss"  # (R,) rows or one task's scalar
    real = getattr(meta_mod, name)
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] != 1:
            return loss
        first = torch.ones_like(loss)
        first.view(-1)[0] = float("nan")  # the first task only: the others of its batch adapt on
        return loss * first

    monkeypatch.setattr(meta_mod, name, sometimes_nan)
    cfg = MetaConfig(algorithm="maml", ttt=TTTConfig(steps=2, lr=0.3, num_anchors=8), outer_anchors=8,
                     context_min=17, context_max=24, warmup_ratio=0.0, batch_tasks=batch_tasks)
    module = MetaTrainModule(target, model, cfg)
    before = copy_lora(model)
    trainer = _fit(module, steps=2, batches=2, seed=0)
    assert module.skipped_total == 1
    assert trainer.callback_metrics["train/skipped_tasks"] == 1
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())


def test_a_non_finite_meta_gradient_is_not_applied_and_training_goes_on(monkeypatch):
    import metattt.lit.meta as lit_meta

    target, drafter = _pair()
    model = add_lora(drafter, r=4, alpha=8)
    real = lit_meta.meta_batch
    calls = {"n": 0}

    def first_step_nan_gradient(*args, **kwargs):
        calls["n"] += 1
        res = real(*args, **kwargs)
        if calls["n"] == 1:  # a finite loss whose gradient is NaN, as a sqrt at 0 gives
            res.loss = res.loss + torch.sqrt(sum((p * 0).sum() for p in lora_parameters(model).values()))
        return res

    monkeypatch.setattr(lit_meta, "meta_batch", first_step_nan_gradient)
    cfg = MetaConfig(algorithm="fomaml", ttt=TTTConfig(steps=1, lr=0.3, num_anchors=8), outer_anchors=8,
                     context_min=17, context_max=24, warmup_ratio=0.0, learn_inner_lr=True)
    module = MetaTrainModule(target, model, cfg)
    before = copy_lora(model)
    _fit(module, steps=1, batches=2, seed=0)
    assert module.skipped_steps == 1 and all(torch.equal(before[n], p) for n, p in lora_parameters(model).items())
    assert torch.isfinite(module.inner_lrs).all()
    _fit(module, steps=2, batches=2, seed=1)
    assert module.skipped_steps == 1 and any(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())
    assert all(torch.isfinite(p).all() for p in lora_parameters(model).values())


def test_export_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    target, drafter = _pair(attn="sdpa")
    drafter_dir = drafter.save_pretrained(tmp_path / "drafter")
    model = add_lora(drafter, r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
    ttt = TTTConfig(steps=5, lr=0.1, learned_lrs={"x": 0.2}, num_anchors=16, gamma=4.0)
    out = export_meta_lora(model, tmp_path / "meta_lora", ttt, drafter_dir, algorithm="maml")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(drafter_dir)
    assert set(cfg["target_modules"]) == {"fc", "q_proj", "k_proj", "v_proj"}
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "ttt_config.json").read_text())
    assert saved["steps"] == 5 and saved["learned_lrs"] == {"x": 0.2} and saved["algorithm"] == "maml"

    fresh = BlockDrafter.from_pretrained(drafter_dir).attach_target(target)
    loaded = PeftModel.from_pretrained(fresh, str(out), is_trainable=True)
    assert any(p.requires_grad for p in lora_parameters(loaded).values())
    ids = torch.randint(2, V, (1, 20))
    anchors = torch.tensor([[6, 12]])
    blocks = torch.full((1, 2, S), MASK_ID)
    blocks[:, :, 0] = ids.gather(1, anchors)
    feats = target(ids).features
    torch.testing.assert_close(loaded(blocks, anchors, context_features=feats),
                               model(blocks, anchors, context_features=feats), rtol=0, atol=0)
    again, ttt2, _ = load_meta_lora(BlockDrafter.from_pretrained(drafter_dir).attach_target(target), out)
    assert ttt2.steps == 5 and ttt2.learned_lrs == {"x": 0.2}


@pytest.mark.e2e
def test_meta_train_cli_distills_first_then_exports_and_resumes(workspace, tmp_path):
    from metattt.cli import main

    def args(max_steps: int) -> list[str]:
        return recipe_args(
            workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=1", f"--meta.max_steps={max_steps}",
            "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=4",
            "--meta.ttt.steps=2", "--meta.checkpoint_every_n_steps=1", "--meta.val_check_interval=2",
            "--meta.learn_inner_lr=true", "--meta.ttt.objective.clm=0.5", "--meta.ttt.objective.feature=0.5",
        )

    main(["meta-train", *args(2)])
    out = tmp_path / "t"
    assert (out / "drafter" / "config.json").is_file(), "distillation did not run first"
    lora_dir = out / "meta_lora"
    assert (lora_dir / "adapter_config.json").is_file() and (lora_dir / "ttt_config.json").is_file()
    ttt = json.loads((lora_dir / "ttt_config.json").read_text())
    assert ttt["steps"] == 2 and len(ttt["learned_lrs"]) == 2 * (1 + 3 * 2)  # A and B of fc + q/k/v in 2 layers
    assert (lora_dir / "ttt_extra.safetensors").is_file()
    ckpt = torch.load(out / "meta" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    main(["meta-train", *args(3)])
    assert torch.load(out / "meta" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_prompt_context_splits_at_the_first_trained_token_and_trains_on_the_whole_prompt():
    T = 40
    ids = torch.arange(T)[None].repeat(3, 1) % 50 + 2
    loss_mask = torch.zeros(3, T, dtype=torch.long)
    loss_mask[0, 20:] = 1  # a prompt of 20 tokens, then the target's continuation
    loss_mask[1, 30:] = 1  # a prompt of 30: beyond context_max, dropped
    loss_mask[2, 3:] = 1  # a prompt of 3: no room for a block, dropped
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}
    feats = torch.randn(3, T, 8)
    tasks = make_tasks(batch, feats, 8, 25, 4, torch.Generator().manual_seed(0), context="prompt")
    assert len(tasks) == 1
    task = tasks[0]
    assert task.context_len == 20
    assert task.context_loss_mask.all()  # TTT trains on every prompt token, as at inference
    assert torch.equal(task.loss_mask[:, 20:], loss_mask[:1, 20:])  # the outer loss: the continuation only
    with pytest.raises(ValueError, match="context="):
        make_tasks(batch, feats, 8, 25, 4, torch.Generator(), context="middle")
