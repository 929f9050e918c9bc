"""Train the embedded target: a small Qwen3-style LM on every domain of the corpus, for a fixed
number of steps, read top to bottom like nanoGPT's ``train.py``.

The target plays the part of a downloaded Qwen3: it is trained once, shipped in ``data/``, and
every stage loads it like any transformers checkpoint. ``make target`` rebuilds it.

Why these defaults (metattt.config.TinyTargetConfig): see its docstring for the sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metattt.atomic import atomic_dir, atomic_file, atomic_torch_save
from metattt.config import TinyTargetConfig
from metattt.data.tokenizer import load_tokenizer
from metattt.stats import distinct_n
from metattt.tiny.corpus import corpus_files, read_texts
from metattt.tiny.tokenizer import save_tokenizer

log = logging.getLogger("metattt.tiny")

REPORT_NAME = "tiny_target_report.json"
STATE_NAME = "train_state.pt"


# --------------------------------------------------------------------------------------------------
# Data: documents -> one token stream (each document followed by EOS) -> windows
# --------------------------------------------------------------------------------------------------


def tokenize_documents(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by EOS, so the target learns
    to stop where a text ends."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(ids, dtype=dtype)


def cached_token_ids(jsonl: Path, tokenizer: Any, cache_dir: Path) -> np.ndarray:
    """:func:`tokenize_documents` of a jsonl file, cached as .npy keyed by file and vocabulary."""
    vocab_key = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    key = hashlib.sha256(jsonl.read_bytes() + vocab_key.encode()).hexdigest()[:16]
    cache = cache_dir / f"{jsonl.stem}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    ids = tokenize_documents(read_texts(jsonl), tokenizer)
    with atomic_file(cache) as tmp, open(tmp, "wb") as f:
        np.save(f, ids)
    return ids


def windows(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (input [:-1], label [1:]): (N, seq_len + 1)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"only {len(ids)} tokens: too few for one sequence of {seq_len}")
    t = torch.from_numpy(ids[: n * seq_len + 1].astype(np.int64))
    return t.unfold(0, seq_len + 1, seq_len)


def lr_at(step: int, cfg: TinyTargetConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio · lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------
# Evaluation: held-out loss, repetition of continuations, stopping at document ends
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, ids: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Mean next-token cross-entropy (nats) over evenly spaced windows of ``ids`` (NaN when empty)."""
    if len(ids) < 2:
        return float("nan")
    chunks = windows(ids, min(seq_len, len(ids) - 1))
    n = max(1, min(len(chunks), max_tokens // chunks.shape[1]))
    chunks = chunks[torch.linspace(0, len(chunks) - 1, n).round().long()]
    total, count = 0.0, 0
    for batch in chunks.split(8):
        logits = model(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def continuation_report(model: Any, tokenizer: Any, texts: list[str], cfg: TinyTargetConfig) -> dict[str, Any]:
    """Greedy and sampled (T = 1) continuations of prompts from ``texts``: distinct-2/4 of each,
    beside the same measure on the true continuations (code repeats itself: the reference, not
    1.0, is what a healthy target approaches)."""
    need = cfg.gen_prompt_len + cfg.gen_new_tokens
    docs = [ids for ids in (tokenizer.encode(t, add_special_tokens=False) for t in texts) if len(ids) >= need]
    if not docs:
        return {}
    k = min(cfg.gen_prompts, len(docs))
    picks = [docs[round(i * (len(docs) - 1) / max(1, k - 1))] for i in range(k)]
    stats: dict[str, list[float]] = {}
    samples = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for ids in picks:
        start = (len(ids) - need) // 3  # from inside the file: its header is boilerplate
        prompt = torch.tensor([ids[start : start + cfg.gen_prompt_len]])
        reference = ids[start + cfg.gen_prompt_len : start + need]
        conts = {"reference": reference}
        for mode in ("greedy", "sampled"):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if mode == "sampled" else \
                dict(do_sample=False)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=cfg.gen_new_tokens,
                                 min_new_tokens=cfg.gen_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
            conts[mode] = out[0, prompt.shape[1]:].tolist()
        for mode, toks in conts.items():
            for n in (2, 4):
                stats.setdefault(f"{mode}_distinct_{n}", []).append(distinct_n(toks, n))
        if len(samples) < 1:
            samples.append(tokenizer.decode(conts["greedy"]))
    out = {key: float(np.mean(v)) for key, v in stats.items()}
    out["greedy_sample"] = samples[0]
    return out


@torch.no_grad()
def eos_at_document_end(model: Any, tokenizer: Any, texts: list[str], prompts: int = 24, tail: int = 192,
                        within: int = 32) -> float:
    """Fraction of document endings (the last ``tail`` tokens as prompt) after which greedy
    decoding emits EOS within ``within`` tokens: does the target stop where text ends?"""
    docs = [ids for ids in (tokenizer.encode(t, add_special_tokens=False) for t in texts) if len(ids) > tail]
    picks = docs[:: max(1, len(docs) // prompts)][:prompts]
    if not picks:
        return float("nan")
    hits = 0
    for ids in picks:
        prompt = torch.tensor([ids[-tail:]])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=within, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        hits += int(tokenizer.eos_token_id in out[0, prompt.shape[1]:].tolist())
    return hits / len(picks)


# --------------------------------------------------------------------------------------------------
# The training run
# --------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_target(corpus_dir: Path, tokenizer: Any, out_dir: Path, config: TinyTargetConfig | None = None,
                 work_dir: Path | None = None, command: str | None = None) -> dict[str, Any]:
    """Train the target on every domain's ``train`` file of ``corpus_dir``; publish to ``out_dir``.

    ``work_dir`` (default: ``out_dir`` + ``.work``) holds the token cache and the resumable
    training state: a run that is stopped and started again continues from its last state
    (same config fingerprint), and ends exactly where an uninterrupted run would. The published
    folder (bf16 safetensors + tokenizer + ``tiny_target_report.json`` with the weights' sha256)
    is swapped in atomically: a crash never leaves a half-written target.
    """
    from transformers import AutoModelForCausalLM

    cfg = config or TinyTargetConfig()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    work_dir = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    tokenizer = load_tokenizer(tokenizer)
    torch.set_num_threads(max(1, cfg.threads))
    t_start = time.perf_counter()

    # --- data: every domain's train split in one stream; held-out ids per domain
    train_files = corpus_files(corpus_dir, "train")
    domains = [f.name.split(".")[0] for f in train_files]
    train_ids = np.concatenate([cached_token_ids(f, tokenizer, work_dir / "cache") for f in train_files])
    heldout = {d: cached_token_ids(f, tokenizer, work_dir / "cache")
               for d, f in zip(domains, corpus_files(corpus_dir, "heldout"))}
    new_to_both = corpus_dir / "new_to_both.jsonl"
    if new_to_both.is_file():
        heldout["new_to_both"] = cached_token_ids(new_to_both, tokenizer, work_dir / "cache")
    data = windows(train_ids, cfg.seq_len)  # (N, seq_len + 1)
    domain_tokens = {d: int(len(cached_token_ids(f, tokenizer, work_dir / "cache")))
                     for d, f in zip(domains, train_files)}

    # --- model and optimizer
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(cfg.qwen3_config(tokenizer), attn_implementation="sdpa")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]  # decaying norm gains fights the normalisation
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    log.info("tiny target: %.2fM parameters, %d train tokens (%s), %d windows of %d, %d steps x %d sequences",
             n_params / 1e6, len(train_ids), domain_tokens, len(data), cfg.seq_len, cfg.max_steps, cfg.batch_size)

    # --- resume: the state holds weights, optimizer, step, the batch order and the loss curve
    state_path = work_dir / STATE_NAME
    step, loss_curve = 0, []
    # training time adds up over resumed runs; a state without it (older builds) leaves the time of
    # the steps before it unknown, and the report says from which step it was timed
    time_before, timed_from = 0.0, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor = torch.randperm(len(data), generator=gen), 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state.get("fingerprint") == cfg.fingerprint():
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, loss_curve, order, cursor = state["step"], state["loss_curve"], state["order"], state["cursor"]
            gen.set_state(state["generator"])
            time_before, timed_from = state.get("train_time_s", 0.0), state.get("timed_from_step", step)
            log.info("resuming the tiny target's training at step %d from %s", step, state_path)
        else:
            log.info("ignoring %s: it was written for another configuration", state_path)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        with amp:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    step_fn = torch.compile(train_step) if cfg.compile else train_step
    model.train()
    t_train, tokens_at_start, recent = time.perf_counter(), step, []
    while step < cfg.max_steps:
        if cursor + cfg.batch_size > len(order):  # a new epoch: a fresh permutation of the windows
            order, cursor = torch.randperm(len(data), generator=gen), 0
        batch = data[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = step_fn(batch[:, :-1], batch[:, 1:])
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent.append(loss.item())

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - t_train
            rate = (step - tokens_at_start) / max(elapsed, 1e-9)
            mean = float(np.mean(recent))
            loss_curve.append((step, round(mean, 4)))
            recent = []
            log.info("tiny target step %d/%d | loss %.3f | lr %.2e | %.0f tok/s | eta %.0f min", step, cfg.max_steps,
                     mean, lr_at(step - 1, cfg), rate * cfg.batch_size * cfg.seq_len,
                     (cfg.max_steps - step) / max(rate, 1e-9) / 60)
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            work_dir.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({"fingerprint": cfg.fingerprint(), "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "step": step, "loss_curve": loss_curve,
                          "order": order, "cursor": cursor, "generator": gen.get_state(),
                          "train_time_s": time_before + time.perf_counter() - t_train,
                          "timed_from_step": timed_from}, state_path)
    train_time = time_before + time.perf_counter() - t_train

    # --- publish: bf16 weights; the report is measured on exactly what is shipped
    model = model.to(torch.bfloat16)
    with atomic_dir(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        save_tokenizer(tokenizer, tmp_dir)
        shipped = AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32).eval()
        report = _report(shipped, tokenizer, cfg, corpus_dir, heldout, domains)
        report.update({
            "params": n_params, "steps": step, "tokens_seen": step * cfg.batch_size * cfg.seq_len,
            "train_tokens": int(len(train_ids)), "train_tokens_per_domain": domain_tokens,
            "epochs": step * cfg.batch_size / len(data), "train_time_s": round(train_time, 1),
            "timed_from_step": timed_from,
            "loss_curve": loss_curve, "config": dataclasses.asdict(cfg), "torch": torch.__version__,
            "command": command or " ".join(["python", "-m", "metattt", *sys.argv[1:]]),
            "weights_file": "model.safetensors", "weights_sha256": file_sha256(tmp_dir / "model.safetensors"),
            "wall_time_s": round(time.perf_counter() - t_start, 1),
        })
        (tmp_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    state_path.unlink(missing_ok=True)  # finished: the next build starts afresh
    log.info("tiny target -> %s: %d steps in %.0f s; held-out loss %s", out_dir, step, train_time,
             {d: round(v, 3) for d, v in report["heldout_loss"].items()})
    return report


def _report(model: Any, tokenizer: Any, cfg: TinyTargetConfig, corpus_dir: Path, heldout: dict[str, np.ndarray],
            domains: list[str]) -> dict[str, Any]:
    """Per-domain held-out loss (nats/token and bits/byte), continuation repetition, EOS at ends."""
    t0 = time.perf_counter()
    files = dict(zip(domains, corpus_files(corpus_dir, "heldout")))
    if (corpus_dir / "new_to_both.jsonl").is_file():
        files["new_to_both"] = corpus_dir / "new_to_both.jsonl"
    out: dict[str, Any] = {"heldout_loss": {}, "heldout_bits_per_byte": {}, "continuations": {}, "eos_at_end": {}}
    for name, ids in heldout.items():
        texts = read_texts(files[name])
        loss = heldout_loss(model, ids, cfg.seq_len, cfg.eval_max_tokens)
        n_bytes = sum(len(t.encode()) + 1 for t in texts)
        out["heldout_loss"][name] = loss
        out["heldout_bits_per_byte"][name] = loss / math.log(2) * len(ids) / max(n_bytes, 1)
        out["continuations"][name] = continuation_report(model, tokenizer, texts, cfg)
        out["eos_at_end"][name] = eos_at_document_end(model, tokenizer, texts)
    out["eval_time_s"] = round(time.perf_counter() - t0, 1)
    return out
