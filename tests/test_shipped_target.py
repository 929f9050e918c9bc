"""The embedded target shipped in data/tiny_target: it loads like a downloaded checkpoint, its
weights match its report, and a changed or missing copy is refused with a message naming `make target`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from metattt.tiny import verify_shipped_target
from metattt.tiny.train import REPORT_NAME, file_sha256, heldout_loss

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "tiny_target"


def test_shipped_target_loads_like_a_checkpoint_and_matches_its_report():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((SHIPPED / REPORT_NAME).read_text())
    assert file_sha256(SHIPPED / "model.safetensors") == report["weights_sha256"]
    verify_shipped_target(SHIPPED)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    assert tok.mask_token_id == 1 and len(tok) == model.config.vocab_size
    assert report["steps"] == report["config"]["max_steps"]
    assert report["config"]["seq_len"] >= 1024
    assert set(report["heldout_loss"]) >= {"python", "c", "prose", "new_to_both"}
    # the shipped report's held-out loss is the shipped weights' loss (a slice of it, recomputed here)
    ids = tok("def add(a, b):\n    return a + b\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = heldout_loss(model, np.asarray(ids * 8), 32, 256)
    assert 0 < loss < 8


def test_a_changed_shipped_target_is_refused_naming_make_target(tmp_path):
    copy = tmp_path / "tiny_target"
    shutil.copytree(SHIPPED, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(FileNotFoundError, match="make target"):
        verify_shipped_target(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="make target"):
        verify_shipped_target(copy)


