
"""The TTT sweep command on a tiny config: it runs every point and writes its table and plot."""

from __future__ import annotations

import json

import pytest
from conftest import recipe_args

from metattt.cli import main


@pytest.mark.e2e
def test_sweep_command_writes_its_table(workspace, tmp_path):
    args = recipe_args(
        workspace, f"--run.output_root={tmp_path}", "--distill.max_steps=2", "--meta.max_steps=1",
        "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=4",
        "--meta.ttt.steps=2", "--meta.val_check_interval=1",
        f"--eval.splits={{in_domain: {workspace / 'corpus' / 'validation.jsonl'}, "
        f"drafter_shifted: {workspace / 'corpus' / 'train.jsonl'}}}", "--eval.prompt_len=20",
        "--sweep.num_prompts=2", "--sweep.max_new_tokens=6", "--sweep.steps=[1, 2]", "--sweep.lrs=[0.1]",
        "--sweep.ranks=[4, 8]", "--sweep.placements=[fc, fc+qkv]", "--sweep.default_steps=1",
    )
    main(["meta-train", *args])
    main(["sweep", *args])
    out = tmp_path / "t" / "sweep"
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    # recipe layout r8 fc+qkv: static, meta_static, 2 steps x (1 lr zero + (1 lr + learned) meta) = 8;
    # r4 fc+qkv (zero, default point) and r8 fc (zero) = 1 each; per split
    assert len(rows) == 2 * 10
    assert {r["arm"] for r in rows} == {"r8 fc+qkv", "r4 fc+qkv", "r8 fc"}
    for r in rows:
        assert 1.0 <= r["tau"] <= 4.0 and r["n"] == 2 and r["lossless"]
        d = r["delta_vs_static"]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
        if r["condition"] == "static":
            assert d["mean"] == 0.0
    conds = {r["condition"] for r in rows if r["arm"] == "r8 fc+qkv"}
    assert {"ttt_meta@steps=2,lr=learned", "ttt_zero@steps=1,lr=0.1", "meta_static"} <= conds
    md = (out / "sweep.md").read_text()
    assert "| drafter_shifted | r4 fc+qkv | ttt_zero@steps=1,lr=0.1 |" in md
    assert (out / "sweep.png").stat().st_size > 1000
