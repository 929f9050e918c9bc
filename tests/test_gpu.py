"""GPU-only: bf16 mixed precision (distillation and second-order meta-training) and FSDP2 sharding of
the frozen target. Marked `gpu`: skipped without CUDA (tests/conftest.py). The 2-rank FSDP logic is
also covered on CPU (gloo) by tests/test_scale.py; here it runs with NCCL on real devices.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MASK_ID, qwen3_config

from metattt.config import MetaConfig, RunConfig, TrainerConfig, TTTConfig
from metattt.lit.distill import DistillModule
from metattt.lit.meta import MetaTrainModule
from metattt.lit.trainer import make_trainer
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.lora import add_lora, copy_lora, lora_parameters
from metattt.models.target import FrozenTarget

pytestmark = pytest.mark.gpu

V, S, T = 96, 4, 40


def _pair(attn: str = "sdpa"):
    target = FrozenTarget.from_config(qwen3_config(vocab_size=V), num_draft_layers=2, seed=0)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                    num_hidden_layers=2, block_size=S, attn_implementation=attn)
    torch.manual_seed(1)
    return target, BlockDrafter(cfg).attach_target(target)


def _loader(n: int = 6, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, V, (batch, T), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)})
    # a DistributedSampler of its own, so DDP strategies do not swap in a shuffling one: same order everywhere
    sampler = torch.utils.data.distributed.DistributedSampler(rows, num_replicas=1, rank=0, shuffle=False)
    return torch.utils.data.DataLoader(rows, batch_size=None, sampler=sampler)


def _trainer(tmp_path, stage: str, *, strategy: str = "auto", precision: str = "32-true", steps: int = 3,
             inference_mode: bool = True):
    trainer_cfg = TrainerConfig(accelerator="gpu", devices=1, strategy=strategy, precision=precision,
                                enable_progress_bar=False, log_every_n_steps=1)
    return make_trainer(RunConfig(output_root=str(tmp_path)), trainer_cfg, stage, max_epochs=1, max_steps=steps,
                        grad_clip=1.0 if stage == "distill" else None, checkpoint_every_n_steps=1, limit_val_batches=0,
                        inference_mode=inference_mode)


def _teardown_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_bf16_mixed_distillation(tmp_path):
    target, drafter = _pair()
    module = DistillModule(target, drafter, lr=1e-3, num_anchors=8)
    before = {k: v.detach().clone() for k, v in drafter.state_dict().items()}
    seen = []
    drafter.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = _trainer(tmp_path, "distill", precision="bf16-mixed")
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert seen and all(d == torch.bfloat16 for d in seen)  # computed in bf16 under autocast
    assert all(p.dtype == torch.float32 for p in drafter.parameters())  # fp32 master weights
    assert any(not torch.equal(before[k].cuda(), v) for k, v in drafter.state_dict().items())
    ckpt = torch.load(tmp_path / "tiny" / "distill" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3


def test_bf16_mixed_second_order_meta_training(tmp_path):
    target, drafter = _pair(attn="eager")
    model = add_lora(drafter, r=4, alpha=8)
    cfg = MetaConfig(algorithm="maml", ttt=TTTConfig(steps=2, lr=0.3, num_anchors=8), outer_anchors=8,
                     context_min=17, context_max=20, warmup_ratio=0.0)
    module = MetaTrainModule(target, model, cfg, seed=0)
    before = copy_lora(model)
    trainer = _trainer(tmp_path, "meta", precision="bf16-mixed", steps=2, inference_mode=False)
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/cont_loss_after"])
    after = lora_parameters(model)
    assert any(not torch.equal(before[n].cuda(), p) for n, p in after.items() if "lora_B" in n)


def test_fsdp_shards_only_the_target_and_matches_single_device(tmp_path):
    from torch.distributed.fsdp import FSDPModule

    from metattt.distributed import TargetAwareDDPStrategy, decoder_layers

    weights = {}
    for strategy in ("auto", "fsdp"):
        target, drafter = _pair()
        module = DistillModule(target, drafter, lr=1e-3, num_anchors=64)
        trainer = _trainer(tmp_path / strategy, "distill", strategy=strategy)
        try:
            trainer.fit(module, train_dataloaders=_loader())
        finally:
            if strategy == "fsdp":
                _teardown_process_group()
        weights[strategy] = {k: v.detach().float().cpu() for k, v in drafter.state_dict().items()}
        if strategy == "fsdp":
            assert isinstance(trainer.strategy, TargetAwareDDPStrategy) and trainer.strategy.shard_target
            layers = decoder_layers(target.model)
            assert layers and all(isinstance(m, FSDPModule) for m in layers)
            assert not any(isinstance(m, FSDPModule) for m in drafter.modules())  # the drafter stays on DDP
    diff = max((weights["auto"][k] - weights["fsdp"][k]).abs().max().item() for k in weights["auto"])
    assert diff < 1e-4, diff


@pytest.mark.e2e
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_two_gpus_match_one(workspace, tmp_path):
    from conftest import recipe_args
    from launch import exported_weights, max_abs_diff, metattt_command, run_metattt

    eq = ["--distill.num_anchors=64", "--distill.max_steps=3", "--distill.val_check_interval=100",
          "--distill.limit_val_batches=0"]
    runs = {}
    for name, devices, batch in (("one", 1, 8), ("two", 2, 4)):
        args = recipe_args(workspace, f"--run.output_root={tmp_path / name}", *eq, f"--data.batch_size={batch}")
        cmd = [c for c in metattt_command("distill", args, devices, "fsdp") if c != "--trainer.accelerator=cpu"]
        run_metattt("distill", [], command=[*cmd, "--trainer.accelerator=gpu"])
        runs[name] = exported_weights(tmp_path / name / "t" / "drafter")
    assert max_abs_diff(runs["one"], runs["two"]) < 1e-4
