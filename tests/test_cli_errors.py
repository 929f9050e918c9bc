"""Bad input through the CLI, as a user meets it (issue 14): `python -m metattt <stage> ...` in a
subprocess exits with code 2 and one line `metattt: error: ...` naming the recipe key or the file,
shows no traceback (unless --debug), and leaves the output folder as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import recipe_args
from launch import run_metattt

from metattt.cli import entry, is_bad_input
from metattt.errors import RecipeError


@pytest.fixture(scope="module")
def run_dir(workspace, tmp_path_factory) -> Path:
    """An output root whose run `t` holds a drafter (untrained) and a meta-learned adapter, as
    distill and meta-train leave them; and a few bad inputs beside it."""
    from metattt.config import DrafterConfig, TargetConfig, TTTConfig
    from metattt.export.meta_lora import export_meta_lora
    from metattt.loading import build_drafter, load_target, load_tokenizer
    from metattt.models.lora import add_lora

    root = tmp_path_factory.mktemp("cli_errors")
    run = root / "out" / "t"
    target = load_target(TargetConfig(path=str(workspace / "target")), 2)
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(num_hidden_layers=2, block_size=4), target,
                            load_tokenizer(workspace / "target"))
    drafter.save_pretrained(run / "drafter")
    model = add_lora(drafter, r=2, alpha=4)
    export_meta_lora(model, run / "meta_lora", TTTConfig(steps=1, lr=0.3, learned_lrs={"a": 0.3}), run / "drafter")

    # beside the run folder: what the cases point at
    bad = root / "inputs"
    shutil.copytree(run / "drafter", bad / "truncated" / "drafter")
    weights = bad / "truncated" / "drafter" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    shutil.copytree(run / "meta_lora", bad / "negative_lr")
    ttt = json.loads((bad / "negative_lr" / "ttt_config.json").read_text())
    ttt["learned_lrs"] = {"a": -0.3}
    (bad / "negative_lr" / "ttt_config.json").write_text(json.dumps(ttt))
    (bad / "no_adapter").mkdir()
    lines = [json.dumps({"text": "def f(x):\n    return x\n" * 4})] * 2
    (bad / "bad.jsonl").write_text("\n".join([*lines, '{"text": "unclosed', *lines]) + "\n")
    (bad / "tiny.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    (bad / "clbench.jsonl").write_text(json.dumps({
        "messages": [{"role": "system", "content": "Answer from the context."},
                     {"role": "user", "content": "Rule: blorks are green.\n\nWhat colour are blorks?"}],
        "rubrics": ["Says green."], "metadata": {"task_id": "t0", "context_category": "rules"}}) + "\n")
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


IN = "{inputs}"  # replaced by the inputs folder of `run_dir`
CASES = {  # id: (stage, extra args, what the message must name)
    "distill.lr negative": ("distill", ["--distill.lr=-0.001"], ["distill.lr=-0.001", "> 0"]),
    "meta.lr negative": ("meta-train", ["--meta.lr=-0.001"], ["meta.lr=-0.001"]),
    "inner lr negative": ("meta-train", ["--meta.ttt.lr=-0.3"], ["meta.ttt.lr=-0.3", "ascends the loss"]),
    "inner lr, old key": ("meta-train", ["--meta.inner_lr=-0.3"], ["meta.inner_lr was renamed", "meta.ttt.lr"]),
    "unknown key": ("distill", ["--distill.lrr=0.1"], ["--distill.lrr"]),
    "wrong type": ("distill", ["--distill.lr=fast"], ["distill.lr", "fast"]),
    "relative target missing": ("distill", ["--target.path=nonexistent/target"],
                                ["target.path=nonexistent/target", "no local folder `nonexistent/target` "
                                 "(and no network to try it as a hub id)"]),
    "absolute target missing": ("eval", [f"--target.path={IN}/nowhere"], ["target.path=", "no config.json"]),
    "repeated layer taps": ("distill", ["--target.layer_ids=[1, 1]"], ["target.layer_ids", "repeat"]),
    "too few layers for the taps": ("distill", ["--drafter.num_hidden_layers=5"],
                                    ["target.layer_ids", "this target has 4"]),
    "data file missing": ("distill", [f"--data.train_files={IN}/none.jsonl"], ["data.train_files", "none.jsonl"]),
    "invalid jsonl line": ("distill", [f"--data.train_files={IN}/bad.jsonl"], ["bad.jsonl: line 3: invalid JSON"]),
    "no sequences": ("distill", [f"--data.train_files={IN}/tiny.jsonl", f"--data.val_files={IN}/tiny.jsonl"],
                     ["no sequences", "data.max_length=48"]),
    "truncated drafter, eval": ("eval", [f"--eval.drafter_path={IN}/truncated/drafter"],
                                ["truncated/drafter/model.safetensors is truncated or corrupt", "metattt distill"]),
    "truncated drafter, meta-train": ("meta-train", [f"--meta.drafter_path={IN}/truncated/drafter"],
                                      ["model.safetensors is truncated or corrupt", "metattt distill"]),
    "explicit adapter missing": ("eval", [f"--eval.meta_lora_path={IN}/no_adapter"],
                                 ["eval.meta_lora_path=", "no_adapter", "adapter_config.json"]),
    "exported negative inner lr": ("eval", [f"--eval.meta_lora_path={IN}/negative_lr"],
                                   ["negative_lr/ttt_config.json", "learned_lrs['a']=-0.3"]),
    "eval split missing": ("eval", [f"--eval.splits={{a: {IN}/none.jsonl}}"], ["eval.splits.a", "none.jsonl"]),
    "TTT on CL-bench rows": ("guided-eval", [f"--guided.tasks={IN}/clbench.jsonl", "--guided.judge=rule"],
                             ["CL-bench", "must not be used for training, fine-tuning, calibrating, distilling, "
                              "adapting, or any form of parameter updating",
                              "guided.allow_ttt_on_clbench_rows_despite_licence"]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(case, workspace, run_dir):
    stage, extra, names = CASES[case]
    inputs = run_dir / "inputs"
    extra = [a.replace(IN, str(inputs)) for a in extra]
    before = _snapshot(run_dir)
    proc = run_metattt(stage, recipe_args(workspace, f"--run.output_root={run_dir / 'out'}", *extra), check=False,
                       timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("metattt: error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert name.replace("{inputs}", str(inputs)) in errors[0], errors[0]
    assert _snapshot(run_dir) == before  # nothing written, nothing touched


def test_no_sequences_names_only_the_reason_that_happened(workspace, run_dir, capsys):
    """Records that do not fill one packed chunk: the packing sentence, not the block-size one."""
    args = recipe_args(workspace, f"--run.output_root={run_dir / 'out'}",
                       f"--data.train_files={run_dir / 'inputs' / 'tiny.jsonl'}",
                       f"--data.val_files={run_dir / 'inputs' / 'tiny.jsonl'}")
    assert entry(["distill", *args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    reasons = line.split(" record): ", 1)[1]
    assert reasons.startswith("packing (data.pack=true)") and "block_size" not in reasons, line
    assert "shorter than" not in reasons and "no trained token" not in reasons, line


@pytest.mark.e2e
def test_debug_shows_the_traceback(workspace, run_dir):
    args = recipe_args(workspace, f"--run.output_root={run_dir / 'out'}", "--distill.lr=-0.001", "--debug")
    proc = run_metattt("distill", args, check=False, timeout=180)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RecipeError: distill.lr=-0.001" in proc.stderr


def test_entry_reports_bad_input_in_one_line_and_leaves_bugs_their_traceback(monkeypatch, capsys):
    import metattt.cli as cli

    def fail_with(e: Exception):
        def main(argv):
            raise e
        return main

    monkeypatch.setattr(cli, "main", fail_with(RecipeError("eval.top_p=2: must be in (0, 1]\n(second line)")))
    assert entry(["eval"]) == 2
    assert capsys.readouterr().err == "metattt: error: eval.top_p=2: must be in (0, 1] (second line) " \
                                      "(--debug shows the traceback)\n"
    monkeypatch.setattr(cli, "main", fail_with(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        entry(["eval"])
    monkeypatch.setenv("METATTT_DEBUG", "1")
    monkeypatch.setattr(cli, "main", fail_with(RecipeError("bad")))
    with pytest.raises(RecipeError):
        entry(["eval"])


def test_what_counts_as_bad_input():
    def raised(f) -> Exception:
        try:
            f()
        except Exception as e:
            return e
        raise AssertionError("did not raise")

    from metattt.config import DataConfig

    assert is_bad_input(raised(lambda: DataConfig(max_length=0)))  # metattt's own ValueError
    assert is_bad_input(raised(lambda: open("/nonexistent/file")))  # a file the user named
    assert not is_bad_input(raised(lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=-1.0)))
    assert not is_bad_input(RuntimeError("not input"))
