"""The tiny embedded target LM: built from the Python standard library, trained once on CPU.

The project's default recipe has to run on a fresh machine with nothing downloaded (no model hub,
no dataset hub, 2 CPU cores). So it makes its own small target model from text that every Python
installation ships: the source code of the standard library.

Pipeline (each step is a public function; :func:`ensure_tiny_target` chains them idempotently)::

    build_corpus      stdlib *.py  ->  corpus/{train,validation,shifted}.jsonl
    train_tokenizer   train.jsonl  ->  byte-level BPE (4k) + ChatML template, transformers format
    train_target      train.jsonl  ->  Qwen3-style causal LM (transformers format) + report json

The ``shifted`` split holds out whole stdlib packages (:data:`SHIFTED_PACKAGES`) that the target
never trains on. It plays the part of "a new code base" for the drafters' test-time training:
the place where a statically trained drafter's acceptance length should collapse.

The target has to be good enough that speculative-decoding acceptance lengths mean something: a
weak LM falls into repetitive greedy loops that any drafter predicts trivially. That is why the
report records held-out loss *and* the distinct-n ratio of greedy continuations, next to the
same ratio for the real continuations of the same prompts.

Run by hand::

    python -m metattt.tiny --root checkpoints/tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("metattt.tiny")  # not __name__: the same name under `python -m`

# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------

#: Top-level stdlib packages held out as the SHIFTED domain ("a new code base"): the target never
#: trains on them, so prompts from them are the distribution tail on which drafters must adapt.
#: Chosen because they exist as pure-Python packages on every CPython 3.10-3.13 (``turtledemo``
#: may be missing where a distribution splits Tk out; the rest is then still ~0.75 MB), are
#: self-contained code bases with their own vocabulary (MIME headers, XML DOM/SAX, JSON scanning,
#: DB-API, terminal handling, turtle graphics demos), and add up to ~0.8 MB of source (3.11).
SHIFTED_PACKAGES: tuple[str, ...] = ("email", "xml", "json", "sqlite3", "curses", "turtledemo")

#: Directory names skipped anywhere in a path: installed third-party code and the stdlib's test
#: suites (huge, repetitive, and full of deliberately odd code and non-UTF-8 files).
SKIPPED_DIRS: frozenset[str] = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)

#: Files larger than this are skipped: the only stdlib file above it is generated documentation
#: text (``pydoc_data/topics.py``, 750 KB), which would be ~6% of the corpus and not code.
MAX_FILE_BYTES = 300_000

#: Marker of the machine-generated codec tables in ``encodings/`` (cp1252.py & co.: 1.2 MB of
#: 256-entry mapping tables). They are data, not code, and would teach the model to recite tables.
_GENERATED_CODEC_MARKER = "Python Character Mapping Codec"

#: A file is a data table, not code, when at least this fraction of its code lines are single
#: literal entries (``'AElig': 0xc6,``): html/entities.py, encodings/aliases.py, re/_casefix.py...
#: They are skipped: one of them landing in the small validation split would dominate its loss.
DATA_TABLE_FRACTION = 0.85
_TABLE_ENTRY = re.compile(
    r"""^\s*(['"][^'"]*['"]|[\w.]+)\s*[:=,]?\s*(0x[0-9a-fA-F]+|\d+|'[^']*'|"[^"]*"|\([^()]*\))\s*,?\s*(#.*)?$"""
)

#: Fraction of in-domain files in the validation split (by a hash of the relative path).
VALIDATION_FRACTION = 0.03

SPLITS: tuple[str, ...] = ("train", "validation", "shifted")

#: Written beside the target checkpoint; its presence marks a finished target.
REPORT_NAME = "tiny_target_report.json"


