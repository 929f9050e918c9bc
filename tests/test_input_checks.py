"""Bad input gets a short, exact error; nothing harmful is accepted (issue 14): the checks one by one.
The CLI as a user meets them (exit code 2, one line, nothing written) is tests/test_cli_errors.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MASK_ID, qwen3_config

from metattt.config import DistillConfig, EvalConfig, MetaConfig, OnlineConfig, TTTConfig, TTTOverrides
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
    (lambda: EvalConfig(online=OnlineConfig(every=-1)), "eval.online.every"),
    (lambda: EvalConfig(online=OnlineConfig(window=1)), "eval.online.window"),
    (lambda: EvalConfig(online=OnlineConfig(lr=-0.5)), "eval.online.lr"),
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


# --- layer taps -------------------------------------------------------------------------------------
def test_default_layer_taps_are_distinct_or_refused_saying_how_many_layers_they_need():
    from metattt.models.target import default_target_layer_ids, validate_layer_ids

    assert default_target_layer_ids(4, 2) == [1, 2]  # DFlash's 1..L-3 would repeat layer 1
    assert default_target_layer_ids(5, 3) == [1, 2, 3]
    for layers in range(2, 40):
        for n in range(1, 6):
            try:
                ids = default_target_layer_ids(layers, n)
            except ValueError as e:
                assert f"at least {n + 3}" in str(e) and f"this target has {layers}" in str(e) and layers < n
                continue
            assert len(set(ids)) == n and all(0 <= i < layers for i in ids), (layers, n, ids)
            if 1 < n <= layers - 1:  # the layer after the final norm is tapped only when there is no other way
                assert max(ids) < layers - 1, (layers, n, ids)
    with pytest.raises(ValueError, match=r"target.layer_ids \[1, 1\] repeat"):
        validate_layer_ids([1, 1], 4)


# --- target.path: a local folder first, a hub id only with a network -----------------------------
def test_a_missing_relative_target_is_a_missing_folder_unless_a_network_exists(monkeypatch, tmp_path):
    import metattt.models.target as target_mod

    real_probe = target_mod.hub_reachable
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:  # HF_HUB_OFFLINE=1 (conftest): no network
        target_mod.resolve_target_path("nonexistent/target")
    assert str(e.value).startswith("target.path=nonexistent/target: no local folder `nonexistent/target` "
                                   "(and no network to try it as a hub id)")
    monkeypatch.setattr(target_mod, "hub_reachable", lambda timeout=3.0: True)
    assert target_mod.resolve_target_path("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    with pytest.raises(FileNotFoundError, match="no local folder `./Qwen/Qwen3-4B`, so no config.json"):
        target_mod.resolve_target_path("./Qwen/Qwen3-4B")  # a path, never a hub id
    (tmp_path / "Qwen" / "Qwen3-4B").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="the folder has no config.json"):
        target_mod.resolve_target_path("Qwen/Qwen3-4B")  # the local folder wins
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not real_probe()


# --- data files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, line", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c",\n{"text": "d"}\n', 4),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": "b"\n]\n', 4),
])
def test_an_invalid_json_line_is_named_with_file_and_line(tmp_path, name, text, line):
    from metattt.data.text import load_records

    (tmp_path / name).write_text(text)
    with pytest.raises(RecipeError) as e:
        load_records(str(tmp_path / name))
    assert str(e.value).startswith(f"{tmp_path / name}: line {line}: invalid JSON ("), str(e.value)


def test_an_invalid_task_line_is_named_with_file_and_line(tmp_path):
    from metattt.clbench import load_tasks

    (tmp_path / "tasks.jsonl").write_text('{"id": "a", "context": "c", "questions": []}\n{"id": \n')
    with pytest.raises(RecipeError, match=r"tasks.jsonl: line 2: invalid JSON"):
        load_tasks(tmp_path / "tasks.jsonl")


# --- truncated weights ----------------------------------------------------------------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def test_truncated_drafter_and_adapter_files_are_named_with_the_stage_that_writes_them(workspace, tmp_path):
    from metattt.config import DrafterConfig, TargetConfig
    from metattt.errors import CorruptFileError
    from metattt.export.meta_lora import export_meta_lora
    from metattt.loading import build_drafter, load_target, load_tokenizer
    from metattt.models.lora import add_lora
    from metattt.models.registry import load_drafter
    from metattt.serve import TTTSpeculator

    target = load_target(TargetConfig(path=str(workspace / "target")), 2)
    tok = load_tokenizer(workspace / "target")
    run = tmp_path / "run"
    for kind in ("block", "autoregressive"):
        drafter = build_drafter(DrafterConfig(kind=kind, num_hidden_layers=1, block_size=4), target, tok)
        drafter.save_pretrained(run / kind / "drafter")
        drafter.save_pretrained(run / kind / "intact")
        export_meta_lora(add_lora(drafter, r=2, alpha=4), run / kind / "meta_lora", TTTConfig(steps=1),
                         run / kind / "drafter")
        _truncate(run / kind / "drafter" / "model.safetensors")
        with pytest.raises(CorruptFileError) as e:
            load_drafter(run / kind / "drafter")
        assert str(e.value).startswith(f"{run / kind / 'drafter' / 'model.safetensors'} is truncated or corrupt")
        assert "`metattt distill` writes it" in str(e.value)
        with pytest.raises(CorruptFileError, match="drafter/model.safetensors is truncated or corrupt"):
            TTTSpeculator.from_pretrained(workspace / "target", run / kind / "meta_lora")
    _truncate(run / "block" / "meta_lora" / "adapter_model.safetensors")
    with pytest.raises(CorruptFileError) as e:
        TTTSpeculator.from_pretrained(workspace / "target", run / "block" / "meta_lora",
                                      drafter_path=run / "block" / "intact")
    assert "meta_lora/adapter_model.safetensors is truncated or corrupt" in str(e.value)
    assert "`metattt meta-train` writes it" in str(e.value)


def test_check_safetensors_accepts_an_intact_file_and_names_a_padded_one(tmp_path):
    from safetensors.torch import save_file

    from metattt.errors import CorruptFileError, check_safetensors

    path = tmp_path / "serve" / "static" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"w": torch.ones(3, 4)}, str(path))
    check_safetensors(path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CorruptFileError, match="`metattt export` writes it"):
        check_safetensors(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match="shorter than the 8-byte header length"):
        check_safetensors(path)


# --- an explicitly given adapter must exist ------------------------------------------------------------
def test_an_explicit_meta_lora_path_must_hold_an_adapter(tmp_path):
    from metattt.config import DrafterConfig, LoraConfig, TargetConfig
    from metattt.loading import load_eval_stack

    (tmp_path / "empty").mkdir()
    for section in ("eval", "guided"):
        with pytest.raises(RecipeError, match=f"^{section}.meta_lora_path=.*empty: no peft adapter there"):
            load_eval_stack(tmp_path, TargetConfig(path=str(tmp_path / "nowhere")), DrafterConfig(), LoraConfig(),
                            None, str(tmp_path / "empty"), 0, section=section)


# --- CL-bench: evaluation only ---------------------------------------------------------------------------
def test_ttt_on_clbench_rows_is_refused_quoting_the_licence_unless_opted_in(tmp_path):
    from metattt.clbench import CLBENCH_RESTRICTION
    from metattt.config import GuidedConfig
    from metattt.eval.guided import load_guided_tasks

    assert CLBENCH_RESTRICTION == ("must not be used for training, fine-tuning, calibrating, distilling, adapting, "
                                   "or any form of parameter updating")
    row = {"messages": [{"role": "user", "content": "Rule: x is 3.\n\nWhat is x?"}], "rubrics": ["3"],
           "metadata": {"task_id": "a", "context_category": "rules"}}
    (tmp_path / "cl.jsonl").write_text(json.dumps(row) + "\n")
    ours = {"id": "o", "category": "rules", "context": "x is 3", "questions": [{"question": "x?", "answer": "3"}]}
    (tmp_path / "ours.jsonl").write_text(json.dumps(ours) + "\n")
    tasks = str(tmp_path / "cl.jsonl")
    for adapting in (dict(ttt_modes=[False, True], refine_rounds=0), dict(ttt_modes=[False], refine_rounds=1)):
        with pytest.raises(RecipeError) as e:
            load_guided_tasks(GuidedConfig(tasks=tasks, **adapting), 0)
        assert f'"{CLBENCH_RESTRICTION}"' in str(e.value)
        assert "guided.allow_ttt_on_clbench_rows_despite_licence=true" in str(e.value)
        opted_in = GuidedConfig(tasks=tasks, allow_ttt_on_clbench_rows_despite_licence=True, **adapting)
        assert len(load_guided_tasks(opted_in, 0)) == 1
    assert len(load_guided_tasks(GuidedConfig(tasks=tasks, ttt_modes=[False], refine_rounds=0), 0)) == 1
    assert len(load_guided_tasks(GuidedConfig(tasks=str(tmp_path / "ours.jsonl")), 0)) == 1  # not CL-bench


# --- build-target says what it will do before it does it -------------------------------------------------
def test_build_target_prints_its_plan_before_it_starts(monkeypatch, tmp_path, capsys):
    import metattt.tiny as tiny
    from metattt.config import CorpusConfig, TinyTargetConfig

    events = []
    monkeypatch.setattr(tiny, "ensure_corpus", lambda cfg, *a: events.append(("corpus", capsys.readouterr().err))
                        or tmp_path / "corpus")
    monkeypatch.setattr(tiny, "train_tokenizer", lambda *a, **k: "tok")
    monkeypatch.setattr(tiny, "corpus_files", lambda *a: [])
    monkeypatch.setattr(tiny, "count_tokens", lambda *a: None)
    monkeypatch.setattr(tiny, "train_target", lambda *a, **k: events.append(("train", "")))
    out = tmp_path / "my_target"
    tiny.build_target(out, CorpusConfig(dir=str(tmp_path / "corpus")), TinyTargetConfig(max_steps=123))
    assert [e[0] for e in events] == ["corpus", "train"]
    plan = events[0][1]  # printed before the corpus, the first thing built
    assert plan.startswith(f"metattt build-target: building the embedded target into {out}")
    assert "trained for 123 steps" in plan and "time: " in plan and "Ctrl-C stops it" in plan
    assert f"the corpus from this machine's Python installation, into {tmp_path / 'corpus'}" in plan
