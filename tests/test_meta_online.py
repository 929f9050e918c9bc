"""Meta-training for online updates (meta.ttt.online): the inner loop goes on past the context, chunk by
chunk, each continuation chunk scored with the fast weights from before training on it. The batched
meta step equals the per-task one, maml's meta-gradient matches central differences in float64, an
update sees only the tokens before its chunk's end, and meta-train exports the online settings.
(The closed forms of the first-order and Reptile meta-gradients: tests/test_meta_math.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import check_meta_gradient_by_central_differences, recipe_args
from test_meta_batched import CASES as BATCHED_CASES
from test_meta_batched import (
    S,
    _batch,
    _float64_problem,
    _lrs,
    _models,
    _run,
    assert_same_meta_step,
    run_both_with_a_nan_task,
)

import metattt.ttt.meta as meta_module
from metattt.config import MetaConfig, TTTOnlineConfig
from metattt.errors import RecipeError
from metattt.lit.meta import MetaTrainModule
from metattt.models.lora import lora_parameters
from metattt.ttt.tasks import TTTConfig, make_tasks, online_chunks

ONLINE = TTTOnlineConfig(chunk=6, steps=2, window=8, num_anchors=4, max_chunks=4)

# the batched-vs-per-task cases, plus prequential first order (online meta-training allows it)
CASES = {**BATCHED_CASES, "fomaml_prequential": dict(algorithm="fomaml", prequential=True, steps=3)}


@pytest.mark.parametrize("case", list(CASES))
def test_online_batched_meta_step_equals_per_task_with_a_non_finite_task_dropped_in_both(case):
    def walk_ragged(tasks):
        counts = [len(online_chunks(t, ONLINE, S)) for t in tasks]
        assert len(set(counts)) > 1 and min(counts) > 1  # rows walk different numbers of chunks

    (per_task, g_per_task), (rows, g_rows), phi, _ = run_both_with_a_nan_task(case, walk_ragged, online=ONLINE,
                                                                              **CASES[case])
    assert_same_meta_step(per_task, g_per_task, rows, g_rows)
    assert all(g.abs().max() > 1e-5 for g in g_rows[: len(phi)] if g is not None)
    for before, after in zip([rows.before[i] for i in (0, 1, 3)], rows.after):  # the same blocks, with φ and prequentially
        assert torch.equal(before.weights, after.weights)


@pytest.mark.parametrize("batched", [True, False])
def test_online_maml_meta_gradient_matches_finite_differences_float64(batched):
    model, batch, feats = _float64_problem()
    phi = lora_parameters(model)
    lrs = _lrs(model, torch.float64)
    wrt = {**phi, **{f"lr:{n}": t for n, t in lrs.items()}}
    online = TTTOnlineConfig(chunk=5, steps=1, window=8, num_anchors=4, max_chunks=3)

    def meta_loss() -> torch.Tensor:
        tasks = make_tasks(batch, feats, 10, 16, S, torch.Generator().manual_seed(3))
        return _run(model, phi, tasks, batched, lr=lrs, clip=0.5, steps=2, prequential=True, online=online).loss

    tasks = make_tasks(batch, feats, 10, 16, S, torch.Generator().manual_seed(3))
    assert all(len(online_chunks(t, online, S)) >= 2 for t in tasks)
    checked = check_meta_gradient_by_central_differences(
        meta_loss, wrt, lambda n: "layers.1.self_attn.v_proj" in n or ".fc." in n or n.startswith("lr:"),
        eps=1e-5, rtol=1e-5, per_tensor=1)
    assert checked >= 8


def test_one_chunk_covering_the_continuation_is_the_offline_objective():
    target, model = _models()
    batch = _batch(lengths=(36,), holes=False)
    feats = target(batch["input_ids"]).features
    phi = lora_parameters(model)
    whole = TTTOnlineConfig(chunk=1000, max_chunks=1)
    for algorithm in ("maml", "fomaml"):
        losses = []
        for online in (None, whole):
            tasks = make_tasks(batch, feats, 10, 20, S, torch.Generator().manual_seed(3))
            res = _run(model, phi, tasks, True, algorithm=algorithm, online=online)
            losses.append((res.loss, torch.autograd.grad(res.loss, list(phi.values()))))
        (offline, g_off), (online_loss, g_on) = losses
        torch.testing.assert_close(online_loss, offline, rtol=1e-6, atol=1e-7)
        for a, b in zip(g_on, g_off):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batched", [True, False])
def test_an_online_update_sees_only_the_tokens_before_its_chunk_end(batched, monkeypatch):
    """Changing row 0's tokens from the end of its first chunk on leaves its context steps and first
    update unchanged (they train on what comes before), and changes the second update."""
    target, model = _models()
    batch = _batch(holes=False)
    tasks = make_tasks(batch, target(batch["input_ids"]).features, 10, 20, S, torch.Generator().manual_seed(3))
    end = online_chunks(tasks[0], ONLINE, S)[0][1]
    changed = {k: v.clone() for k, v in batch.items()}
    n = int(batch["attention_mask"][0].sum()) - end
    changed["input_ids"][0, end:end + n] = (batch["input_ids"][0, end:end + n] + 5) % 20 + 2
    changed_tasks = make_tasks(changed, target(changed["input_ids"]).features, 10, 20, S,
                               torch.Generator().manual_seed(3))
    assert [t.context_len for t in tasks] == [t.context_len for t in changed_tasks]
    recorded = []
    real = meta_module.meta_objective

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        recorded.append([loss.detach() for loss in out.inner.losses])
        return out

    monkeypatch.setattr(meta_module, "meta_objective", recording)
    phi = lora_parameters(model)
    steps = 2
    for ts in (tasks, changed_tasks):
        _run(model, phi, ts, batched, algorithm="fomaml", steps=steps, online=ONLINE)
    a, b = recorded[0], recorded[len(recorded) // 2]  # task 0 (per task), or every row (batched)
    if batched:
        a, b = [x[0] for x in a], [x[0] for x in b]
    first_update = steps + ONLINE.steps  # context steps and the update after chunk 0
    torch.testing.assert_close(torch.stack(a[:first_update]), torch.stack(b[:first_update]), rtol=0, atol=1e-6)
    assert not torch.allclose(torch.stack(a[first_update:]), torch.stack(b[first_update:]))


def test_online_settings_are_checked_where_they_are_read(tmp_path):
    with pytest.raises(RecipeError, match=r"meta\.ttt\.online\.chunk"):
        MetaConfig(ttt=TTTConfig(online=TTTOnlineConfig(chunk=-1)))
    with pytest.raises(RecipeError, match=r"meta\.ttt\.online\.steps"):
        TTTConfig(online=TTTOnlineConfig(chunk=4, steps=0))
    target, model = _models()
    with pytest.raises(RecipeError, match=r"meta\.ttt\.online\.window=3"):
        MetaTrainModule(target, model, MetaConfig(ttt=TTTConfig(online=TTTOnlineConfig(chunk=4, window=3))))
    # a ttt_config.json written before online meta-training: prefill TTT only
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"steps": 2, "lr": 0.1, "objective": {"block": 1.0}}))
    assert TTTConfig.load(old).online == TTTOnlineConfig() and not TTTConfig.load(old).online.enabled
    new = tmp_path / "new.json"
    TTTConfig(online=ONLINE).save(new)
    assert TTTConfig.load(new).online == ONLINE
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"online": {"chunk": 4, "window": 0}}))
    with pytest.raises(RecipeError, match=r"bad\.json: online\.window"):
        TTTConfig.load(bad)


@pytest.mark.e2e
def test_meta_train_cli_with_online_updates_exports_the_online_settings(workspace, tmp_path):
    from metattt.cli import main
    from metattt.export.meta_lora import load_ttt_adapter
    from metattt.models.drafter import BlockDrafter

    main(["meta-train", *recipe_args(
        workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=1", "--meta.max_steps=2",
        "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=8",
        "--meta.ttt.steps=2", "--meta.val_check_interval=2", "--meta.ttt.online.chunk=4",
        "--meta.ttt.online.window=8", "--meta.ttt.online.num_anchors=4", "--meta.ttt.online.max_chunks=3",
        "--data.feature_cache=null",  # the tiny recipe's cache is not in the test workspace
    )])
    lora_dir = tmp_path / "t" / "meta_lora"
    written = json.loads((lora_dir / "ttt_config.json").read_text())
    assert written["online"] == {"chunk": 4, "steps": 1, "window": 8, "num_anchors": 4, "max_chunks": 3}
    drafter = BlockDrafter.from_pretrained(tmp_path / "t" / "drafter")
    _, ttt, _ = load_ttt_adapter(drafter, lora_dir)
    assert ttt.online == TTTOnlineConfig(chunk=4, steps=1, window=8, num_anchors=4, max_chunks=3)
