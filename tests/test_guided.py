"""Draft-guided decoding: α = 0 is the target, α = 1 is the drafter, the null control, TTT,
refinement, and the guided-eval stage end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import MASK_ID, qwen3_config, recipe_args

from metattt.config import GuidedConfig
from metattt.eval.guided import condition_list
from metattt.models.lora import add_lora, copy_lora, lora_parameters
from metattt.spec.decode import target_generate
from metattt.spec.guided import guide_logits, guided_generate, matched_noise, refine_generate, step_alpha
from metattt.ttt.tasks import TTTConfig


@pytest.fixture
def lively():
    """A target and drafter initialised wide enough that greedy decoding does not collapse to one
    repeated token, so token-for-token comparisons mean something."""
    from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
    from metattt.models.target import FrozenTarget

    config = qwen3_config()
    config.initializer_range = 0.3
    target = FrozenTarget.from_config(config, num_draft_layers=2, seed=0)
    torch.manual_seed(1)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                    num_hidden_layers=2, block_size=4)
    drafter = BlockDrafter(cfg).attach_target(target)
    drafter.reset_parameters(std=0.3)
    return target, drafter


def _prompt(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def test_alpha_zero_reproduces_target_greedy(lively, tiny_target, tiny_drafter):
    for target, drafter in (lively, (tiny_target, tiny_drafter)):
        for seed in range(3):
            prompt = _prompt(seed=seed)
            ref = target_generate(target, prompt, 20, eos_token_id=None)
            for rule in ("fixed", "kl"):
                out = guided_generate(target, drafter, prompt, 20, eos_token_id=None, alpha=0.0, alpha_rule=rule)
                assert out.tokens == ref.tokens
                assert out.alphas == [0.0] * 20 and not any(out.changed)
    # the lively pair really decodes varied text (the comparison above is not vacuous)
    assert len(set(target_generate(lively[0], _prompt(), 20, None).tokens)) > 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_alpha_zero_reproduces_target_sampling(lively, temperature, top_p):
    target, drafter = lively
    for seed in range(3):
        prompt = _prompt(seed=seed)
        ref = target_generate(target, prompt, 24, eos_token_id=None, temperature=temperature, top_p=top_p,
                              generator=torch.Generator().manual_seed(100 + seed))
        for control in ("guided", "noise"):
            out = guided_generate(target, drafter, prompt, 24, eos_token_id=None, alpha=0.0, control=control,
                                  temperature=temperature, top_p=top_p,
                                  generator=torch.Generator().manual_seed(100 + seed),
                                  noise_generator=torch.Generator().manual_seed(7))
            assert out.tokens == ref.tokens, control


def test_alpha_zero_stops_at_eos_like_target(lively):
    target, drafter = lively
    prompt = _prompt(seed=4)
    free = target_generate(target, prompt, 20, eos_token_id=None).tokens
    eos = free[5]
    ref = target_generate(target, prompt, 20, eos_token_id=eos)
    out = guided_generate(target, drafter, prompt, 20, eos_token_id=eos, alpha=0.0)
    assert out.tokens == ref.tokens and out.tokens[-1] == eos and out.stop_reason == "eos"


def test_alpha_one_follows_the_drafters_own_argmax(lively):
    target, drafter = lively
    prompt = _prompt(10, seed=1)
    out = guided_generate(target, drafter, prompt, 12, eos_token_id=None, alpha=1.0)
    assert out.tokens != target_generate(target, prompt, 12, None).tokens  # guidance took over
    S = drafter.config.block_size
    with torch.no_grad():
        for i, tok in enumerate(out.tokens):
            seq = torch.cat([prompt, torch.tensor([out.tokens[:i]], dtype=torch.long)], 1)  # committed prefix
            L = seq.shape[1]
            features = target(seq, return_logits=False).features  # uncached, independent of the decode loop
            block = torch.full((1, 1, S), MASK_ID, dtype=torch.long)
            block[0, 0, 0] = seq[0, -1]
            hidden = drafter(block, torch.tensor([[L - 1]]), context_features=features)  # sees positions < L-1
            assert int(drafter.logits(hidden[0, 0, 1]).argmax()) == tok, i


def test_force_scores_the_reference_under_the_guided_distribution(lively):
    target, drafter = lively
    prompt, answer = _prompt(10, seed=3), [17, 5, 60]
    at0 = guided_generate(target, drafter, prompt, 99, eos_token_id=None, alpha=0.0, force=answer)
    assert at0.tokens == answer and len(at0.logprobs) == 3
    with torch.no_grad():  # α = 0: the target's own teacher-forced log-probabilities
        logits = target(torch.cat([prompt, torch.tensor([answer])], 1)).logits[0, prompt.shape[1] - 1 : -1]
    want = torch.log_softmax(logits.float(), -1)[torch.arange(3), torch.tensor(answer)]
    torch.testing.assert_close(torch.tensor(at0.logprobs), want, rtol=1e-4, atol=1e-4)
    at1 = guided_generate(target, drafter, prompt, 99, eos_token_id=None, alpha=1.0, force=answer)
    assert at1.logprobs != at0.logprobs and all(lp <= 0 for lp in at1.logprobs)


def test_alpha_one_with_the_autoregressive_drafter():
    ar = pytest.importorskip("metattt.models.ar_drafter")
    from metattt.models.target import FrozenTarget

    config = qwen3_config()
    config.initializer_range = 0.3
    target = FrozenTarget.from_config(config, num_draft_layers=2, seed=0)
    torch.manual_seed(1)
    cfg = ar.ARDrafterConfig.from_target(target.config, mask_token_id=MASK_ID, target_layer_ids=target.layer_ids,
                                         num_hidden_layers=2, block_size=4)
    drafter = ar.ARDrafter(cfg).attach_target(target)
    drafter.reset_parameters(std=0.3)
    prompt = _prompt(8, seed=2)
    assert guided_generate(target, drafter, prompt, 8, None, alpha=0.0).tokens == \
        target_generate(target, prompt, 8, None).tokens
    out = guided_generate(target, drafter, prompt, 8, eos_token_id=None, alpha=1.0)
    with torch.no_grad():
        for i, tok in enumerate(out.tokens):
            seq = torch.cat([prompt, torch.tensor([out.tokens[:i]], dtype=torch.long)], 1)
            features = target(seq, return_logits=False).features
            hidden = drafter(seq[:, None, -1:], torch.tensor([[seq.shape[1] - 1]]), context_features=features)
            assert int(drafter.logits(hidden[0, 0, 0]).argmax()) == tok, i


def test_guide_logits_rules_and_ends():
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(50, generator=g), torch.randn(50, generator=g) * 3
    out, a, kl = guide_logits(t, d, 0.0)
    assert out is t and a == 0.0 and kl > 0
    assert torch.equal(guide_logits(t, d, 1.0)[0], d)
    mid = guide_logits(t, d, 0.3)[0]
    torch.testing.assert_close(mid, t + 0.3 * (d - t))
    # kl rule: alpha scaled by KL / tau, capped at alpha; nothing to steer where the two agree
    assert step_alpha(0.5, "kl", 0.2, 1.0) == pytest.approx(0.1)
    assert step_alpha(0.5, "kl", 7.0, 1.0) == 0.5
    same, a, kl = guide_logits(t, t.clone(), 0.5, alpha_rule="kl")
    assert a == 0.0 and same is t
    _, a, kl = guide_logits(t, d, 0.5, alpha_rule="kl", kl_tau=1e6)
    assert a == pytest.approx(0.5 * kl / 1e6)
    with pytest.raises(ValueError):
        guide_logits(t, d, 0.5, alpha_rule="nope")


def test_null_control_noise_is_matched_in_scale_and_seeded():
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(200, generator=g), torch.randn(200, generator=g) + 5.0  # a pure shift carries nothing
    eps = matched_noise(t, d, torch.Generator().manual_seed(3))
    diff = d - t
    torch.testing.assert_close(eps.norm(), (diff - diff.mean()).norm())
    assert abs(float(eps.mean())) < 1e-5
    assert torch.equal(eps, matched_noise(t, d, torch.Generator().manual_seed(3)))
    out, a, _ = guide_logits(t, d, 0.4, control="noise", noise_generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, t + 0.4 * eps)


def test_null_control_runs_and_differs_from_guided(lively):
    target, drafter = lively
    prompt = _prompt(seed=2)
    guided = guided_generate(target, drafter, prompt, 16, eos_token_id=None, alpha=0.5)
    null = guided_generate(target, drafter, prompt, 16, eos_token_id=None, alpha=0.5, control="noise",
                           noise_generator=torch.Generator().manual_seed(0))
    assert len(null.tokens) == 16 and null.tokens != guided.tokens
    assert any(null.changed) and any(guided.changed)
    # same α_t schedule: only the direction differs
    assert null.alphas == guided.alphas == [0.5] * 16
    again = guided_generate(target, drafter, prompt, 16, eos_token_id=None, alpha=0.5, control="noise",
                            noise_generator=torch.Generator().manual_seed(0))
    assert again.tokens == null.tokens  # seeded
    # sampling: the noise has its own generator, so it changes tokens but not the draws' source
    s = guided_generate(target, drafter, prompt, 16, None, alpha=0.5, control="noise", temperature=1.0,
                        generator=torch.Generator().manual_seed(1), noise_generator=torch.Generator().manual_seed(0))
    assert len(s.tokens) == 16


def test_one_token_prompt_and_stop_callback(lively):
    target, drafter = lively
    out = guided_generate(target, drafter, _prompt(1), 6, eos_token_id=None, alpha=0.3)
    assert len(out.tokens) == 6
    stopped = guided_generate(target, drafter, _prompt(), 20, eos_token_id=None, alpha=0.3,
                              stop=lambda toks: len(toks) >= 3)
    assert len(stopped.tokens) == 3 and stopped.stop_reason == "stop"


def test_ttt_on_adapts_then_restores_the_lora(lively):
    target, drafter = lively
    model = add_lora(drafter, r=4, alpha=8)
    before = copy_lora(model)
    prompt = _prompt(24, seed=5)
    ttt = TTTConfig(steps=3, lr=0.5, num_anchors=8, gamma=2.0)
    off = guided_generate(target, model, prompt, 12, None, alpha=1.0)
    on = guided_generate(target, model, prompt, 12, None, alpha=1.0, ttt=ttt)
    assert len(on.ttt_losses) == 3 and on.ttt_losses[-1] < on.ttt_losses[0] and on.ttt_time > 0
    assert on.tokens != off.tokens or on.kls != off.kls  # the adapted drafter steers differently
    for n, p in lora_parameters(model).items():
        assert torch.equal(p, before[n]), n  # nothing leaks into the next request
    again = guided_generate(target, model, prompt, 12, None, alpha=1.0, ttt=ttt)
    assert again.tokens == on.tokens and again.ttt_losses == on.ttt_losses


def test_ttt_needs_lora(lively):
    target, drafter = lively
    with pytest.raises(ValueError, match="LoRA"):
        guided_generate(target, drafter, _prompt(), 4, None, alpha=0.5, ttt=TTTConfig(steps=1))


def test_refine_generate_rounds(lively):
    target, drafter = lively
    model = add_lora(drafter, r=4, alpha=8)
    init = copy_lora(model)
    prompt = _prompt(20, seed=6)
    ttt = TTTConfig(steps=2, lr=0.5, num_anchors=8, gamma=2.0)
    rounds = refine_generate(target, model, prompt, 2, ttt, init, seed=3, max_new_tokens=10, alpha=0.5)
    assert len(rounds) == 3 and all(len(r.tokens) == 10 for r in rounds)
    assert all(len(r.ttt_losses) == 2 for r in rounds)
    for n, p in lora_parameters(model).items():
        assert torch.equal(p, init[n])
    # round 0 is guided decoding with TTT on the prompt
    first = guided_generate(target, model, prompt, 10, None, alpha=0.5, ttt=ttt, ttt_init=init, ttt_seed=3,
                            generator=torch.Generator().manual_seed(3), noise_generator=torch.Generator().manual_seed(4))
    assert first.tokens == rounds[0].tokens


def test_condition_list():
    cfg = GuidedConfig(alphas=[0.0, 0.2, 0.5], ttt_modes=[False, True], null_control=True, refine_rounds=1)
    conds = condition_list(cfg)
    assert conds[0] == ("guided", False, 0.0)
    assert ("noise", True, 0.5) in conds and ("refine", True, 0.2) in conds
    assert len(conds) == 1 + 2 * 2 * 2 + 2
    assert len(condition_list(GuidedConfig(null_control=False, ttt_modes=[False]))) == 5


@pytest.mark.e2e
def test_guided_eval_stage_end_to_end(workspace, tmp_path):
    from metattt.cli import main

    base = recipe_args(
        workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=2", "--meta.max_steps=1",
        "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=4",
        "--meta.ttt.steps=2", "--meta.val_check_interval=1",
    )
    main(["meta-train", *base])
    t0 = time.perf_counter()
    main(["guided-eval", *base, "--guided.synthetic_categories=[python, rules]", "--guided.synthetic_tasks=1",
          "--guided.synthetic_questions=2", "--guided.alphas=[0, 0.5]", "--guided.temperatures=[0, 1.0]",
          "--guided.refine_rounds=1", "--guided.max_new_tokens=6", "--guided.max_prompt_tokens=96",
          "--guided.ttt.steps=1"])
    assert time.perf_counter() - t0 < 60
    out = tmp_path / "t" / "guided"
    report = json.loads((out / "report.json").read_text())
    conds = {r["condition"] for r in report["summary"]}
    assert conds == {"target", "guided|ttt=off|a=0.5", "guided|ttt=on|a=0.5", "noise|ttt=off|a=0.5",
                     "noise|ttt=on|a=0.5", "refine|ttt=on|a=0.5"}
    assert {r["category"] for r in report["summary"]} == {"python", "rules", "all"}
    assert {r["temperature"] for r in report["summary"]} == {0.0, 1.0}
    # 2 tasks × 2 questions × 2 temperatures × 6 conditions
    assert len(report["records"]) == 2 * 2 * 2 * 6
    for r in report["summary"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0
    assert all(len(r["round_scores"]) == 2 for r in report["records"] if r["control"] == "refine")
    assert report["meta"]["lora_init"] == "meta"
    md = (out / "report.md").read_text()
    assert "| python | 0.5 |" in md and "null, TTT on" in md
    assert (out / "accuracy_by_alpha.png").stat().st_size > 1000
    assert (out / "answer_logprob_by_alpha.png").stat().st_size > 1000
    assert all(r["answer_logprob"] < 0 for r in report["records"] if r["control"] != "refine")
    assert "Log-probability of the reference answer" in md
    from metattt.clbench import load_tasks

    assert len(load_tasks(out / "tasks.jsonl")) == 2
