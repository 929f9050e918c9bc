"""Tests of the tiny embedded target (metattt.tiny): corpus, tokenizer, training, reuse.

Everything runs on a small, fixed subset of the standard library and a minuscule model, so the
module takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from metattt import tiny
from metattt.tiny import SHIFTED_PACKAGES, TinyTargetConfig

MAX_FILES = 40  # per domain: enough for every split to be non-empty, small enough to be fast
VOCAB = 512


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _top_package(rel: str) -> str | None:
    return rel.split("/", 1)[0] if "/" in rel else None


def _minuscule(**overrides) -> TinyTargetConfig:
    """A target that trains in a few seconds (the shapes tests care about, none of the quality)."""
    cfg = dict(
        vocab_size=VOCAB,
        corpus_max_files=MAX_FILES,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        seq_len=64,
        batch_size=8,
        max_steps=20,
        time_budget_s=None,
        lr=1e-2,
        warmup_frac=0.1,
        eval_max_tokens=2048,
        gen_prompts=2,
        gen_prompt_len=32,
        gen_new_tokens=16,
    )
    cfg.update(overrides)
    return TinyTargetConfig(**cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    tiny.build_corpus(out, seed=0, max_files=MAX_FILES)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tiny.train_tokenizer(corpus / "train.jsonl", out, vocab_size=VOCAB)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)  # reloaded: what every later stage sees


# ------------------------------------------------------------------------------------------ corpus


def test_build_corpus_splits_are_disjoint_and_shifted_is_held_out(corpus):
    splits = {name: _records(corpus / f"{name}.jsonl") for name in tiny.SPLITS}
    for name, recs in splits.items():
        assert recs, f"{name} is empty"
        assert all(isinstance(r["text"], str) and r["text"].strip() for r in recs)
    paths = {name: [r["path"] for r in recs] for name, recs in splits.items()}
    assert all(len(set(p)) == len(p) for p in paths.values()), "a file appears twice in a split"
    assert not set(paths["train"]) & set(paths["validation"])
    assert not set(paths["train"]) & set(paths["shifted"])
    assert not set(paths["validation"]) & set(paths["shifted"])
    # The shifted domain is exactly the held-out packages, and the target never trains on them.
    assert all(_top_package(p) in SHIFTED_PACKAGES for p in paths["shifted"])
    assert not any(_top_package(p) in SHIFTED_PACKAGES for p in paths["train"] + paths["validation"])
    everything = [p for ps in paths.values() for p in ps]
    skipped = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not any(skipped & set(p.split("/")[:-1]) for p in everything)


def test_build_corpus_is_deterministic(corpus, tmp_path):
    counts = tiny.build_corpus(tmp_path, seed=0, max_files=MAX_FILES)
    for name in tiny.SPLITS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (corpus / f"{name}.jsonl").read_bytes()
        assert counts[name] == len(_records(tmp_path / f"{name}.jsonl"))
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".jsonl"], "temp files left behind"


# --------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    code = 'class Foo(Bar):\n    """Doc."""\n\n    def f(self, x=1):\n\t\treturn {"é": x ** 2}  # → π\n'
    ids = tokenizer.encode(code, add_special_tokens=False)
    assert tokenizer.decode(ids) == code  # byte-level: lossless, no unknown tokens
    assert len(tokenizer) == VOCAB

    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    assert isinstance(mask_id, int) and 0 <= mask_id < VOCAB
    assert tokenizer.mask_token_id == mask_id
    assert "<|mask|>" in tokenizer.all_special_tokens
    for tok in tiny.SPECIAL_TOKENS:  # each special token is one id, never split
        assert tokenizer.encode(tok, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(tok)]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.encode("x", add_special_tokens=True) == tokenizer.encode("x", add_special_tokens=False)


def test_tokenizer_mask_token_survives_a_second_save(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny._save_tokenizer(tokenizer, tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.convert_tokens_to_ids("<|mask|>") == tokenizer.convert_tokens_to_ids("<|mask|>")
    assert again.chat_template == tokenizer.chat_template


def test_chat_template_assistant_mask_covers_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Add one to x."},
        {"role": "assistant", "content": "def f(x):\n    return x + 1"},
        {"role": "user", "content": "Now two."},
        {"role": "assistant", "content": "def g(x):\n    return x + 2"},
    ]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += tokenizer.encode(m["content"], add_special_tokens=False) + [im_end]
    assert [i for i, keep in zip(ids, mask) if keep] == expected
    # Two separate spans (one per assistant turn), each ending with <|im_end|>.
    starts = [k for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1])]
    ends = [k for k in range(len(mask)) if mask[k] and (k == len(mask) - 1 or not mask[k + 1])]
    assert len(starts) == 2 and all(ids[k] == im_end for k in ends)

    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou write Python.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>user\nAdd one to x.<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------ target


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TinyTargetConfig(lr=1.0, warmup_frac=0.25, min_lr_ratio=0.1)
    lrs = [tiny._lr_factor(p, cfg) for p in (0.05, 0.125, 0.25, 0.6, 1.0)]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4]
    assert lrs[1] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.125))))
    assert lrs[4] == pytest.approx(0.1)


def test_progress_ends_on_time_on_steps_or_at_the_step_floor():
    cfg = TinyTargetConfig(max_steps=1000, time_budget_s=100.0)
    assert tiny._progress(10, 50.0, cfg) == pytest.approx(0.5)  # slow machine: the clock decides
    assert tiny._progress(500, 10.0, cfg) == pytest.approx(0.5)  # fast machine: the step cap decides
    assert tiny._progress(10, 100.0, cfg) >= 1.0
    floored = TinyTargetConfig(max_steps=1000, time_budget_s=100.0, min_steps=200)
    assert tiny._progress(10, 100.0, floored) == pytest.approx(0.05)  # budget spent, floor not reached
    assert tiny._progress(200, 150.0, floored) >= 1.0
    strict = TinyTargetConfig(max_steps=30, time_budget_s=None)
    assert tiny._progress(15, 1e9, strict) == pytest.approx(0.5)


def test_thread_tuner_switches_to_the_faster_thread_count():
    before = torch.get_num_threads()
    try:
        tuner = tiny._ThreadTuner(2, enabled=True, interval_s=0.0, probe_steps=2)
        assert torch.get_num_threads() == 2
        for t in (1.0, 1.0):  # two steps at 2 threads, then a probe starts
            tuner.record(t)
        assert torch.get_num_threads() == 1
        for t in (0.3, 0.3):  # the probe at 1 thread is faster: keep it
            tuner.record(t)
        assert tuner.current == 1 and torch.get_num_threads() == 1
        assert tuner.steps_at == {2: 2, 1: 2}
        fixed = tiny._ThreadTuner(2, enabled=False, interval_s=0.0, probe_steps=2)
        for t in (1.0, 1.0, 1.0):
            fixed.record(t)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_distinct_n():
    assert tiny.distinct_n([1, 2, 3, 4], 2) == 1.0
    assert tiny.distinct_n([7] * 10, 2) == pytest.approx(1 / 9)
    assert tiny.distinct_n([1], 2) == 0.0


def test_train_target_learns_saves_and_reloads(corpus, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _minuscule()
    out = tmp_path / "target"
    report = tiny.train_target(corpus, tokenizer_dir, out, cfg)

    assert report["steps"] == cfg.max_steps
    curve = [loss for _, loss in report["loss_curve"]]
    assert len(curve) == cfg.max_steps  # one point per step at this size
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.5, curve
    assert report["val_loss"] < math.log(VOCAB) and report["shifted_loss"] < math.log(VOCAB)
    for key in ("params", "train_time_s", "wall_time_s", "train_loss", "distinct_2", "distinct_4"):
        assert key in report
    assert json.loads((out / tiny.REPORT_NAME).read_text())["val_loss"] == report["val_loss"]
    # Published atomically: no temp folder left beside it; token ids cached in the parent's scratch.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "target"]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3

    # Loads like any real checkpoint, and is the model that was evaluated: same held-out loss.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (out / "model.safetensors").exists()
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    val_ids = tiny._cached_token_ids(
        corpus / "validation.jsonl", AutoTokenizer.from_pretrained(out), tmp_path / "cache"
    )
    with torch.no_grad():
        reloaded = tiny._heldout_loss(model, val_ids, cfg.seq_len, cfg.eval_max_tokens)
    assert reloaded == pytest.approx(report["val_loss"], abs=1e-5)
    # And two loads give bitwise identical logits (no random init left in the checkpoint).
    probe = torch.from_numpy(val_ids[:48].astype("int64"))[None]
    twin = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=probe).logits, twin(input_ids=probe).logits)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|mask|>") == 1


def test_train_target_crash_leaves_nothing_half_written(corpus, tokenizer_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_save_tokenizer", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.train_target(corpus, tokenizer_dir, tmp_path / "target", _minuscule(max_steps=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_ensure_tiny_target_builds_once_then_reuses(tmp_path, monkeypatch):
    cfg = _minuscule()
    target = tiny.ensure_tiny_target(tmp_path, cfg)
    assert target == tmp_path / "target"
    assert (target / "config.json").exists() and (target / tiny.REPORT_NAME).exists()
    assert all((tmp_path / "corpus" / f"{s}.jsonl").exists() for s in tiny.SPLITS)
    weights = target / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    calls: list[str] = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append(name)
            return {}

        return fake

    for name in ("build_corpus", "train_tokenizer", "train_target"):
        monkeypatch.setattr(tiny, name, record(name))
    assert tiny.ensure_tiny_target(tmp_path, cfg) == target
    assert calls == [] and weights.stat().st_mtime_ns == mtime

    tiny.ensure_tiny_target(tmp_path, cfg, force=True)
    assert calls == ["build_corpus", "train_tokenizer", "train_target"]
