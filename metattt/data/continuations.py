"""Plain text → prompts continued by the target itself: the drafter's distillation data.

A drafter must predict the target's outputs, not the corpus's (DFlash and SpecForge regenerate
their data with the target for this reason). For plain-text corpora (code, prose) there is no
assistant turn to regenerate, so each record becomes a *prompt* — a window of ``prompt_len``
corpus tokens — and a *continuation* of up to ``max_new_tokens`` tokens that the target writes,
greedily for a stable share of the records (``greedy_fraction``) and sampled at
``temperature`` for the rest, ending at its EOS if it stops. Output rows hold ``input_ids``
(prompt + continuation) and ``loss_mask`` (1 on the continuation only), which
``data.train_files`` reads as they are.

Prompts of one batch share their length and decoding mode, so no padding enters a prompt and a
greedy row is exactly what the target decodes alone (tested against ``target_generate``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from metattt.atomic import atomic_save_dataset
from metattt.data.text import load_records

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_mask": datasets.List(datasets.Value("int8")),
    "prompt_len": datasets.Value("int32"),
    "mode": datasets.Value("string"),
    "source": datasets.Value("string"),
})


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    mode: str  # "greedy" | "sampled"
    source: str


def _stable_fraction(*parts: object) -> float:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_prompts(texts: Sequence[str], tokenizer: Any, prompt_lens: Sequence[int], windows_per_doc: int,
                 greedy_fraction: float, seed: int, source: str, max_prompts: int | None = None) -> list[Prompt]:
    """Windows of corpus tokens to continue: per document up to ``windows_per_doc`` non-overlapping
    windows (prompt lengths cycle through ``prompt_lens``), each greedy or sampled by a stable hash."""
    prompts: list[Prompt] = []
    g = torch.Generator().manual_seed(seed)
    for d, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = 0
        for w in range(windows_per_doc):
            plen = prompt_lens[(d + w) % len(prompt_lens)]
            room = len(ids) - start - plen
            if room < 0:
                break
            start += int(torch.randint(0, min(room, plen) + 1, (1,), generator=g))  # not always at a file head
            mode = "greedy" if _stable_fraction("mode", seed, source, d, w) < greedy_fraction else "sampled"
            prompts.append(Prompt(ids[start : start + plen], mode, f"{source}#{d}"))
            start += plen
            if max_prompts is not None and len(prompts) >= max_prompts:
                return prompts
    return prompts


@torch.no_grad()
def continue_prompts(model: Any, prompts: Sequence[Prompt], max_new_tokens: int, eos_token_id: int | None,
                     temperature: float = 1.0, batch_size: int = 16, seed: int = 0,
                     progress: bool = True) -> list[list[int]]:
    """The target's continuation of every prompt (without the prompt; cut after its first EOS)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    groups: dict[tuple[int, str], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((len(p.ids), p.mode), []).append(i)
    batches = [(mode, idx[k:k + batch_size]) for (_, mode), idx in sorted(groups.items())
               for k in range(0, len(idx), batch_size)]
    out: list[list[int]] = [[] for _ in prompts]
    pad = eos_token_id if eos_token_id is not None else 0
    for b, (mode, idx) in enumerate(tqdm(batches, desc="target continues prompts", disable=not progress)):
        x = torch.tensor([prompts[i].ids for i in idx], device=device)
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if mode == "sampled" else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        torch.manual_seed(seed * 1_000_003 + b)  # generate samples from the global generator
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad, **kwargs)
        for r, i in enumerate(idx):
            new = y[r, x.shape[1]:].tolist()
            if eos_token_id is not None and eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]  # the EOS is the target's output too: trained
            out[i] = new
    return out


def _settings(files: list[str], tokenizer: Any, prompt_lens: Sequence[int], windows_per_doc: int,
              max_new_tokens: int, greedy_fraction: float, temperature: float, max_records: int | None,
              seed: int, model_name: str) -> dict:
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {"files": files, "prompt_lens": list(prompt_lens), "windows_per_doc": windows_per_doc,
            "max_new_tokens": max_new_tokens, "greedy_fraction": greedy_fraction, "temperature": temperature,
            "max_records": max_records, "seed": seed, "model": model_name,
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def prepare_continuations(files: str | list[str], out_dir: Path, tokenizer: Any, load_model, *,
                          prompt_lens: Sequence[int], windows_per_doc: int, max_new_tokens: int,
                          greedy_fraction: float, temperature: float, max_records: int | None, seed: int,
                          batch_size: int, model_name: str, overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``out_dir`` (an Arrow folder ``data.train_files`` reads) unless it is up to date.

    A rerun with the same settings reuses the folder; other settings stop with a message unless
    ``overwrite``. The folder is swapped in whole, so a crash leaves the previous one.
    """
    out_dir = Path(out_dir)
    files = [files] if isinstance(files, str) else list(files)
    settings = _settings(files, tokenizer, prompt_lens, windows_per_doc, max_new_tokens, greedy_fraction,
                         temperature, max_records, seed, model_name)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("settings") == settings:
            log.info("target continuations in %s are up to date: reusing them", out_dir)
            return old
        if not overwrite:
            raise ValueError(f"{out_dir} holds continuations made with other settings ({manifest_path}); set "
                             "prepare.overwrite=true to rebuild them, or choose another prepare.output_dir")
    prompts: list[Prompt] = []
    for k, f in enumerate(files):
        texts = load_records(f)["text"]
        left = None if max_records is None else max_records - len(prompts)
        if left is not None and left <= 0:
            break
        prompts += make_prompts(texts, tokenizer, prompt_lens, windows_per_doc, greedy_fraction, seed + k,
                                Path(f).name, left)
    if not prompts:
        raise ValueError(f"no document in {files} holds a prompt of {min(prompt_lens)} tokens")
    model = load_model()
    conts = continue_prompts(model, prompts, max_new_tokens, tokenizer.eos_token_id, temperature, batch_size, seed,
                             progress)
    rows = [{"input_ids": p.ids + c, "loss_mask": [0] * len(p.ids) + [1] * len(c), "prompt_len": len(p.ids),
             "mode": p.mode, "source": p.source} for p, c in zip(prompts, conts) if c]
    summary = {"records": len(rows), "greedy": sum(r["mode"] == "greedy" for r in rows),
               "prompt_tokens": sum(r["prompt_len"] for r in rows),
               "generated_tokens": sum(len(r["input_ids"]) - r["prompt_len"] for r in rows),
               "ended_with_eos": sum(r["input_ids"][-1] == tokenizer.eos_token_id for r in rows)}
    manifest = {"settings": settings, "summary": summary}
    atomic_save_dataset(datasets.Dataset.from_list(rows, features=FEATURES), out_dir,
                 {MANIFEST: json.dumps(manifest, indent=2) + "\n"})
    log.info("target continuations -> %s: %s", out_dir, summary)
    return manifest
