"""Bad input gets a short, exact error; nothing harmful is accepted (issue 14): the checks one by one.
The CLI as a user meets them (exit code 2, one line, nothing written) is tests/test_cli_errors.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MASK_ID, qwen3_config

from metattt.config import DistillConfig, EvalConfig, MetaConfig, TTTConfig, TTTOverrides
from metattt.errors import RecipeError

V, S = 24, 4


# --- ranges, refused when the recipe is parsed ----------------------------------------------------
@pytest.mark.parametrize("build, key", [
    (lambda: DistillConfig(lr=-1e-3), "distill.lr"),
    (lambda: DistillConfig(lr=float("nan")), "distill.lr"),
    (lambda: DistillConfig(warmup_ratio=1.5), "distill.warmup_ratio"),
    (lambda: MetaConfig(lr=-1e-3), "meta.lr"),
    (lambda: MetaConfig(context_min=64, context_max=32), "meta.context_max"),
    (lambda: TTTConfig(lr=-0.3), "meta.ttt.lr"),
    (lambda: TTTConfig(learned_lrs={"a": 0.2, "b": -0.3}), "meta.ttt.learned_lrs['b']"),
    (lambda: EvalConfig(ttt=TTTOverrides(lr=-0.1)), "eval.ttt.lr"),
    (lambda: EvalConfig(grid_lrs=[0.1, -0.1]), "eval.grid_lrs"),
    (lambda: EvalConfig(conditions=["static", "ttt_mta"]), "eval.conditions"),
])
def test_out_of_range_values_are_refused_naming_the_key(build, key):
    with pytest.raises(RecipeError) as e:
        build()
    assert str(e.value).startswith(key + "="), str(e.value)


def test_an_exported_negative_inner_lr_is_refused_on_load(tmp_path):
    path = tmp_path / "meta_lora" / "ttt_config.json"
    path.parent.mkdir()
    good = TTTConfig(steps=2, lr=0.3, learned_lrs={"x.lora_A": 0.25, "x.lora_B": 0.31})
    good.save(path, algorithm="maml")
    assert TTTConfig.load(path).learned_lrs == good.learned_lrs
    d = json.loads(path.read_text())
    d["learned_lrs"]["x.lora_B"] = -0.3
    path.write_text(json.dumps(d))
    with pytest.raises(RecipeError) as e:
        TTTConfig.load(path)
    msg = str(e.value)
    assert str(path) in msg and "learned_lrs['x.lora_B']=-0.3" in msg and "meta-train" in msg


# --- Meta-SGD: learned inner lrs stay positive by construction -------------------------------------
def _meta_module(lr: float = 0.3):
    from metattt.lit.meta import MetaTrainModule
    from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
    from metattt.models.lora import add_lora
    from metattt.models.target import FrozenTarget

    target = FrozenTarget.from_config(qwen3_config(vocab_size=V), num_draft_layers=2, seed=0)
    dcfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                          num_hidden_layers=1, block_size=S)
    torch.manual_seed(0)
    model = add_lora(BlockDrafter(dcfg).attach_target(target), r=2, alpha=4)
    cfg = MetaConfig(algorithm="fomaml", learn_inner_lr=True, ttt=TTTConfig(steps=1, lr=lr, num_anchors=4),
                     outer_anchors=4, context_min=8, context_max=12)
    return MetaTrainModule(target, model, cfg)


def test_learned_inner_lrs_start_at_the_recipe_value_and_stay_positive_under_any_outer_step():
    module = _meta_module(lr=0.3)
    torch.testing.assert_close(module.inner_lrs, torch.full_like(module.inner_lrs, 0.3))
    opt = torch.optim.SGD([module.log_inner_lrs], lr=10.0)
    for _ in range(20):  # an outer gradient that pushes every lr down, hard
        opt.zero_grad()
        module.inner_lrs.sum().backward()
        opt.step()
    assert bool((module.inner_lrs > 0).all()) and module.inner_lrs.max() < 0.3
    learned = module.ttt_config().learned_lrs
    assert len(learned) == len(module.fast_names) and all(v > 0 for v in learned.values())


def test_a_checkpoint_from_before_the_log_parametrization_resumes_as_the_same_lrs():
    module = _meta_module()
    lrs = torch.linspace(0.1, 0.5, len(module.fast_names))
    ckpt = {"state_dict": {"inner_lrs": lrs.clone()}}
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    torch.testing.assert_close(module.inner_lrs.detach(), lrs)
    with pytest.raises(RecipeError, match="run.resume=false"):
        module.on_load_checkpoint({"state_dict": {"inner_lrs": -lrs}})
