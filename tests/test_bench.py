"""Benchmark plumbing on tiny random models (the numbers themselves come from `make bench`)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import qwen3_config

from metattt.bench import build_models, format_tables, step_costs, ttt_prefill_costs


def _tiny():
    cfg = qwen3_config().to_dict()
    return build_models(cfg, num_layers=2, block_size=4, dtype=torch.float32, device=torch.device("cpu"), lora_r=4)


def test_step_costs_measure_every_algorithm_and_second_order_keeps_more_memory(monkeypatch):
    from metattt import bench

    # at these widths the resident set barely moves: count what autograd saves instead
    monkeypatch.setattr(bench, "_resident_peak", lambda fn: None)
    target, model = _tiny()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 96, (2, 48), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    res = step_costs(target, model, batch, context_len=24, inner_steps=2, anchors=8,
                     algorithms=("maml", "maml_checkpointed", "fomaml", "reptile"), reps=1, kl_weight=0.5)
    for algo in ("maml", "maml_checkpointed", "fomaml", "reptile", "distill_kl"):
        assert res[algo]["step_ratio"] > 0 and res[algo]["mem_ratio"] > 0
    # second order keeps every inner step's graph alive for the outer backward; checkpointed, it
    # recomputes them there instead
    assert res["maml"]["mem_ratio"] > res["fomaml"]["mem_ratio"]
    assert res["maml_checkpointed"]["mem_ratio"] < res["maml"]["mem_ratio"]


def test_ttt_prefill_rows_and_tables(tmp_path):
    target, model = _tiny()
    rows = ttt_prefill_costs(target, model, [32, 64], steps=2, anchors=4, reps=1)
    assert [r["prompt_len"] for r in rows] == [32, 64] and all(r["ttt_over_prefill"] > 0 for r in rows)
    res = {"machine": {"device": "cpu", "torch": torch.__version__, "preset": "quick"}, "setup": {},
           "meta_step": {a: {"step_ratio": 2.0, "mem_ratio": 3.0} for a in ("maml", "fomaml", "reptile")},
           "ttt_prefill": rows, "scaling": {"by_context": [{"context_len": 8, "maml": 2.5}],
                                            "by_k": [{"k": 1, "maml": 2.0, "fomaml": 1.5}]}}
    text = format_tables(res)
    assert "| maml | 2.00 | 3.00 |" in text and "| 32 |" in text
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(res))
    (tmp_path / "README.md").write_text("# x\n")
    spec = importlib.util.spec_from_file_location("readme_results", Path("scripts/readme_results.py"))
    readme_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_results)
    readme_results.main(tmp_path)
    readme_results.main(tmp_path)  # idempotent: the section is replaced, not appended again
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("<!-- results:begin -->") == 1 and "| maml | 2.00 | 3.00 |" in readme

    # the real-shape section: several block counts against one prefill timing per length
    rows = ttt_prefill_costs(target, model, [32], steps=1, anchors=2, reps=1, more_anchors=(8,))
    assert set(rows[0]["ttt_over_prefill_by_anchors"]) == {"2", "8"}
    assert rows[0]["ttt_over_prefill_by_anchors"]["2"] == rows[0]["ttt_over_prefill"]
    shape = {"machine": res["machine"], "setup": {"block_size": 4}, "ttt_prefill": rows}
    (tmp_path / "bench" / "results_qwen3_4b_cpu.json").write_text(json.dumps(shape))
    readme_results.main(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "### TTT vs prefill at Qwen3-4B's shape (CPU" in readme
    assert "5 TTT steps ÷ prefill, 2 blocks | 5 TTT steps ÷ prefill, 8 blocks |" in readme
    assert re.search(r"\| 32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", readme)


def test_draft_costs_time_both_kinds():
    from metattt.bench import draft_costs

    target, _ = _tiny()
    res = draft_costs(target, num_layers=2, block_size=4, context_len=16, reps=2)
    assert res["block"] > 0 and res["autoregressive"] > 0 and res["target_verify"] > 0
    assert res["autoregressive_over_block"] == res["autoregressive"] / res["block"]


def test_task_batching_rows_time_both_paths_side_by_side(tmp_path):
    from metattt.bench import format_real_shape_meta, format_task_batching, task_batching_costs

    target, model = _tiny()
    rows = task_batching_costs(target, model, seq_len=32, context_len=16, inner_steps=2, anchors=4, task_counts=(1, 3),
                               algorithms=("maml", "fomaml"), reps=1)
    assert [r["tasks"] for r in rows] == [1, 3]
    for row in rows:
        for algo in ("maml", "fomaml"):
            v = row[algo]
            assert v["per_task_over_batched"] == v["per_task_s"] / v["batched_s"]
            assert v["batched_over_distill"] == v["batched_s"] / row["distill_s"]
            assert v["batched_mem_ratio"] > 0 and v["per_task_mem_ratio"] > 0
    # both paths keep the same graphs alive: memory differs by padding only
    assert rows[0]["maml"]["batched_mem_ratio"] == pytest.approx(rows[0]["maml"]["per_task_mem_ratio"], rel=0.3)
    text = "\n".join(format_task_batching(rows))
    assert text.count("\n| 3 | ") == 2 and "| per task ÷ batched |" in text
    shape = {"machine": {"device": "cpu", "torch": torch.__version__}, "setup": {"seq_len": 32},
             "task_batching": rows}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results_qwen3_4b_meta_cpu.json").write_text(json.dumps(shape))
    (tmp_path / "README.md").write_text("# x\n")
    spec = importlib.util.spec_from_file_location("readme_results", Path("scripts/readme_results.py"))
    readme_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_results)
    readme_results.main(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "### Meta steps at Qwen3-4B's shape (CPU" in readme and format_real_shape_meta(shape) in readme


def test_batched_costs_time_every_contender_and_format_their_ratios():
    from metattt.bench import batched_costs, format_batched
    from metattt.ttt.tasks import TTTConfig

    tcfg = dict(qwen3_config().to_dict(), max_position_embeddings=256)
    res = batched_costs(tcfg, layers=1, S=4, dtype=torch.float32, device=torch.device("cpu"),
                        ttt=TTTConfig(steps=1, lr=0.1, num_anchors=4), batch_sizes=(1, 2), new_tokens=8,
                        prompt_lens=(12, 20), reps=1, distill_steps=2, unseen_at=(1,))
    assert [row["batch"] for row in res["decoding"]] == [1, 2]
    first, second = res["decoding"]
    assert {"target/single", "static/single", "static_unseen"} <= set(first)
    for name in ("target", "static", "ttt_meta"):
        # every row of a batch writes its 8 tokens (EOS off), timed side by side
        assert second[name]["tokens"] == 16 and second[name]["tokens_per_s"] > 0
        assert second[name]["over_batch_1"] == second[name]["tokens_per_s"] / first[name]["tokens_per_s"]
    assert first["target"]["tau"] is None and 1 <= first["static"]["tau"] <= 4
    assert [row["batch"] for row in res["ttt"]] == [1, 2] and res["ttt"][0]["batched_over_one_request"] == 1.0
    text = "\n".join(format_batched(res))
    assert text.count("\n| 2 | ") == 2 and "batched ÷ one request's TTT" in text


def test_online_costs_time_updates_and_decoding_side_by_side_and_format_their_ratios():
    from metattt.bench import format_online, online_decoding_costs, online_update_costs
    from metattt.config import OnlineConfig
    from metattt.ttt.tasks import TTTConfig

    ttt, online = TTTConfig(steps=1, lr=0.1, num_anchors=4), OnlineConfig(steps=1, window=8, num_anchors=4)
    target, model = _tiny()
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    rows = online_update_costs(target, model, ttt, online, [24, 40], reps=1)
    assert [row["context_len"] for row in rows] == [24, 40]
    for row in rows:
        assert row["update_over_verify"] == row["update_s"] / row["verify_s"]
        assert row["rebuild_over_verify"] == row["rebuild_s"] / row["verify_s"]
        # the block kind's default LoRA sits on fc / k_proj / v_proj: every update asks for a rebuild
        assert row["rebuilds"] and row["online_over_verify"] == (row["update_s"] + row["rebuild_s"]) / row["verify_s"]
        assert row["detached_online_over_verify"] == (row["detached_update_s"] + row["rebuild_s"]) / row["verify_s"]
    # the timed updates leave the model as they found it
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)

    tcfg = dict(qwen3_config().to_dict(), max_position_embeddings=256)
    dec = online_decoding_costs(tcfg, layers=1, S=4, dtype=torch.float32, device=torch.device("cpu"), ttt=ttt,
                                online=online, everies=(1, 4), n_prompts=2, prompt_lens=(12, 20), new_tokens=8,
                                reps=1, distill_steps=2)
    static, target_only = dec["static"], dec["target"]
    assert target_only["tau"] is None and target_only["speedup"] == 1.0 and 1 <= static["tau"] <= 4
    assert static["speedup"] == target_only["seconds"] / static["seconds"]
    assert [(row["every"], row["detach_context"]) for row in dec["online"]] == [(1, False), (4, False), (1, True), (4, True)]
    for row in dec["online"]:
        # the same prompts, 8 tokens each (EOS off), timed beside decoding without updates
        assert row["tokens"] == 16 and 1 <= row["tau"] <= 4
        assert row["overhead"] == (row["seconds"] - static["seconds"]) / static["seconds"]
        assert row["online_s_per_token"] == row["online_s"] / row["tokens"]
        assert row["speedup"] == target_only["seconds"] / row["seconds"]
    assert dec["online"][0]["updates"] > 0 and dec["online"][0]["online_s"] > 0
    text = "\n".join(format_online({"update": rows, "decoding": dec}))
    assert "| 40 | " in text and "\n| online | 1 | " in text and "\n| online | 4 | " in text
    assert "\n| online, older context detached | 4 | " in text
    res = {"machine": {"device": "cpu", "torch": torch.__version__, "preset": "quick"}, "setup": {},
           "meta_step": {a: {"step_ratio": 2.0, "mem_ratio": 3.0} for a in ("maml", "fomaml", "reptile")},
           "ttt_prefill": [], "scaling": {"by_context": [], "by_k": []}, "online": {"update": rows, "decoding": dec}}
    assert text in format_tables(res)


def test_a_run_of_some_sections_keeps_the_others_in_the_results_file(tmp_path, monkeypatch):
    from metattt import bench
    from metattt.cli import parse_recipe

    _, r = parse_recipe(["bench", "--config", "recipes/tiny.yaml"])
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"online": {"kept": True}, "draft_cost": {"stale": True}}))
    monkeypatch.setattr(bench, "format_tables", lambda res: "")  # the other sections are stand-ins
    res = bench.run(r, full=False, out=out, skip_tau=True, sections=["draft_cost"])
    saved = json.loads(out.read_text())
    assert saved == res and saved["online"] == {"kept": True}
    assert saved["draft_cost"]["block"] > 0 and "stale" not in saved["draft_cost"] and "meta_step" not in saved
    with pytest.raises(ValueError, match="bench.sections: unknown"):
        bench.run(r, full=False, out=out, skip_tau=True, sections=["draft"])


def test_the_resident_peak_sees_a_step_that_allocates_and_frees():
    from metattt.bench import _resident_peak

    def step() -> None:
        x = torch.ones(16 * 2**20)  # 64 MiB, freed on return
        assert float(x[-1]) == 1.0

    peak = _resident_peak(step)
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this system (the bench falls back to saved bytes)")
    assert 60 * 2**20 <= peak <= 200 * 2**20
    assert _resident_peak(lambda: None) < 16 * 2**20  # nothing allocated, nothing counted