def _stable_hash(*parts: object) -> int:
    """A hash that is identical on every machine and Python run (unlike ``hash()``, which is salted)."""
    key = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def _is_data_table(text: str) -> bool:
    """True for files that are mostly literal table entries (see :data:`DATA_TABLE_FRACTION`)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) < 20:
        return False  # small modules (constants.py & co.) are harmless either way
    return sum(bool(_TABLE_ENTRY.match(ln)) for ln in lines) >= DATA_TABLE_FRACTION * len(lines)


def _iter_stdlib_sources(stdlib: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(relative posix path, text)`` of the usable ``*.py`` files under ``stdlib``, sorted by path."""
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in SKIPPED_DIRS for part in rel.parts[:-1]) or rel.name.startswith("_sysconfigdata"):
            continue  # _sysconfigdata*: the build machine's configuration, different on every install
        try:
            if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable: permissions, broken links, legacy encodings
        if not text.strip() or _GENERATED_CODEC_MARKER in text[:1000] or _is_data_table(text):
            continue  # empty __init__.py files carry no signal; codec and other tables are data
        yield rel.as_posix(), text


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as jsonl via a temp file + ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp files are private (0600); these are ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def read_jsonl_texts(path: Path) -> list[str]:
    """The ``"text"`` fields of a jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_corpus(out_dir: Path, seed: int = 0, max_files: int | None = None) -> dict[str, int]:
    """Build train/validation/shifted jsonl files from the running interpreter's standard library.

    One record per source file: ``{"text": source, "path": "pkg/module.py"}``.

    * ``shifted.jsonl``: every file of the held-out packages :data:`SHIFTED_PACKAGES`.
    * ``validation.jsonl``: ~3% of the other files, chosen by a hash of ``(seed, relative path)``
      so the split is the same on every machine that has the same stdlib.
    * ``train.jsonl``: the rest, shuffled with ``seed`` so packed training sequences mix packages.

    Args:
        out_dir: folder that receives the three files (created if missing).
        seed: salts the validation choice and the training order.
        max_files: for tests and smoke runs: keep at most this many in-domain files and, separately,
            this many shifted files (a hash-ordered, i.e. pseudo-random but stable, subset).

    Returns:
        Number of records written per split.
    """
    out_dir = Path(out_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    in_domain: list[tuple[str, str]] = []
    shifted: list[tuple[str, str]] = []
    for rel, text in _iter_stdlib_sources(stdlib):
        top = rel.split("/", 1)[0] if "/" in rel else None
        (shifted if top in SHIFTED_PACKAGES else in_domain).append((rel, text))

    if max_files is not None:
        # A subset ordered by a hash independent of the validation hash, so it is not biased
        # towards (or away from) validation files.
        def subset(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
            return sorted(sorted(items, key=lambda it: _stable_hash("subset", seed, it[0]))[:max_files])

        in_domain, shifted = subset(in_domain), subset(shifted)

    threshold = int(VALIDATION_FRACTION * 2**64)
    val_keys = {rel: _stable_hash("validation", seed, rel) for rel, _ in in_domain}
    validation = [it for it in in_domain if val_keys[it[0]] < threshold]
    if not validation and len(in_domain) >= 2:
        # Tiny subsets can miss the 3% bucket: promote the file with the smallest key (still stable).
        validation = [min(in_domain, key=lambda it: val_keys[it[0]])]
    val_paths = {rel for rel, _ in validation}
    train = [it for it in in_domain if it[0] not in val_paths]
    random.Random(seed).shuffle(train)

    counts = {}
    for name, items in (("train", train), ("validation", validation), ("shifted", shifted)):
        counts[name] = _write_jsonl_atomic(
            out_dir / f"{name}.jsonl", ({"text": t, "path": p} for p, t in items)
        )
    log.info(
        "corpus from %s -> %s: %s (%.1f MB train)",
        stdlib,
        out_dir,
        counts,
        sum(len(t) for _, t in train) / 1e6,
    )
    return counts


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"  # document separator, eos and pad (the tokenizer has no bos)
MASK_TOKEN = "<|mask|>"  # the block drafter's mask token
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, MASK_TOKEN, IM_START, IM_END)

#: Qwen-style ChatML. The assistant's content and its ``<|im_end|>`` sit inside
#: ``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks
#: exactly the tokens a model must produce (the loss mask of chat SFT / drafter training).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` plus a tokenizer_config.json that transformers 4.x loads too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list-valued
    ``extra_special_tokens``, both unknown to 4.x (which this project still supports); the
    classic spelling (``PreTrainedTokenizerFast``, ``additional_special_tokens``) loads in both.
    """
    tokenizer.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer(train_file: Path, out_dir: Path, vocab_size: int = 4096):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE on ``train_file`` and save it in transformers format to ``out_dir``.

    Byte-level, so any text (including the shifted domain) encodes without unknown tokens; the
    GPT-2 pre-tokenizer keeps runs of indentation spaces together, which suits code. Special
    tokens get the first ids: ``<|endoftext|>`` = 0 (eos and pad, no bos), ``<|mask|>`` = 1 (also
    the tokenizer's ``mask_token``), ``<|im_start|>`` = 2, ``<|im_end|>`` = 3.

    Returns:
        The tokenizer (a ``PreTrainedTokenizerFast``), reloadable offline with
        ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = read_jsonl_texts(Path(train_file))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover leading spaces too, or assistant masks (computed from
    # character offsets) would miss tokens such as " return".
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=[MASK_TOKEN, IM_START, IM_END],
        model_max_length=TinyTargetConfig.max_position_embeddings,
        clean_up_tokenization_spaces=False,  # code: never rewrite " ." / " ," on decode
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, out_dir)
    log.info("tokenizer: %d tokens -> %s", len(tokenizer), out_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Target model
# --------------------------------------------------------------------------------------------------


@dataclass
class TinyTargetConfig:
    """Architecture and training recipe of the tiny target.

    The defaults are the best held-out loss found for ~8 minutes of training on 2 CPU cores
    (a sweep of ~115 short runs at matched compute budgets). Measured with these defaults on 2
    otherwise idle AMD EPYC (Zen 4) cores: 1.41M parameters, 981 steps (4.0M tokens, 1.6 epochs)
    in 480 s, train loss 3.08, validation 3.29, shifted 3.57 (nats/token); distinct-2/4 of greedy
    continuations 0.35/0.40 (the true continuations: 0.80/0.90). What the sweep showed:

    * At this compute training is token-starved: a 256-wide 6-layer model (5.8M parameters)
      sees ~1.3M tokens in 8 minutes and stays near loss 4.8; a 128-wide one sees ~4M tokens
      and gets to ~3.3. Smaller, not larger.
    * Warm-up is the other big lever: with 2-6% warm-up runs sit on a plateau near loss 4.3-5;
      a *long* warm-up (25% of the run) and a high peak lr (6e-3) get through it. That is why
      warm-up is a fraction of the run here, not a fixed number of steps.
    * Six layers, not four: four layers scored about as well but would make the drafter's
      feature taps degenerate (the DFlash rule taps layers 1..L-3).
    """

    # --- tokenizer / corpus (used by ensure_tiny_target) ---
    vocab_size: int = 4096
    """Byte-level BPE vocabulary size, special tokens included."""
    corpus_max_files: int | None = None
    """Cap on corpus files per domain (tests and smoke runs only); None = whole stdlib."""

    # --- architecture: a transformers Qwen3 causal LM ---
    hidden_size: int = 128
    """Residual width; also the drafter's width (it reads the target's hidden states)."""
    num_layers: int = 6
    """Decoder layers (the drafter taps a rounded linspace of layers 1..num_layers-3)."""
    num_heads: int = 2
    """Query heads."""
    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention, like Qwen3)."""
    head_dim: int = 64
    """Per-head width."""
    intermediate_size: int = 256
    """SwiGLU MLP width (2x hidden scored at least as well as 3x at this budget, and is cheaper)."""
    max_position_embeddings: int = 1024
    """Rotary range configured for prompts + generation (training sequences are ``seq_len``)."""
    rope_theta: float = 10000.0
    """Rotary base; 1e4 suffices for a 1k context."""
    tie_word_embeddings: bool = True
    """Share input embedding and lm_head: at 4k vocab x 128 that is a third of the parameters."""

    # --- training ---
    seq_len: int = 256
    """Tokens per packed training sequence."""
    batch_size: int = 16
    """Sequences per optimizer step (8 or 4 were no better per token and slower per token on CPU)."""
    max_steps: int = 4000
    """Step cap; with ``time_budget_s`` the run ends at whichever comes first."""
    time_budget_s: float | None = 480.0
    """Wall-clock budget of the training loop (s); None = exactly ``max_steps`` (deterministic)."""
    min_steps: int = 0
    """Quality floor: train at least this many steps even past ``time_budget_s`` (the schedule
    stretches to fit). 0 = the budget is strict. On a machine shared with other CPU jobs the
    budget can buy only a few dozen steps, which leaves a useless target (loss ~7)."""
    lr: float = 6e-3
    """Peak AdamW learning rate (8e-3 was as good on average, 1e-2 diverged on one seed of two)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of ``lr``."""
    warmup_frac: float = 0.25
    """Linear warm-up, as a fraction of the run (of the time budget or of ``max_steps``)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (0.95: quicker to adapt than 0.999 in short runs)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seeds initialisation, batch order and the corpus split."""
    threads: int = 2
    """torch intra-op threads during training and evaluation (the most used; see ``adapt_threads``)."""
    adapt_threads: bool = True
    """In time-budgeted runs, re-check every 60 s whether 1 thread steps faster than ``threads``
    and keep the faster. On a CPU shared with other jobs, spinning OpenMP workers make 2 threads
    several times slower than 1 (measured: 0.45 s/step alone; 2.4-4 s/step with 2 threads and
    0.95 s/step with 1 beside one other busy process)."""

    # --- evaluation ---
    eval_max_tokens: int = 65_536
    """Held-out tokens scored per split (evenly spaced sequences), bounding eval time."""
    gen_prompts: int = 8
    """Validation prompts for the repetition measure."""
    gen_prompt_len: int = 128
    """Prompt tokens per prompt."""
    gen_new_tokens: int = 64
    """Greedy continuation length for distinct-n."""

    def qwen3_config(self, tokenizer: Any):  # -> transformers.Qwen3Config
        """The transformers ``Qwen3Config`` of this target for ``tokenizer``."""
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            tie_word_embeddings=self.tie_word_embeddings,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )


def _load_tokenizer(tokenizer: Any):
    """Accept a tokenizer object or a folder to load one from."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _tokenize_docs(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Token ids of ``texts`` concatenated, each document followed by eos (so packed sequences see
    document boundaries the way the target will see them in chat/eos-separated data)."""
    eos = tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids.extend(enc.ids)
        ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(ids, dtype=dtype)


def _cached_token_ids(jsonl: Path, tokenizer: Any, cache_dir: Path) -> np.ndarray:
    """``_tokenize_docs`` of a jsonl file, cached as .npy keyed by the file's and tokenizer's content."""
    vocab_key = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    key = hashlib.sha256(jsonl.read_bytes() + vocab_key.encode()).hexdigest()[:16]
    cache = cache_dir / f"{jsonl.stem}-{key}.npy"
    if cache.exists():
        return np.load(cache)
    ids = _tokenize_docs(read_jsonl_texts(jsonl), tokenizer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, ids)
    os.replace(tmp, cache)
    return ids


def _chunks(ids: np.ndarray, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len + 1`` tokens (input = [:-1], label = [1:]), shape (N, seq_len+1)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"only {len(ids)} tokens: too few for one sequence of {seq_len}")
    t = torch.from_numpy(ids[: n * seq_len + 1].astype(np.int64))
    return t.unfold(0, seq_len + 1, seq_len)


def _progress(steps_done: int, elapsed_s: float, cfg: TinyTargetConfig) -> float:
    """Fraction of the run done: the larger of the step and the time fraction (the time fraction
    is held back by ``min_steps`` so that floor is always reached). The run ends at 1."""
    progress = steps_done / cfg.max_steps
    if cfg.time_budget_s:
        by_time = elapsed_s / cfg.time_budget_s
        if cfg.min_steps > 0:
            by_time = min(by_time, steps_done / cfg.min_steps)
        progress = max(progress, by_time)
    return progress


class _ThreadTuner:
    """Keeps whichever of ``threads`` and 1 intra-op threads makes training steps faster.

    After ``first_probe_s`` and then every ``interval_s``, the next ``probe_steps`` real training
    steps run with the other thread count; if they were faster than the last ``probe_steps``
    steps, the tuner switches. No step is wasted, and a run adapts when a neighbour starts or
    stops competing for the cores. Cost when alone: ~1% of the steps run at the slower count.
    """

    def __init__(
        self,
        threads: int,
        enabled: bool,
        interval_s: float = 60.0,
        probe_steps: int = 3,
        first_probe_s: float = 10.0,
    ):
        self.current = max(1, threads)
        self.options = [self.current, 1] if enabled and self.current > 1 else [self.current]
        self.interval_s, self.probe_steps = interval_s, probe_steps
        self.recent: list[float] = []  # step times at the current count
        self.probe: tuple[int, list[float]] | None = None
        self.next_probe = time.perf_counter() + min(first_probe_s, interval_s)
        self.steps_at: dict[int, int] = {}
        torch.set_num_threads(self.current)

    def record(self, step_time: float) -> None:
        """Account one finished step; maybe start or conclude a probe."""
        now_threads = self.probe[0] if self.probe else self.current
        self.steps_at[now_threads] = self.steps_at.get(now_threads, 0) + 1
        if len(self.options) == 1:
            return
        if self.probe is None:
            self.recent = (self.recent + [step_time])[-self.probe_steps :]
            if time.perf_counter() >= self.next_probe and len(self.recent) == self.probe_steps:
                other = next(t for t in self.options if t != self.current)
                self.probe = (other, [])
                torch.set_num_threads(other)
            return
        other, times = self.probe
        times.append(step_time)
        if len(times) < self.probe_steps:
            return
        if sum(times) < sum(self.recent):
            log.info("%d thread(s) step faster than %d now: switching", other, self.current)
            self.current, self.recent = other, times
        torch.set_num_threads(self.current)
        self.probe = None
        self.next_probe = time.perf_counter() + self.interval_s


def _lr_factor(progress: float, cfg: TinyTargetConfig) -> float:
    """Linear warm-up times cosine decay to ``min_lr_ratio``, both over run progress in (0, 1].

    Progress comes from :func:`_progress`, so a time-budgeted run goes through its whole schedule
    whether the machine manages 500 or 5000 steps.
    """
    warm = min(1.0, progress / cfg.warmup_frac) if cfg.warmup_frac > 0 else 1.0
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


@torch.no_grad()
def _heldout_loss(model: torch.nn.Module, ids: np.ndarray, seq_len: int, max_tokens: int) -> float:
    """Mean next-token cross-entropy (nats) over evenly spaced sequences of ``ids``."""
    chunks = _chunks(ids, seq_len)
    n = max(1, min(len(chunks), max_tokens // seq_len))
    chunks = chunks[torch.linspace(0, len(chunks) - 1, n).round().long()]
    total, count = 0.0, 0
    for batch in chunks.split(16):
        logits = model(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def distinct_n(tokens: list[int], n: int) -> float:
    """Distinct-n: unique n-grams / n-grams in one sequence (1.0 = no repeats; loops -> near 0)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def _repetition_report(
    model: Any, tokenizer: Any, val_texts: list[str], cfg: TinyTargetConfig
) -> dict[str, Any]:
    """Greedy-continue ``gen_prompts`` prompts from ``val_texts``; distinct-2/4 of the continuations.

    The same measure on the *true* continuations is reported beside it: code repeats itself
    (indentation, ``self.``), so the reference, not 1.0, is what a healthy target should approach.
    """
    need = cfg.gen_prompt_len + cfg.gen_new_tokens
    docs = [
        ids
        for ids in (tokenizer.encode(t, add_special_tokens=False, verbose=False) for t in val_texts)
        if len(ids) >= need
    ]
    if not docs:
        return {}
    k = min(cfg.gen_prompts, len(docs))
    picks = [docs[round(i * (len(docs) - 1) / max(1, k - 1))] for i in range(k)]  # spread over the split
    gen_d2, gen_d4, ref_d2, ref_d4, samples = [], [], [], [], []
    for ids in picks:
        start = (len(ids) - need) // 3  # from inside the file: its header is boilerplate
        prompt = torch.tensor([ids[start : start + cfg.gen_prompt_len]])
        reference = ids[start + cfg.gen_prompt_len : start + need]
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=cfg.gen_new_tokens,
            min_new_tokens=cfg.gen_new_tokens,  # no early eos: every continuation is equally long
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        cont = out[0, prompt.shape[1] :].tolist()
        gen_d2.append(distinct_n(cont, 2))
        gen_d4.append(distinct_n(cont, 4))
        ref_d2.append(distinct_n(reference, 2))
        ref_d4.append(distinct_n(reference, 4))
        samples.append(tokenizer.decode(cont))
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {
        "distinct_2": mean(gen_d2),
        "distinct_4": mean(gen_d4),
        "reference_distinct_2": mean(ref_d2),
        "reference_distinct_4": mean(ref_d4),
        "greedy_samples": samples[:2],
    }


