"""Evaluation stage: conditions, report, no leakage between requests."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recipe_args

from metattt.cli import main
from metattt.config import EvalConfig, TTTOverrides
from metattt.eval.speculative import condition_plan, evaluate_prompt
from metattt.models.lora import add_lora, copy_lora, lora_parameters
from metattt.ttt.tasks import TTTConfig


def _eval_args(workspace, tmp_path, *extra):
    return recipe_args(
        workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=2", "--meta.max_steps=1",
        "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=4",
        "--meta.ttt.steps=2", "--meta.val_check_interval=1",
        f"--eval.splits={{in_domain: {workspace / 'corpus' / 'validation.jsonl'}, "
        f"shifted: {workspace / 'corpus' / 'train.jsonl'}}}",
        "--eval.num_prompts=2", "--eval.prompt_len=20", "--eval.max_new_tokens=10",
        "--eval.conditions=[target, static, meta_static, ttt_zero, ttt_meta]", "--eval.grid_steps=[1]",
        *extra,
    )


@pytest.mark.e2e
def test_eval_stage_writes_report_with_every_condition(workspace, tmp_path, caplog):
    args = _eval_args(workspace, tmp_path)
    main(["meta-train", *args])
    with caplog.at_level("INFO", logger="metattt"):  # no terminal here: progress as log lines
        main(["eval", *args, "--trainer.enable_progress_bar=true", "--trainer.progress_every_s=0"])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval batch ")]
    assert [m.split()[2] for m in progress] == ["1/4", "2/4", "3/4", "4/4"], progress
    out = tmp_path / "t" / "eval"
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert set(summary) == {"in_domain", "shifted"}
    for split, conds in summary.items():
        assert set(conds) == {"target", "static", "meta_static", "ttt_zero", "ttt_meta",
                              "ttt_zero@steps=1", "ttt_meta@steps=1"}, split
        for name, s in conds.items():
            assert s["n"] == 2
            if name == "target":
                assert 0 < s["distinct_2"] <= 1
                continue
            assert 1.0 <= s["tau"] <= 4.0, (split, name, s["tau"])
            assert s["lossless"] is True, (split, name)
            assert len(s["acceptance_by_position"]) == 3
            assert s["speedup"] > 0
            if name.startswith("ttt_"):
                assert s["ttt_over_prefill"] > 0
    md = (out / "report.md").read_text()
    assert "| shifted | ttt_meta |" in md and "distinct-2" in md
    assert (out / "tau_by_condition.png").stat().st_size > 1000
    assert (out / "acceptance_by_position.png").stat().st_size > 1000
    assert any((out / "tb").rglob("events.out.tfevents.*"))


def _lora_model_and_inits(drafter):
    """The drafter with LoRA, a random "meta" init and the zero init (B = 0) beside it."""
    model = add_lora(drafter, r=4, alpha=8)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.05)
    meta = copy_lora(model)
    zero = {n: torch.zeros_like(p) if "lora_B" in n else p.detach().clone() for n, p in meta.items()}
    return model, zero, meta


def test_no_leakage_across_requests(tiny_target, tiny_drafter):
    model, zero, meta = _lora_model_and_inits(tiny_drafter)
    cfg = EvalConfig(conditions=["target", "static", "ttt_zero", "ttt_meta"], max_new_tokens=12)
    plan = condition_plan(cfg, TTTConfig(steps=3, lr=0.5, num_anchors=8, gamma=2.0))
    g = torch.Generator().manual_seed(0)
    a = torch.randint(2, 96, (20,), generator=g).tolist()
    b = torch.randint(2, 96, (20,), generator=g).tolist()

    def run(prompt, seed):
        return evaluate_prompt(tiny_target, model, prompt, plan, {"zero": zero, "meta": meta}, cfg, None, seed)

    alone = run(b, seed=7)
    run(a, seed=3)
    after_a = run(b, seed=7)
    for x, y in zip(alone, after_a):
        assert x["condition"] == y["condition"]
        assert x["tokens"] == y["tokens"] and x["accepted"] == y["accepted"]
        assert x.get("ttt_losses") == y.get("ttt_losses")
    # the initializations were not touched by adaptation
    for n, p in meta.items():
        assert torch.equal(p, meta[n])
    ttt = [r for r in alone if r["condition"] == "ttt_meta"][0]
    assert len(ttt["ttt_losses"]) == 3 and ttt["ttt_losses"][-1] < ttt["ttt_losses"][0]


def test_ttt_adapts_on_the_prefill_that_decoding_runs(tiny_target, tiny_drafter, monkeypatch):
    """A TTT request costs one target forward of the prompt, like any other: no extra prefill."""
    model, zero, meta = _lora_model_and_inits(tiny_drafter)
    cfg = EvalConfig(conditions=["target", "static", "ttt_zero", "ttt_meta"], max_new_tokens=8)
    plan = condition_plan(cfg, TTTConfig(steps=2, lr=0.5, num_anchors=8, gamma=2.0))
    prompt = torch.randint(2, 96, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    lengths = []
    forward = tiny_target.forward

    def counting_forward(ids, *args, **kwargs):
        lengths.append(ids.shape[1])
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(tiny_target, "forward", counting_forward)
    records = evaluate_prompt(tiny_target, model, prompt, plan, {"zero": zero, "meta": meta}, cfg, None, 0)
    assert lengths.count(len(prompt)) == len(plan) == 4
    for r in records:
        if r["condition"].startswith("ttt_"):
            assert len(r["ttt_losses"]) == 2 and 0 < r["ttt_time"] < r["wall_time"]


@pytest.mark.e2e
def test_two_processes_give_the_same_tau_as_one(workspace, tmp_path):
    """DDP (gloo, 2 CPU processes) shards the prompts; τ and every per-prompt record match 1 process."""
    from launch import run_metattt

    args = _eval_args(workspace, tmp_path, "--eval.grid_steps=null")
    main(["meta-train", *args])
    run_metattt("eval", args)
    one = json.loads((tmp_path / "t" / "eval" / "report.json").read_text())
    run_metattt("eval", args, devices=2)
    two = json.loads((tmp_path / "t" / "eval" / "report.json").read_text())
    assert one["meta"]["world_size"] == 1 and two["meta"]["world_size"] == 2
    for split, conds in one["summary"].items():
        for cond, s in conds.items():
            if cond != "target":
                assert two["summary"][split][cond]["tau"] == s["tau"], (split, cond)
                assert two["summary"][split][cond]["n"] == s["n"] == 2
    key = ("split", "prompt", "condition", "accepted")
    assert sorted(tuple(str(r[k]) for k in key) for r in one["records"]) == \
        sorted(tuple(str(r[k]) for k in key) for r in two["records"])


def test_eval_overrides_the_exported_ttt_settings():
    exported = TTTConfig(steps=3, lr=0.5, num_anchors=8, gamma=2.0, learned_lrs=[0.1, 0.2])
    cfg = EvalConfig(conditions=["static", "ttt_meta"], ttt=TTTOverrides(steps=5, lr=0.05, num_anchors=3), grid_steps=[1])
    plan = dict(condition_plan(cfg, exported))
    assert plan["static"] is None
    assert (plan["ttt_meta"].steps, plan["ttt_meta"].lr, plan["ttt_meta"].num_anchors) == (5, 0.05, 3)
    assert plan["ttt_meta"].learned_lrs is None and plan["ttt_meta@steps=1"].steps == 1
    assert plan["ttt_meta@steps=1"].num_anchors == 3
    assert (exported.steps, exported.num_anchors, exported.learned_lrs) == (3, 8, [0.1, 0.2])  # not mutated


def _record(split, prompt, condition, accepted, wall, tokens=(1, 2, 3)):
    S1 = 3
    return dict(split=split, prompt=prompt, condition=condition, accepted=list(accepted), wall_time=wall,
                prefill_time=0.1, ttt_time=0.0, tokens=list(tokens), position_accepted=[0] * S1,
                position_reached=[0] * S1, lossless=None if condition == "target" else True)


def test_report_leads_with_paired_differences_and_flags_impossible_speedups(tmp_path):
    from metattt.eval.speculative import write_report

    recs = []
    for p in range(6):
        recs.append(_record("shifted", p, "target", [], wall=1.0))
        recs.append(_record("shifted", p, "static", [0, 1], wall=0.1))  # τ 1.5, speedup 10: impossible
        recs.append(_record("shifted", p, "ttt_meta", [1, 2] if p % 2 else [2, 2], wall=1.0))
    summary = write_report(recs, tmp_path, {"recipe": "t"})
    assert summary["shifted"]["static"]["timing_suspect"] is True
    assert summary["shifted"]["ttt_meta"]["timing_suspect"] is False
    report = json.loads((tmp_path / "report.json").read_text())
    d = report["differences"]["shifted"]["ttt_meta - static"]
    # per prompt: τ(ttt_meta) ∈ {2.5, 3.0}, τ(static) = 1.5 -> Δ ∈ {1.0, 1.5}, mean 1.25
    assert d["n"] == 6 and d["mean"] == 1.25 and 1.0 <= d["ci_low"] < 1.25 < d["ci_high"] <= 1.5 and d["significant"]
    md = (tmp_path / "report.md").read_text()
    assert md.index("Paired differences") < md.index("τ and speed per condition")
    assert "**+1.25 [" in md and "⚠" in md and "not results" in md


def test_conditions_rotate_per_prompt_and_steps_curves_collect_grid_points():
    from metattt.eval.speculative import rotated, steps_curves

    plan = [("target", None), ("static", None), ("ttt_meta", None)]
    assert [c for c, _ in rotated(plan, 0)] == ["target", "static", "ttt_meta"]
    assert [c for c, _ in rotated(plan, 4)] == ["static", "ttt_meta", "target"]
    firsts = {rotated(plan, i)[0][0] for i in range(3)}
    assert firsts == {"target", "static", "ttt_meta"}
    d = {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    diffs = {"s": {"ttt_meta - static": d, "ttt_meta@steps=1 - static": d, "ttt_meta@steps=1 - ttt_meta": d,
                   "ttt_zero@lr=0.1 - static": d}}
    assert steps_curves(diffs, default_steps=3) == {"s": {"ttt_meta": [(1, d), (3, d)]}}


def test_tau_by_position_buckets_steps_by_where_their_drafts_start():
    from metattt.eval.speculative import tau_by_position

    rows = [dict(accepted=[0, 3, 3, 1], step_starts=[1, 2, 6, 10]),  # bucket 4: τ per bucket 2.5, 4, 2
            dict(accepted=[1, 1], step_starts=[1, 3])]
    out = tau_by_position(rows, bucket=4)
    assert [(b["start"], b["end"], b["n"]) for b in out] == [(0, 4, 2), (4, 8, 1), (8, 12, 1)]
    assert out[0]["tau"] == pytest.approx((2.5 + 2.0) / 2) and out[1]["tau"] == 4.0 and out[2]["tau"] == 2.0


def test_load_prompts_takes_disjoint_windows_when_records_are_few(workspace, tmp_path):
    from transformers import AutoTokenizer

    from metattt.eval.speculative import load_prompts

    tok = AutoTokenizer.from_pretrained(workspace / "target")
    text = " ".join(f"word{i}" for i in range(400))
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in (text, text[::-1])))
    prompts = load_prompts(str(path), tok, prompt_len=40, num_prompts=8, seed=0)
    assert len(prompts) == 8 and all(len(p) == 40 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 8  # no window twice
    one = load_prompts(str(path), tok, prompt_len=40, num_prompts=2, seed=0)
    assert one == prompts[:2]  # with enough records: one window each, as before


def _world_results(monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.syspath_prepend("scripts")  # the script imports its neighbour readme_results
    spec = importlib.util.spec_from_file_location("world_results", Path("scripts/world_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_online_goals_are_read_from_the_report_and_can_fail(monkeypatch):
    world = _world_results(monkeypatch)

    def buckets(*taus):
        return [{"start": 64 * i, "end": 64 * (i + 1), "tau": t, "tau_stderr": 0.1, "n": 4} for i, t in enumerate(taus)]

    def diff(mean, lo):
        return {"mean": mean, "ci_low": lo, "ci_high": mean + (mean - lo), "n": 4}

    rep = {"meta": {"drafter_kind": "block", "prompt_len": 512, "max_new_tokens": 512, "ttt_steps": 3,
                    "online": {"every": 4, "steps": 1, "num_anchors": 16, "window": 64},
                    "meta_online": {"chunk": 8, "max_chunks": 4}},
           "summary": {"drafter_shifted": {"static": {"tau": 2.0, "tau_by_position": buckets(2.0, 1.9)},
                                           "online_meta": {"tau": 3.0, "tau_by_position": buckets(2.5, 3.4),
                                                           "online_share_of_wall_time": 0.12}},
                       "in_domain": {"static": {"tau": 3.0}, "online_meta": {"tau": 3.0}}},
           "differences": {"drafter_shifted": {"online_meta - ttt_meta": diff(0.6, 0.2),
                                               "online_meta - online_zero": diff(0.3, -0.1)},
                           "in_domain": {"online_meta - ttt_meta": diff(-0.02, -0.1)}}}
    met = [line.rsplit("|", 2)[1].strip() for line in world.online_goals(rep)[2:-1]]
    assert met == ["met", "met", "not met", "met", "met", "met"]
    rep["summary"]["drafter_shifted"]["static"]["tau_by_position"] = buckets(2.0, 2.2)  # static rises too
    rep["summary"]["drafter_shifted"]["online_meta"]["tau"] = 2.5  # × 1.25
    rep["summary"]["drafter_shifted"]["online_meta"]["online_share_of_wall_time"] = 0.3
    met = [line.rsplit("|", 2)[1].strip() for line in world.online_goals(rep)[2:-1]]
    assert met == ["not met", "met", "not met", "not met", "met", "not met"]
    text = "\n".join(world.online_section(rep, "Online"))
    assert "chunks of 8 tokens, up to 4 per task" in text and "| online_meta | 2.50 | 3.40 |" in text
    assert text.startswith("**Online**") and "decoding cache" not in text
    rep["meta"]["online"]["detach_context"] = True
    assert "read from the decoding cache as constants" in "\n".join(world.online_section(rep, "Online"))


def test_the_schedules_table_has_a_row_per_online_eval(monkeypatch):
    world = _world_results(monkeypatch)

    def rep(every, detach, tau, share):
        return {"meta": {"online": {"every": every, "detach_context": detach}},
                "summary": {"drafter_shifted": {"static": {"tau": 1.2, "tokens_per_s": 100.0},
                                                "online_meta": {"tau": tau, "tokens_per_s": 90.0,
                                                                "online_share_of_wall_time": share}}},
                "differences": {"drafter_shifted": {"online_meta - ttt_meta": {"mean": 0.5, "ci_low": 0.2, "significant": True,
                                                                               "ci_high": 0.8, "n": 4}}}}

    lines = world.schedules_section({"online.json": rep(4, False, 1.8, 0.4), "online_cheap.json": rep(16, True, 1.5, 0.1)})
    rows = [line for line in lines if line.startswith("| `make")]
    assert len(rows) == 2  # online_every16.json is missing: no row
    assert rows[0].startswith("| `make online` | 4 | differentiated | 1.80 | 1.50 | **+0.50 [+0.20, +0.80]** | 40 % | 90 (100) |")
    assert "| 16 | detached | 1.50 | 1.25 |" in rows[1] and "| 10 % |" in rows[1]
