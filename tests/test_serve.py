"""The Python serving entry point: load what meta-train exported, adapt per request, decode losslessly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import recipe_args

from metattt.cli import main
from metattt.config import EvalConfig
from metattt.eval.speculative import condition_plan, evaluate_prompt
from metattt.serve import TTTSpeculator
from metattt.spec.decode import target_generate


@pytest.fixture(scope="module")
def exported(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve")
    main(["meta-train", *recipe_args(
        workspace, f"--run.output_root={out}", "--distill.max_steps=2", "--meta.max_steps=1",
        "--meta.context_min=12", "--meta.context_max=24", "--meta.ttt.num_anchors=4", "--meta.outer_anchors=4",
        "--meta.ttt.steps=2", "--meta.val_check_interval=1")])
    return out / "t"


def _prompts(n: int, length: int = 24) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 200, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.e2e
def test_generate_adapts_per_request_and_matches_eval(workspace, exported):
    spec = TTTSpeculator.from_pretrained(workspace / "target", exported / "meta_lora")
    assert spec.ttt.steps == 2
    a, b = _prompts(2)
    first = spec.generate(a, max_new_tokens=16)
    assert first.tokens == target_generate(spec.target, torch.tensor([a]), 16, spec.target.config.eos_token_id).tokens
    assert first.adapt_time > 0
    spec.generate(b, max_new_tokens=16)
    again = spec.generate(a, max_new_tokens=16)
    assert (again.tokens, again.accepted) == (first.tokens, first.accepted)  # nothing carried over from b
    with torch.inference_mode():  # as serving code often runs; TTT still gets its gradients
        served = spec.generate(torch.tensor(a), max_new_tokens=16)
    assert (served.tokens, served.accepted) == (first.tokens, first.accepted)
    static = spec.generate(a, max_new_tokens=16, adapt=False)
    assert static.adapt_time == 0 and static.tokens == first.tokens

    # the same request as `metattt eval` runs it (ttt_meta condition, same seed)
    cfg = EvalConfig(conditions=["ttt_meta"], max_new_tokens=16)
    [record] = evaluate_prompt(spec.target, spec.model, a, condition_plan(cfg, spec.ttt),
                               {"meta": spec.init}, cfg, spec.target.config.eos_token_id, seed=0)
    assert (record["tokens"], record["accepted"]) == (first.tokens, first.accepted)


@pytest.mark.e2e
def test_readme_python_example_runs(workspace, exported):
    text = Path("README.md").read_text()
    block = re.search(r"### From Python\n.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a '### From Python' section with a python block"
    code = block.group(1)
    code = code.replace('"data/tiny_target"', repr(str(workspace / "target")))
    code = code.replace('"checkpoints/tiny/meta_lora"', repr(str(exported / "meta_lora")))
    code = code.replace('"checkpoints/tiny/tokenizer"', repr(str(workspace / "target")))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.tokens and out.tau >= 1.0
    # the online and batched examples run in the same session, as a reader would paste them
    for title in ("Online TTT while decoding", "Batched requests"):
        later = re.search(rf"### {title}\n.*?```python\n(.*?)```", text, re.S)
        assert later, f"README has a '### {title}' section with a python block"
        exec(compile(later.group(1).replace("max_new_tokens=512", "max_new_tokens=32"), "README.md", "exec"), scope)
    assert scope["out"].online_time > 0 and len(scope["outs"]) == 2
    assert all(o.tokens for o in scope["outs"])


@pytest.mark.e2e
def test_drafter_found_beside_the_adapter_from_another_working_directory(workspace, exported, tmp_path,
                                                                          monkeypatch):
    import json
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(exported / "meta_lora", moved / "meta_lora")
    shutil.copytree(exported / "drafter", moved / "drafter")
    cfg = json.loads((moved / "meta_lora" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "checkpoints/t/drafter"  # relative to wherever meta-train ran
    (moved / "meta_lora" / "adapter_config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    spec = TTTSpeculator.from_pretrained(workspace / "target", moved / "meta_lora")
    assert spec.generate(_prompts(1)[0], max_new_tokens=4).tokens
    (moved / "drafter" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="drafter_path="):
        TTTSpeculator.from_pretrained(workspace / "target", moved / "meta_lora")


def test_missing_adapter_says_what_to_run(tmp_path, workspace):
    with pytest.raises(FileNotFoundError, match="meta-train"):
        TTTSpeculator.from_pretrained(workspace / "target", tmp_path / "nothing")


@pytest.mark.e2e
def test_generate_online_is_lossless_and_starts_afresh_per_request(workspace, exported):
    from metattt.config import OnlineConfig

    spec = TTTSpeculator.from_pretrained(workspace / "target", exported / "meta_lora")
    eos = spec.target.config.eos_token_id
    online = OnlineConfig(every=1, steps=1, window=16, num_anchors=4)
    a, b = _prompts(2)
    first = spec.generate(a, max_new_tokens=20, online=online)
    assert first.tokens == target_generate(spec.target, torch.tensor([a]), 20, eos).tokens
    assert first.online_time > 0 and first.online_updates > 0
    spec.generate(b, max_new_tokens=20, online=online)
    again = spec.generate(a, max_new_tokens=20, online=online)
    assert again.accepted == first.accepted  # the updates of b's request did not carry over