def train_target(
    corpus_dir: Path,
    tokenizer: Any,
    out_dir: Path,
    config: TinyTargetConfig | None = None,
) -> dict[str, Any]:
    """Train the tiny target on ``corpus_dir/train.jsonl`` and save it to ``out_dir``.

    Documents are concatenated with eos and packed into ``seq_len`` windows (token ids cached as
    .npy in ``out_dir.parent / "cache"``); a plain torch loop trains with AdamW, linear warm-up and
    cosine decay, gradient clipping, and a time budget with a step cap. Held-out loss is measured on
    ``validation.jsonl`` and ``shifted.jsonl``, and distinct-n of greedy continuations on validation
    prompts. Model and tokenizer are saved with ``save_pretrained`` (safetensors) beside
    ``tiny_target_report.json``. Everything is written into ``out_dir.tmp-*`` and renamed at the
    end, so a crash never leaves a half-written target behind.

    Args:
        corpus_dir: folder with the jsonl files of :func:`build_corpus`.
        tokenizer: a tokenizer from :func:`train_tokenizer`, or a folder holding one.
        out_dir: destination; an existing folder there is replaced.
        config: recipe; defaults to ``TinyTargetConfig()``.

    Returns:
        The report (also written to ``out_dir/tiny_target_report.json``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    cfg = config or TinyTargetConfig()
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    tokenizer = _load_tokenizer(tokenizer)
    t_start = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))  # tokenization and setup; the tuner takes over below
    try:
        cache_dir = out_dir.parent / "cache"
        train_ids = _cached_token_ids(corpus_dir / "train.jsonl", tokenizer, cache_dir)
        val_ids = _cached_token_ids(corpus_dir / "validation.jsonl", tokenizer, cache_dir)
        shifted_ids = _cached_token_ids(corpus_dir / "shifted.jsonl", tokenizer, cache_dir)
        train_chunks = _chunks(train_ids, cfg.seq_len)

        torch.manual_seed(cfg.seed)
        model_config = cfg.qwen3_config(tokenizer)
        model = AutoModelForCausalLM.from_config(model_config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = None
        n_params = sum(p.numel() for p in model.parameters())
        n_embed = model.get_input_embeddings().weight.numel()
        log.info(
            "tiny target: %.2fM parameters (%.2fM non-embedding), %d train tokens, %d sequences of %d",
            n_params / 1e6,
            (n_params - n_embed) / 1e6,
            len(train_ids),
            len(train_chunks),
            cfg.seq_len,
        )

        # Weight decay on matrices only: decaying norm gains just fights the normalisation.
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
        )

        # Epoch-wise permutations of the packed windows: no window repeats before all were seen.
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(train_chunks), generator=gen)
        cursor = 0

        model.train()
        losses: list[float] = []
        loss_curve: list[tuple[int, float]] = []
        log_every = max(1, cfg.max_steps // 100)
        step, progress = 0, 0.0
        # Thread-count changes alter float reduction order: only adapt in (already non-deterministic)
        # time-budgeted runs.
        tuner = _ThreadTuner(cfg.threads, enabled=cfg.adapt_threads and bool(cfg.time_budget_s))
        t_train = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, desc="tiny target", unit="step", dynamic_ncols=True, mininterval=2.0)
        while progress < 1.0:
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(train_chunks), generator=gen), 0
            batch = train_chunks[order[cursor : cursor + cfg.batch_size]]
            cursor += cfg.batch_size

            # Progress of this step (counted as done, so step 0 does not get lr = 0).
            t_step = time.perf_counter()
            lr_progress = _progress(step + 1, t_step - t_train, cfg)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(lr_progress, cfg)

            logits = model(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            tuner.record(time.perf_counter() - t_step)

            losses.append(loss.item())
            if step % log_every == 0 or step == 1:  # ~100 points: enough to see a plateau
                loss_curve.append((step, round(float(np.mean(losses[-log_every:])), 4)))
            # Re-estimate the total so the bar's ETA is right when the time budget binds first.
            progress = _progress(step, time.perf_counter() - t_train, cfg)
            bar.total = max(step, min(cfg.max_steps, round(step / max(progress, 1e-9))))
            bar.update(1)
            bar.set_postfix(
                loss=f"{np.mean(losses[-20:]):.3f}",
                lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                refresh=False,
            )
        bar.close()
        train_time = time.perf_counter() - t_train

        model.eval()
        t_eval = time.perf_counter()
        val_loss = _heldout_loss(model, val_ids, cfg.seq_len, cfg.eval_max_tokens)
        shifted_loss = _heldout_loss(model, shifted_ids, cfg.seq_len, cfg.eval_max_tokens)
        repetition = _repetition_report(
            model, tokenizer, read_jsonl_texts(corpus_dir / "validation.jsonl"), cfg
        )
        # The same on the shifted domain, where the drafters are evaluated.
        shifted_rep = _repetition_report(
            model, tokenizer, read_jsonl_texts(corpus_dir / "shifted.jsonl"), cfg
        )
        repetition.update({f"shifted_{k}": v for k, v in shifted_rep.items() if k != "greedy_samples"})
        eval_time = time.perf_counter() - t_eval

        def bits_per_byte(loss: float, ids: np.ndarray, jsonl: Path) -> float:
            """Loss in bits per UTF-8 byte: comparable across tokenizers/vocab sizes."""
            n_bytes = sum(len(t.encode()) + 1 for t in read_jsonl_texts(jsonl))  # +1: the eos separator
            return loss / math.log(2) * len(ids) / n_bytes

        report: dict[str, Any] = {
            "params": n_params,
            "non_embedding_params": n_params - n_embed,
            "steps": step,
            "tokens_seen": step * cfg.batch_size * cfg.seq_len,
            "train_tokens": int(len(train_ids)),
            "epochs": step * cfg.batch_size / len(train_chunks),
            "train_time_s": round(train_time, 1),
            "eval_time_s": round(eval_time, 1),
            "tokens_per_s": round(step * cfg.batch_size * cfg.seq_len / train_time, 1),
            "train_loss": float(np.mean(losses[-50:])),
            "val_loss": val_loss,
            "shifted_loss": shifted_loss,
            "val_bits_per_byte": bits_per_byte(val_loss, val_ids, corpus_dir / "validation.jsonl"),
            "shifted_bits_per_byte": bits_per_byte(shifted_loss, shifted_ids, corpus_dir / "shifted.jsonl"),
            **repetition,
            "loss_curve": loss_curve,
            "config": dataclasses.asdict(cfg),
            "torch": torch.__version__,
            "steps_per_thread_count": tuner.steps_at,
        }

        # Atomic publish: write everything into a sibling temp folder, then swap it in.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
        umask = _umask()
        try:
            model.save_pretrained(tmp_dir)
            _save_tokenizer(tokenizer, tmp_dir)
            report["wall_time_s"] = round(time.perf_counter() - t_start, 1)
            (tmp_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
            # mkdtemp (and safetensors' own temp files) are private (0700/0600): give the published
            # checkpoint the ordinary permissions of anything else written here.
            tmp_dir.chmod(0o777 & ~umask)
            for f in tmp_dir.iterdir():
                f.chmod(0o666 & ~umask)
            old = None
            if out_dir.exists():
                old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
                os.replace(out_dir, old)
            os.replace(tmp_dir, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    finally:
        torch.set_num_threads(prev_threads)

    log.info(
        "tiny target -> %s: %d steps in %.0f s, train %.3f, val %.3f, shifted %.3f, distinct-2/4 %.2f/%.2f",
        out_dir,
        step,
        train_time,
        report["train_loss"],
        val_loss,
        shifted_loss,
        report.get("distinct_2", float("nan")),
        report.get("distinct_4", float("nan")),
    )
    return report


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def ensure_tiny_target(
    root: Path = Path("checkpoints/tiny"),
    config: TinyTargetConfig | None = None,
    force: bool = False,
) -> Path:
    """Return ``root/target``, building corpus, tokenizer and target first if they are missing.

    Idempotent: when ``root/target/config.json`` and its report exist, nothing is rebuilt (the
    target is trained once and reused by every later stage). ``force=True`` rebuilds everything.

    Layout: ``root/corpus/*.jsonl``, ``root/tokenizer/``, ``root/cache/*.npy`` (token ids),
    ``root/target/`` (model + tokenizer + ``tiny_target_report.json``).
    """
    root = Path(root)
    target = root / "target"
    if not force and (target / "config.json").exists() and (target / REPORT_NAME).exists():
        log.info("reusing tiny target at %s", target)
        return target
    cfg = config or TinyTargetConfig()
    corpus = root / "corpus"
    build_corpus(corpus, seed=cfg.seed, max_files=cfg.corpus_max_files)
    tokenizer = train_tokenizer(corpus / "train.jsonl", root / "tokenizer", vocab_size=cfg.vocab_size)
    train_target(corpus, tokenizer, target, cfg)
    return target


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m metattt.tiny --root checkpoints/tiny [--force] [--time-budget S]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("checkpoints/tiny"), help="output root folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if a target exists")
    # One optional flag per config field; SUPPRESS keeps unset flags out of the namespace so the
    # dataclass defaults stay the single source of truth.
    defaults = TinyTargetConfig()
    for field in dataclasses.fields(TinyTargetConfig):
        flag = f"--{field.name.replace('_', '-')}"
        default = getattr(defaults, field.name)
        if field.name in ("corpus_max_files", "time_budget_s"):
            cast: Any = int if field.name == "corpus_max_files" else float
            kind: Any = lambda s, cast=cast: None if s.lower() == "none" else cast(s)  # noqa: E731
        elif isinstance(default, bool):
            kind = lambda s: s.lower() in ("1", "true", "yes")  # noqa: E731
        else:
            kind = type(default)
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=f"(default: {default})")
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TinyTargetConfig) if hasattr(args, f.name)
    }
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    target = ensure_tiny_target(args.root, TinyTargetConfig(**overrides), force=args.force)
    print(
        json.dumps(
            {k: v for k, v in json.loads((target / REPORT_NAME).read_text()).items() if k != "loss_curve"},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
