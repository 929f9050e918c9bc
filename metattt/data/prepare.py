"""`python -m metattt prepare`: chat datasets → target-regenerated, tokenized Arrow folders.

Steps, per split (`prepare.train_files` → `{output_dir}/train/`, `val_files` → `validation/`):

1. **read** records from jsonl / json / parquet files (or a hub dataset where a network exists)
   and turn each into a list of ``{"role", "content"}`` messages. Understood layouts:
   ``messages`` (role/content: UltraChat-200k, OpenAI style, content may be a list of text parts),
   ShareGPT ``conversations`` (from/value, speakers human/gpt/chatgpt/bing/...), UltraChat's
   original ``data`` (a list of strings alternating user, assistant), ``prompt`` + ``response`` /
   ``completion`` / ``output``, and Alpaca ``instruction`` (+ ``input``) + ``output``. A
   ``system`` field is prepended as a system message.
2. **regenerate** (optional) the assistant turns with the target itself, because a drafter must
   predict the target's outputs, not the dataset's: batched ``generate`` on the local target
   (``regenerate: transformers``) or an OpenAI-compatible server such as vLLM or SGLang
   (``regenerate: endpoint``, concurrent requests from a thread pool, urllib only). With
   ``regenerate_turns: all`` every assistant turn is rewritten in order, each conditioned on the
   already-regenerated history; a conversation that ends on a user turn gets its answer generated.
3. **tokenize** with the target's chat template (``metattt.data.text.tokenize_chat``): only the
   tokens the assistant writes are trained (``loss_mask``). ``enable_thinking`` is passed to the
   template explicitly when set (Qwen3): ``false`` puts the empty ``<think>\\n\\n</think>\\n\\n``
   in the prompt, so only answers are trained; ``true`` leaves the think block to the assistant,
   so its reasoning is trained too. Regeneration uses the same setting, so the data matches what
   the target does at inference in that mode.
4. **write** shards of ``shard_size`` records with ``datasets.Dataset.save_to_disk`` under
   ``{output_dir}/.shards/`` (a finished shard is never redone: rerunning resumes), then one Arrow
   folder per split, which ``data.train_files`` / ``data.val_files`` read directly (pre-tokenized
   records are used as they are). A ``manifest.json`` records the settings; a rerun with the same
   settings reuses the output, with other settings it stops (or rebuilds with ``overwrite``).

Bad records (unknown layouts, unknown roles, no user or assistant turn, template errors, failed
or truncated generations) are counted by reason, skipped, and summarized at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from metattt.atomic import atomic_save_dataset, atomic_write_json
from metattt.config import PrepareConfig
from metattt.data.text import ROLE_ALIASES, load_records, tokenize_chat
from metattt.endpoint import EndpointError, request_json

log = logging.getLogger(__name__)

SPLITS = {"train": "train_files", "validation": "val_files"}
MANIFEST = "manifest.json"
SHARDS_DIR = ".shards"
_DONE = "_shard_stats.json"

_RESPONSE_FIELDS = ("response", "completion", "output", "answer")

FEATURES = datasets.Features({
    "messages": datasets.List({
        "role": datasets.Value("string"),
        "content": datasets.Value("string"),
        "reasoning_content": datasets.Value("string"),
    }),
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_mask": datasets.List(datasets.Value("int8")),
    "source": datasets.Value("string"),
    "index": datasets.Value("int64"),
})


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is the summary's bucket."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# records → messages
# --------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise BadRecord("non_text_content", f"content part {str(p)[:80]!r}")
        return "".join(parts)
    raise BadRecord("bad_content", f"content of type {type(content).__name__}")


def record_to_messages(rec: dict[str, Any], need_assistant: bool = True) -> list[dict[str, str]]:
    """One raw record → ``[{"role", "content"[, "reasoning_content"]}, ...]``.

    Raises:
        BadRecord: the record has no known chat layout, an unknown speaker, no user turn, or
            (with ``need_assistant``) no non-empty assistant turn.
    """
    raw: list[Any]
    if rec.get("messages"):
        raw = list(rec["messages"])
    elif rec.get("conversations"):
        raw = list(rec["conversations"])
    elif rec.get("conversation") and isinstance(rec["conversation"], list):
        raw = list(rec["conversation"])
    elif isinstance(rec.get("data"), list) and rec["data"] and all(isinstance(x, str) for x in rec["data"]):
        # UltraChat (original release): user, assistant, user, assistant, ...
        raw = [{"role": "user" if i % 2 == 0 else "assistant", "content": x} for i, x in enumerate(rec["data"])]
    elif isinstance(rec.get("prompt"), str) and rec["prompt"]:
        response = next((rec[f] for f in _RESPONSE_FIELDS if isinstance(rec.get(f), str)), None)
        raw = [{"role": "user", "content": rec["prompt"]}]
        if response is not None:
            raw.append({"role": "assistant", "content": response})
    elif isinstance(rec.get("instruction"), str) and rec["instruction"]:
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        raw = [{"role": "user", "content": prompt}]
        if isinstance(rec.get("output"), str):
            raw.append({"role": "assistant", "content": rec["output"]})
    else:
        keys = sorted(k for k, v in rec.items() if v is not None)
        raise BadRecord("no_chat_fields", f"fields {keys}")

    messages: list[dict[str, str]] = []
    for m in raw:
        if not isinstance(m, dict):
            raise BadRecord("bad_message", f"message of type {type(m).__name__}")
        speaker = next((m[k] for k in ("role", "from") if m.get(k) is not None), None)
        if not isinstance(speaker, str) or speaker.lower() not in ROLE_ALIASES:
            raise BadRecord("unknown_role", repr(speaker))
        content = next((m[k] for k in ("content", "value", "text") if m.get(k) is not None), None)
        out = {"role": ROLE_ALIASES[speaker.lower()], "content": _text(content)}
        reasoning = m.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            out["reasoning_content"] = reasoning
        messages.append(out)
    system = rec.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    # ShareGPT dumps often open with the assistant's greeting: nothing prompted it, drop it.
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise BadRecord("no_user_turn")
    messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
    if need_assistant and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no_assistant_turn")
    return messages


# --------------------------------------------------------------------------------------------
# regeneration
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    content: str
    reasoning: str | None = None
    truncated: bool = False


class TransformersBackend:
    """Batched ``model.generate`` on the local target (left padding, prompts sorted by length)."""

    def __init__(self, model, tokenizer, template_kwargs: dict, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.template_kwargs = dict(template_kwargs)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = max(1, batch_size)
        self.progress = progress
        vocab = tokenizer.get_vocab()
        stop = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>") if t in vocab}
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stop.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        self.stop_ids = sorted(int(s) for s in stop)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else self.stop_ids[0])

    def generate(self, prompts: Sequence[list[dict]]) -> list[Generation | Exception]:
        import torch

        results: list[Generation | Exception | None] = [None] * len(prompts)
        encoded: list[tuple[int, list[int]]] = []
        for i, p in enumerate(prompts):
            try:
                text = self.tokenizer.apply_chat_template(_request_messages(p), tokenize=False,
                                                          add_generation_prompt=True, **self.template_kwargs)
                encoded.append((i, self.tokenizer(text, add_special_tokens=False)["input_ids"]))
            except Exception as e:  # a template that rejects this conversation
                results[i] = e
        encoded.sort(key=lambda x: len(x[1]))
        device = next(self.model.parameters()).device
        batches = [encoded[k:k + self.batch_size] for k in range(0, len(encoded), self.batch_size)]
        for batch in tqdm(batches, desc="generating", leave=False, disable=not self.progress):
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, ids) in enumerate(batch):
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attention[r, width - len(ids):] = 1
            sample = self.temperature > 0
            kwargs = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if sample else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                          max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                                          pad_token_id=self.pad_id, **kwargs)
            for r, (i, _) in enumerate(batch):
                new = out[r, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
                tokens = new if cut is None else new[:cut]
                results[i] = Generation(self.tokenizer.decode(tokens, skip_special_tokens=False), None, cut is None)
        return results  # type: ignore[return-value]


class EndpointBackend:
    """An OpenAI-compatible chat-completions server (vLLM, SGLang, ...), many requests in flight.

    ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``) are sent as the body field of
    that name, which vLLM and SGLang pass to the chat template. A reasoning parser's separate
    ``reasoning_content`` is kept as such; without a parser the think block stays in ``content``.
    Connection errors, 408, 429 and 5xx are retried ``retries`` times with exponential back-off.
    """

    backoff_s = 1.0

    def __init__(self, url: str, model: str | None, template_kwargs: dict, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, concurrency: int = 32, timeout_s: float = 600.0,
                 retries: int = 3, api_key: str | None = None, progress: bool = True):
        self.url = url.rstrip("/")
        self.template_kwargs = dict(template_kwargs)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.concurrency = max(1, concurrency)
        self.timeout_s, self.retries = timeout_s, max(0, retries)
        self.api_key = api_key
        self.progress = progress
        try:  # fail fast, before any shard, when no server answers
            served = self._request("GET", "/models", retries=0).get("data") or []
        except RuntimeError as e:
            raise RuntimeError(
                f"no OpenAI-compatible server answers at {self.url} ({e}). Start one first, e.g. "
                "`vllm serve <target> --port 30000` or `python -m sglang.launch_server --model-path <target> "
                "--port 30000`, and set prepare.endpoint_url; or use prepare.regenerate=transformers") from e
        if model is None and not served:
            raise RuntimeError(f"{self.url}/models lists no model: set prepare.endpoint_model")
        self.model = model or served[0]["id"]

    def _request(self, method: str, path: str, payload: dict | None = None, retries: int | None = None) -> dict:
        last: EndpointError | None = None
        for attempt in range((self.retries if retries is None else retries) + 1):
            if attempt:
                time.sleep(min(30.0, self.backoff_s * 2 ** (attempt - 1)))
            try:
                return request_json(self.url + path, payload, method=method, api_key=self.api_key,
                                    timeout_s=self.timeout_s)
            except EndpointError as e:
                last = e
                if not e.retryable:
                    break
        assert last is not None
        raise last

    def complete(self, messages: list[dict]) -> Generation:
        payload: dict[str, Any] = {"model": self.model, "messages": _request_messages(messages, reasoning=False),
                                   "max_tokens": self.max_new_tokens, "temperature": self.temperature,
                                   "top_p": self.top_p}
        if self.template_kwargs:
            payload["chat_template_kwargs"] = self.template_kwargs
        resp = self._request("POST", "/chat/completions", payload)
        try:
            choice = resp["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"malformed response: {str(resp)[:200]}") from e
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        return Generation(msg.get("content") or "", reasoning or None, choice.get("finish_reason") == "length")

    def generate(self, prompts: Sequence[list[dict]]) -> list[Generation | Exception]:
        def one(p: list[dict]) -> Generation | Exception:
            try:
                return self.complete(p)
            except Exception as e:
                return e

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(tqdm(pool.map(one, prompts), total=len(prompts), desc="generating", leave=False,
                             disable=not self.progress))


def _request_messages(messages: list[dict], reasoning: bool = True) -> list[dict]:
    """role/content (+ reasoning_content for a local template, whose call it is to render history
    reasoning; OpenAI-compatible servers get role/content only)."""
    out = []
    for m in messages:
        out.append({"role": m["role"], "content": m.get("content") or ""})
        if reasoning and m.get("reasoning_content"):
            out[-1]["reasoning_content"] = m["reasoning_content"]
    return out


def regenerate_conversations(convs: Sequence[list[dict]], backend, turns: str = "all",
                             drop_truncated: bool = True, counts: Counter | None = None
                             ) -> list[list[dict] | BadRecord]:
    """Replace assistant turns with the backend's answers, round by round (turn r of every
    conversation in one batch), each prompt holding the already-regenerated history.
    `counts["truncated_kept"]` counts truncated turns kept (``drop_truncated=False``)."""
    if turns not in ("all", "last"):
        raise ValueError(f"prepare.regenerate_turns={turns!r}: choose all or last")
    plans: list[tuple[list[dict], list[int]]] = []
    for conv in convs:
        conv = [dict(m) for m in conv]
        if conv[-1]["role"] == "user":
            conv.append({"role": "assistant", "content": ""})
        slots = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        if turns == "last":
            slots = slots[-1:]
        plans.append((conv, slots))
    errors: list[BadRecord | None] = [None] * len(plans)
    rounds = max((len(s) for _, s in plans), default=0)
    for r in range(rounds):
        todo = [(j, slots[r]) for j, (_, slots) in enumerate(plans) if errors[j] is None and len(slots) > r]
        outs = backend.generate([plans[j][0][:slot] for j, slot in todo])
        for (j, slot), out in zip(todo, outs):
            if isinstance(out, Exception):
                errors[j] = BadRecord("generation_failed", str(out)[:300])
            elif out.truncated and drop_truncated:
                errors[j] = BadRecord("truncated", f"turn {slot} hit max_new_tokens")
            else:
                if out.truncated and counts is not None:
                    counts["truncated_kept"] += 1
                msg = {"role": "assistant", "content": out.content}
                if out.reasoning:
                    msg["reasoning_content"] = out.reasoning
                plans[j][0][slot] = msg
    return [errors[j] or plans[j][0] for j in range(len(plans))]


# --------------------------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------------------------


@dataclass
class ShardStats:
    read: int = 0
    written: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated_kept: int = 0
    bad: dict | None = None
    examples: list | None = None


def process_records(records: list[dict], tokenizer, template_kwargs: dict, source: str, first_index: int,
                    backend=None, turns: str = "all", drop_truncated: bool = True,
                    max_examples: int = 3) -> tuple[list[dict], ShardStats]:
    """Records → output rows (messages, input_ids, loss_mask, source, index) and their stats."""
    stats = ShardStats(read=len(records), bad={}, examples=[])
    bad: Counter = Counter()

    def fail(i: int, e: BadRecord) -> None:
        bad[e.reason] += 1
        if len(stats.examples) < max_examples:
            stats.examples.append({"source": source, "index": first_index + i, "reason": e.reason,
                                   "detail": e.detail[:200]})

    convs: list[tuple[int, list[dict]]] = []
    for i, rec in enumerate(records):
        try:
            convs.append((i, record_to_messages(rec, need_assistant=backend is None)))
        except BadRecord as e:
            fail(i, e)
    if backend is not None and convs:
        counts: Counter = Counter()
        regenerated = regenerate_conversations([c for _, c in convs], backend, turns, drop_truncated, counts)
        stats.truncated_kept = counts["truncated_kept"]
        kept = []
        for (i, _), res in zip(convs, regenerated):
            if isinstance(res, BadRecord):
                fail(i, res)
            else:
                kept.append((i, res))
        convs = kept
    rows = []
    for i, messages in convs:
        try:
            ids, mask = tokenize_chat(tokenizer, messages, template_kwargs)
        except Exception as e:  # the template raised on this conversation
            fail(i, BadRecord("template_error", f"{type(e).__name__}: {e}"))
            continue
        if not any(mask):
            fail(i, BadRecord("no_assistant_tokens"))
            continue
        rows.append({
            "messages": [{"role": m["role"], "content": m["content"],
                          "reasoning_content": m.get("reasoning_content")} for m in messages],
            "input_ids": ids, "loss_mask": mask, "source": source, "index": first_index + i,
        })
        stats.tokens += len(ids)
        stats.trained_tokens += sum(mask)
    stats.written = len(rows)
    stats.bad = dict(bad)
    return rows, stats


def _settings(cfg: PrepareConfig, tokenizer, template_kwargs: dict) -> dict:
    template = tokenizer.get_chat_template() if getattr(tokenizer, "chat_template", None) else ""
    keep = ("train_files", "val_files", "max_records", "shard_size", "regenerate", "regenerate_turns",
            "max_new_tokens", "temperature", "top_p", "drop_truncated", "endpoint_model")
    s = {k: v for k, v in asdict(cfg).items() if k in keep}
    if cfg.regenerate == "none":
        s = {k: v for k, v in s.items() if k in ("train_files", "val_files", "max_records", "shard_size", "regenerate")}
    s["tokenizer"] = str(getattr(tokenizer, "name_or_path", ""))
    s["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()
    s["chat_template_kwargs"] = template_kwargs
    return s


def _sources(files: str | list[str] | None) -> list[str]:
    if files is None:
        return []
    return [files] if isinstance(files, str) else list(files)


def prepare_split(split: str, sources: list[str], out_dir: Path, tokenizer, template_kwargs: dict,
                  cfg: PrepareConfig, backend=None, progress: bool = True) -> dict:
    """Process every shard of one split (skipping finished ones), then write `{out_dir}/{split}/`."""
    shard_root = out_dir / SHARDS_DIR / split
    shard_root.mkdir(parents=True, exist_ok=True)
    shard_dirs: list[Path] = []
    for s_idx, source in enumerate(sources):
        records = load_records(source)
        limit = cfg.max_val_records if split == "validation" and cfg.max_val_records is not None else cfg.max_records
        n = len(records) if limit is None else min(limit, len(records))
        num_shards = max(1, math.ceil(n / cfg.shard_size))
        name = Path(source).name or source
        todo = []
        for k in range(num_shards):
            d = shard_root / f"{s_idx:03d}-{k:06d}"
            shard_dirs.append(d)
            if not (d / _DONE).is_file():
                todo.append((k, d))
        if len(todo) < num_shards:
            log.info("%s %s: %d of %d shards already done, resuming", split, name, num_shards - len(todo), num_shards)
        for k, d in tqdm(todo, desc=f"{split}: {name}", disable=not progress, unit="shard"):
            lo, hi = k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size)
            batch = records.select(range(lo, hi)).to_list() if hi > lo else []
            rows, stats = process_records(batch, tokenizer, template_kwargs, name, lo, backend,
                                          cfg.regenerate_turns, cfg.drop_truncated)
            if backend is not None and stats.read and stats.bad.get("generation_failed") == stats.read:
                raise RuntimeError(f"every generation of a shard failed, e.g. {stats.examples[0]['detail']}; "
                                   "check the server / prepare.endpoint_* settings (nothing was written)")
            ds = datasets.Dataset.from_list(rows, features=FEATURES) if rows else _empty_dataset()
            atomic_save_dataset(ds, d, {_DONE: json.dumps(asdict(stats))})
    total = ShardStats(bad={}, examples=[])
    bad: Counter = Counter()
    parts = []
    for d in shard_dirs:
        st = json.loads((d / _DONE).read_text())
        for k in ("read", "written", "tokens", "trained_tokens", "truncated_kept"):
            setattr(total, k, getattr(total, k) + st.get(k, 0))
        bad.update(st.get("bad") or {})
        total.examples.extend((st.get("examples") or [])[: max(0, 5 - len(total.examples))])
        if st.get("written"):
            parts.append(datasets.load_from_disk(str(d)))
    total.bad = dict(bad)
    summary = asdict(total)
    if not parts:
        return summary
    merged = datasets.concatenate_datasets(parts)
    atomic_save_dataset(merged, out_dir / split)
    return summary


def _empty_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)


def make_backend(cfg: PrepareConfig, tokenizer, template_kwargs: dict, load_model: Callable[[], Any] | None,
                 progress: bool = True):
    if cfg.regenerate == "none":
        return None
    if cfg.regenerate == "transformers":
        if load_model is None:
            raise ValueError("prepare.regenerate=transformers needs the target model")
        return TransformersBackend(load_model(), tokenizer, template_kwargs, cfg.max_new_tokens, cfg.temperature,
                                   cfg.top_p, cfg.generate_batch_size, progress)
    if cfg.regenerate == "endpoint":
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise ValueError(f"prepare.api_key_env={cfg.api_key_env}: that environment variable is not set")
        return EndpointBackend(cfg.endpoint_url, cfg.endpoint_model, template_kwargs, cfg.max_new_tokens,
                               cfg.temperature, cfg.top_p, cfg.endpoint_concurrency, cfg.endpoint_timeout_s,
                               cfg.endpoint_retries, key, progress)
    raise ValueError(f"prepare.regenerate={cfg.regenerate!r}: choose none, transformers or endpoint")


def template_kwargs_for(cfg: PrepareConfig, base: dict | None = None) -> dict:
    kwargs = dict(base or {})
    if cfg.enable_thinking is not None:
        kwargs["enable_thinking"] = bool(cfg.enable_thinking)
    return kwargs


def prepare_chat_data(cfg: PrepareConfig, tokenizer, out_dir: str | Path, base_template_kwargs: dict | None = None,
                      load_model: Callable[[], Any] | None = None, progress: bool = True) -> dict:
    """Run steps 1-4 for every split that has sources. Returns the manifest (settings + summary)."""
    out_dir = Path(out_dir)
    if cfg.shard_size < 1:
        raise ValueError(f"prepare.shard_size must be >= 1, got {cfg.shard_size}")
    template_kwargs = template_kwargs_for(cfg, base_template_kwargs)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prepare needs a tokenizer with a chat template (the target's): set target.path")
    settings = _settings(cfg, tokenizer, template_kwargs)
    splits = {split: _sources(getattr(cfg, key)) for split, key in SPLITS.items()}
    splits = {s: src for s, src in splits.items() if src}
    if not splits:
        raise ValueError("nothing to prepare: set prepare.train_files (and optionally prepare.val_files)")
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        complete = all((out_dir / s / "state.json").is_file() or not old["summary"].get(s, {}).get("written")
                       for s in splits)
        if old.get("settings") == settings and complete:
            log.info("prepared data in %s is up to date (same settings): reusing it", out_dir)
            _log_summary(old["summary"], out_dir)
            return old
        if old.get("settings") != settings and not cfg.overwrite:
            raise ValueError(f"{out_dir} was prepared with other settings ({manifest_path}); choose another "
                             "prepare.output_dir or set prepare.overwrite=true to rebuild it")
    shard_settings = out_dir / SHARDS_DIR / "settings.json"
    if shard_settings.is_file() and json.loads(shard_settings.read_text()) != settings:
        if not cfg.overwrite:
            raise ValueError(f"{out_dir / SHARDS_DIR} holds unfinished shards made with other settings; set "
                             "prepare.overwrite=true to discard them, or choose another prepare.output_dir")
        shutil.rmtree(out_dir / SHARDS_DIR)
    if cfg.overwrite and manifest_path.is_file():
        manifest_path.unlink()
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    shard_settings.write_text(json.dumps(settings, indent=2))

    backend = make_backend(cfg, tokenizer, template_kwargs, load_model, progress)
    summary = {}
    for split, sources in splits.items():
        summary[split] = prepare_split(split, sources, out_dir, tokenizer, template_kwargs, cfg, backend, progress)
    manifest = {"settings": settings, "summary": summary}
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    _log_summary(summary, out_dir)
    if not summary.get("train", {}).get("written") and "train" in splits:
        raise ValueError(f"no usable training record: {summary['train']['bad']} (see {manifest_path})")
    return manifest


def _log_summary(summary: dict, out_dir: Path) -> None:
    lines = [f"prepared data in {out_dir}:"]
    for split, s in summary.items():
        bad = sum((s.get("bad") or {}).values())
        lines.append(f"  {split}: {s['written']} of {s['read']} records kept, {bad} skipped "
                     f"{dict(s.get('bad') or {})}; {s['tokens']} tokens, {s['trained_tokens']} trained")
        for ex in s.get("examples") or []:
            lines.append(f"    e.g. {ex['source']}#{ex['index']}: {ex['reason']} {ex['detail']}")
    log.info("\n".join(lines))
