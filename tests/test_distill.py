"""Distillation end to end through the CLI, resume, export, recipes and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import recipe_args

from metattt.cli import main, parse_recipe
from metattt.models.drafter import BlockDrafter
from metattt.models.target import FrozenTarget

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def _outputs(drafter: BlockDrafter, target: FrozenTarget) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(4, 200, (1, 20))
    anchors = torch.tensor([[5, 11]])
    blocks = torch.full((1, 2, 4), drafter.config.mask_token_id)
    blocks[:, :, 0] = ids.gather(1, anchors)
    return drafter(blocks, anchors, context_features=target(ids).features)


@pytest.mark.e2e
def test_two_step_distill_checkpoints_resumes_and_exports(workspace):
    out = workspace / "out" / "t"
    main(["distill", *recipe_args(workspace, "--distill.max_steps=2", "--distill.checkpoint_every_n_steps=1",
                                  "--distill.val_check_interval=2")])
    ckpts = out / "distill" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    state = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert not any(k.startswith("target.") for k in state["state_dict"]), "frozen target leaked into checkpoint"
    assert (out / "drafter" / "config.json").is_file() and (out / "drafter" / "model.safetensors").is_file()

    # resume: two more steps continue from step 2, not from scratch
    main(["distill", *recipe_args(workspace, "--distill.max_steps=4", "--distill.checkpoint_every_n_steps=1",
                                  "--distill.val_check_interval=2")])
    state = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4

    # the export equals the checkpoint's weights, and reloads with identical outputs
    drafter = BlockDrafter.from_pretrained(out / "drafter")
    for name, tensor in drafter.state_dict().items():
        torch.testing.assert_close(tensor, state["state_dict"][f"drafter.{name}"], rtol=0, atol=0)
    target = FrozenTarget.from_pretrained(workspace / "target", layer_ids=drafter.config.target_layer_ids)
    drafter.attach_target(target)
    native = BlockDrafter(drafter.config)
    native.load_state_dict({k[len("drafter."):]: v for k, v in state["state_dict"].items() if k.startswith("drafter.")})
    native.attach_target(target)
    torch.testing.assert_close(_outputs(drafter, target), _outputs(native, target), rtol=0, atol=0)
    assert (out / "distill" / "tb").is_dir()


@pytest.mark.e2e
def test_progress_lines_without_a_terminal(workspace, tmp_path, caplog):
    """Under pytest stdout is not a terminal, as in a Slurm log: progress comes as log lines."""
    args = recipe_args(workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=3",
                       "--distill.val_check_interval=3", "--trainer.enable_progress_bar=true",
                       "--trainer.progress_every_s=0")
    with caplog.at_level("INFO", logger="metattt"):
        main(["distill", *args])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distill ")]
    steps = [m for m in lines if re.match(r"distill step \d+/3 \(\d+%\) \| .*train/loss [\d.]+ .*\| [\d.]+ it/s "
                                          r"\| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", m)]
    assert [int(m.split()[2].split("/")[0]) for m in steps] == [1, 2, 3, 3], lines  # every step, then the end
    assert any(re.match(r"distill validation: \d+ batches \| .*val/loss [\d.]+", m) for m in lines), lines


@pytest.mark.e2e
def test_distill_with_kl_to_the_target(workspace, tmp_path):
    args = recipe_args(workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=2", "--distill.kl_weight=0.5",
                       "--distill.val_check_interval=2")
    main(["distill", *args])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = (tmp_path / "t" / "distill" / "tb").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/ce", "train/kl", "val/ce", "val/kl"} <= tags
    [(kl,)] = [(e.value,) for e in acc.Scalars("val/kl")]
    [(ce,)] = [(e.value,) for e in acc.Scalars("val/ce")]
    [(loss,)] = [(e.value,) for e in acc.Scalars("val/loss")]
    assert kl > 0 and abs(loss - (0.5 * ce + 0.5 * kl)) < 1e-4
    (tmp_path / "cache").mkdir()
    with pytest.raises(ValueError, match="feature cache does not hold"):
        main(["distill", *args, f"--data.feature_cache={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match="kl_weight must be in"):
        main(["distill", *recipe_args(workspace, f"--run.output_root={tmp_path}", "--distill.kl_weight=2")])


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses(recipe):
    stage, r = parse_recipe(["distill", "--config", str(recipe)])
    assert stage == "distill"
    assert r.drafter.block_size >= 2 and r.run.name


@pytest.mark.e2e
def test_missing_target_path_fails_before_writing(tmp_path, workspace):
    args = recipe_args(workspace, f"--target.path={tmp_path / 'missing'}", f"--run.output_root={tmp_path / 'o'}")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["distill", *args])
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_layer_id_out_of_range(tmp_path, workspace):
    with pytest.raises(ValueError, match="out of range"):
        main(["distill", *recipe_args(workspace, "--target.layer_ids=[1, 9]", f"--run.output_root={tmp_path}")])
    assert not any(tmp_path.iterdir())


@pytest.mark.e2e
def test_empty_dataset(tmp_path, workspace):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no sequences|empty"):
        main(["distill", *recipe_args(workspace, f"--data.train_files={empty}", f"--run.output_root={tmp_path / 'o'}")])
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_sequences_too_short_for_a_block(tmp_path, workspace):
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(json.dumps({"text": "x"}) for _ in range(4)) + "\n")
    with pytest.raises(ValueError, match="block_size \\+ 1"):
        main(["distill", *recipe_args(workspace, f"--data.train_files={short}", "--data.pack=false",
                                      f"--run.output_root={tmp_path / 'o'}")])
    with pytest.raises(ValueError, match="cannot hold one block"):
        main(["distill", *recipe_args(workspace, "--data.max_length=3", f"--run.output_root={tmp_path / 'o'}")])
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_tokenizer_without_mask_token(tmp_path, workspace):
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="no mask token"):
        main(["distill", *recipe_args(workspace, "--drafter.mask_token=<|nope|>", f"--run.output_root={tmp_path / 'o'}")])
    assert AutoTokenizer.from_pretrained(workspace / "target").convert_tokens_to_ids("<|mask|>") == 1
    assert not (tmp_path / "o").exists()
