"""The typed recipe: every section of `recipes/<name>.yaml` is a dataclass here, one documented
field per key, with one name everywhere (the same number is called the same in the recipe, the
code and the files written: `meta.ttt` is `ttt_config.json`). Every stage reads the whole
`Recipe`, so one file drives prepare → distill → meta-train → eval → export.
`python -m metattt distill --print_config` prints every key.

Values are checked when the recipe is parsed (the `__post_init__` of each section), before any
stage builds a model or writes a file; a bad one raises `RecipeError` naming its key.

This module imports nothing else of metattt but atomic writes and the error class: every layer can
read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from metattt.atomic import atomic_write_json
from metattt.errors import RecipeError, rewrite_hint

META_ALGORITHMS = ("maml", "fomaml", "reptile")
CONTEXT_MODES = ("random", "prompt")
EVAL_CONDITIONS = ("target", "static", "meta_static", "ttt_zero", "ttt_meta", "online_zero", "online_meta")
ALPHA_RULES = ("fixed", "kl")


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    """Refuse a recipe value at parse time. `ok` is written as the condition that holds, so NaN fails it."""
    if not ok:
        raise RecipeError(f"{key}={value!r}: {what}")


def _positive(key: str, value: float, what: str = "a learning rate must be > 0") -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, key, value, what)


def _fraction(key: str, value: float, hi_open: bool = True) -> None:
    ok = 0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 1.0
    _require(ok, key, value, f"must be in [0, {'1)' if hi_open else '1]'}")


def _at_least(key: str, value: int | float, low: int | float) -> None:
    _require(value >= low, key, value, f"must be >= {low}")


def default_gamma(block_size: int) -> float:
    """DFlash's decay constants: γ = 7 for S = 16, 5 for 10, 4 for 8; else ~S/2.3."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, max(1.0, round(block_size / 2.3, 1)))


@dataclass
class RunConfig:
    """Where a recipe writes and how it is seeded."""

    name: str = "tiny"
    """Recipe name: outputs land in `{output_root}/{name}/`."""
    output_root: str = "checkpoints"
    """Parent folder of all recipe outputs."""
    seed: int = 0
    """Seed for weights, data order and anchor sampling."""
    resume: bool = True
    """Resume a stage from its last good checkpoint when one exists."""

    @property
    def out_dir(self) -> Path:
        return Path(self.output_root) / self.name


@dataclass
class CorpusConfig:
    """The embedded corpus (metattt.tiny.corpus): built from this machine's Python installation."""

    dir: str = "checkpoints/tiny/corpus"
    """Folder of the per-domain jsonl files (`<domain>.train.jsonl`, `<domain>.heldout.jsonl`, `new_to_both.jsonl`)."""
    seed: int = 0
    """Salts the held-out choice; the target shipped in data/ was trained on the corpus of seed 0."""
    build: bool = False
    """Build the corpus into `dir` when it is missing (the tiny recipe: every stage reads it)."""


@dataclass
class TargetConfig:
    """The frozen target model."""

    path: str = "checkpoints/tiny/target"
    """Local transformers checkpoint folder (or a hub id `org/name` where a network exists)."""
    layer_ids: list[int] | None = None
    """Decoder layers whose outputs the drafter reads; None: DFlash's rule (linspace 1..L-3)."""
    dtype: str = "auto"
    """Weights dtype: auto, float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel for the target: sdpa, eager, flash_attention_2."""


@dataclass
class TinyTargetConfig:
    """Architecture and training recipe of the embedded target.

    Chosen from a short sweep at equal training tokens (`scripts/tiny_target_sweep.py`, results in
    the README's "The embedded world" section); the step count, not a wall-clock budget, ends
    training, so the model is the same on an idle and on a loaded machine.
    """

    # --- tokenizer ---
    vocab_size: int = 4096
    """Byte-level BPE vocabulary size, special tokens included."""

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
    """SwiGLU MLP width."""
    max_position_embeddings: int = 2048
    """Rotary range configured for prompts + generation."""
    rope_theta: float = 10000.0
    """Rotary base."""
    tie_word_embeddings: bool = True
    """Share input embedding and lm_head (a large share of a small model's parameters)."""

    # --- training ---
    seq_len: int = 1280
    """Tokens per training sequence: at least the evaluation's prompt + generation."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    max_steps: int = 6000
    """Optimizer steps; the run ends here (never on a clock)."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor, as a fraction of ``lr``."""
    warmup_steps: int = 500
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    bf16: bool = True
    """bfloat16 autocast for the forward (fp32 master weights and optimizer state)."""
    compile: bool = True
    """torch.compile the training step (about a minute of compilation, then faster steps)."""
    seed: int = 0
    """Seeds initialisation, batch order and the corpus split."""
    threads: int = 2
    """torch intra-op threads."""
    checkpoint_every: int = 250
    """Steps between resumable training states (a crash loses at most this many)."""
    log_every: int = 50
    """Steps between progress lines."""

    # --- evaluation (the report) ---
    eval_max_tokens: int = 131_072
    """Held-out tokens scored per domain for the report."""
    gen_prompts: int = 12
    """Prompts per domain for the repetition measure (greedy and sampled distinct-n)."""
    gen_prompt_len: int = 256
    """Prompt tokens per prompt."""
    gen_new_tokens: int = 128
    """Continuation length for distinct-n."""

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

    def fingerprint(self) -> str:
        """What a resumable training state must match (the evaluation fields do not matter)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if not k.startswith(("gen_", "eval_")) and k not in ("log_every", "threads", "checkpoint_every")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DrafterConfig:
    """The drafter to build (its architecture config is metattt.models' BlockDrafterConfig /
    ARDrafterConfig). Unset dimensions follow the target (as published DFlash drafters do)."""

    kind: str = "block"
    """block (DFlash-style: one forward drafts a block) or autoregressive (metattt.models.ar_drafter:
    one token per forward, cross-attention over the target features; block_size - 1 drafts per step).
    Ignored with init_from: the folder's config.json (`architectures`) decides."""
    init_from: str | None = None
    """A drafter folder to start from: DFlash layout (e.g. a released one) or an autoregressive drafter."""
    num_hidden_layers: int = 5
    """Drafter decoder layers (also the number of tapped target layers by default)."""
    block_size: int = 16
    """Tokens per block: the anchor + block_size-1 drafts (for both kinds: what one verification checks)."""
    intermediate_size: int | None = None
    """MLP width; None: the target's."""
    num_attention_heads: int | None = None
    """None: the target's."""
    num_key_value_heads: int | None = None
    """None: the target's."""
    head_dim: int | None = None
    """None: the target's."""
    mask_token: str = "<|mask|>"
    """Token the blocks are filled with; must exist in the target's tokenizer (block kind only)."""
    attn_implementation: str = "sdpa"
    """sdpa or eager (meta-training with second-order gradients switches to eager itself)."""

    def __post_init__(self) -> None:
        _at_least("drafter.num_hidden_layers", self.num_hidden_layers, 1)
        _require(self.block_size >= 2, "drafter.block_size", self.block_size,
                 "a block is the anchor plus at least one draft: use >= 2")


@dataclass
class DataConfig:
    """Token sequences for distillation and meta-training (metattt.data.datamodule.SequenceDataModule)."""

    train_files: str | list[str] | None = None
    """Training data: a .jsonl/.json/.parquet/.txt file, a glob, a folder (also an Arrow folder written by
    `prepare`), a list of these, or a hub dataset name."""
    val_files: str | list[str] | None = None
    """Validation data in the same forms; when given, `val_fraction` is ignored."""
    val_fraction: float = 0.02
    """Share of the training records held out for validation when `val_files` is not given (0: none)."""
    max_length: int = 512
    """Tokens per sequence: packed chunks have exactly this length, unpacked records are truncated to it."""
    min_length: int = 0
    """Drop sequences shorter than this (only matters without packing)."""
    pack: bool = True
    """Concatenate documents (separated by eos) into max_length chunks; otherwise one record per sequence."""
    batch_size: int = 8
    """Sequences per batch (per device)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    chat_template_kwargs: dict | None = None
    """Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3."""
    max_records: int | None = None
    """Keep only the first this many records of each source (quick runs)."""
    hub_split: str = "train"
    """Split to read when the files name a hub dataset."""
    cache_dir: str | None = None
    """datasets cache folder (default: HF_DATASETS_CACHE); shared storage on a cluster lets ranks reuse it."""
    num_proc: int | None = None
    """Processes for reading and tokenizing (None: in-process)."""
    feature_cache: str | None = None
    """A hidden-state cache folder (written by `prepare` with prepare.cache_features): training reads the
    target's features from it instead of running the target."""

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"data.max_length must be positive, got {self.max_length}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.min_length", self.min_length, 0)
        _at_least("data.num_workers", self.num_workers, 0)
        if self.max_records is not None:
            _at_least("data.max_records", self.max_records, 1)


@dataclass
class TrainerConfig:
    """Hardware and launch settings shared by every stage (passed to lightning.Trainer)."""

    accelerator: str = "auto"
    """cpu, gpu, auto."""
    devices: int | str = "auto"
    """Devices per node."""
    num_nodes: int = 1
    """Nodes (Slurm: match --nodes)."""
    strategy: str = "auto"
    """auto, ddp, fsdp, ..."""
    precision: str = "32-true"
    """32-true on CPU; bf16-mixed on GPUs."""
    log_every_n_steps: int = 10
    """Logging interval in optimizer steps."""
    enable_progress_bar: bool = True
    """Show progress: a bar on a terminal, log lines every `progress_every_s` otherwise (Slurm logs, pipes)."""
    progress_every_s: float = 30.0
    """Without a terminal: seconds between progress lines (step, metrics, it/s, elapsed, eta)."""
    deterministic: bool = False
    """torch deterministic algorithms (slower)."""


@dataclass
class DistillConfig:
    """Stage 1: distillation of the drafter (DFlash recipe defaults)."""

    max_epochs: int = 6
    """Epochs over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: no limit)."""
    lr: float = 6e-4
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.04
    """Fraction of steps with linear warm-up before the cosine decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    accumulate_grad_batches: int = 1
    """Gradient accumulation."""
    num_anchors: int = 512
    """Blocks sampled per sequence."""
    gamma: float | None = None
    """Position decay exp(-(k-1)/γ); None: 7 for block 16, 5 for 10, 4 for 8."""
    kl_weight: float = 0.0
    """Loss = (1 - w)·CE(next tokens) + w·KL(target ‖ drafter) per draft; 0: CE only (DFlash). The
    target's distribution comes from its own forward, so w > 0 cannot read data.feature_cache."""
    val_check_interval: int | float = 1.0
    """Validate every N steps (int) or fraction of an epoch (float)."""
    limit_val_batches: int | float = 1.0
    """Validation batches per check."""
    checkpoint_every_n_steps: int = 200
    """Write `last.ckpt` every N optimizer steps (plus at every epoch end)."""

    def __post_init__(self) -> None:
        _positive("distill.lr", self.lr)
        _at_least("distill.weight_decay", self.weight_decay, 0)
        _fraction("distill.warmup_ratio", self.warmup_ratio)
        _at_least("distill.grad_clip", self.grad_clip, 0)
        _at_least("distill.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _at_least("distill.num_anchors", self.num_anchors, 1)
        _at_least("distill.max_steps", self.max_steps, -1)
        _at_least("distill.checkpoint_every_n_steps", self.checkpoint_every_n_steps, 1)
        if self.gamma is not None:
            _positive("distill.gamma", self.gamma, "the position decay must be > 0 (or null: by block size)")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise RecipeError(f"distill.kl_weight must be in [0, 1] (0: CE only, 1: KL only), got {self.kl_weight}")


@dataclass
class LoraConfig:
    """LoRA adapters on the drafter (through peft): the fast weights of test-time training."""

    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout (keep 0: the inner loop should be deterministic)."""
    target_modules: list[str] | None = None
    """Module names that carry LoRA; None: the drafter kind's default (block: fc, q_proj, k_proj, v_proj;
    autoregressive: cross_q_proj, gate_proj, up_proj, down_proj)."""

    def __post_init__(self) -> None:
        _at_least("lora.r", self.r, 1)
        _positive("lora.alpha", self.alpha, "the LoRA scale alpha / r must be > 0")
        _fraction("lora.dropout", self.dropout)


@dataclass
class TTTObjective:
    """Weights of the inner-loop (test-time training) loss terms."""

    block: float = 1.0
    """Block prediction on the context, as at inference (the default objective)."""
    clm: float = 0.0
    """Next-token CE on every context position (blocks of 2: anchor + one draft)."""
    feature: float = 0.0
    """Reconstruct the target's last tapped hidden state from the drafter's, through a learned head."""
    attn_entropy: float = 0.0
    """Attention-entropy regularizer (eager attention only): + weight × mean entropy."""

    def __post_init__(self) -> None:
        for name in ("block", "clm", "feature", "attn_entropy"):
            _at_least(f"meta.ttt.objective.{name}", getattr(self, name), 0)


@dataclass
class TTTOnlineConfig:
    """Online updates meta-training trains the init for (`meta.ttt.online`, exported in
    `ttt_config.json` as `online`): after the context's inner steps the continuation is walked chunk
    by chunk, each chunk scored with the fast weights from before training on it, then an update on
    it, as decoding's online TTT (`eval.online`, metattt.ttt.online) does every `online.every`
    verification steps. The updates use `meta.ttt`'s lr(s), clip and objective."""

    chunk: int = 0
    """Continuation tokens between two updates (0: off; the continuation is scored once, after the context
    steps). `online.every` verification steps commit about every × τ tokens: set it to that."""
    steps: int = 1
    """Inner SGD steps per update, from the current fast weights (as `online.steps`)."""
    window: int = 64
    """An update trains on blocks anchored in the most recent this many tokens, every label already seen
    (as `online.window`); at least the block size."""
    num_anchors: int = 16
    """Blocks per update from that window (as `online.num_anchors`)."""
    max_chunks: int = 8
    """Continuation chunks per task at most: each adds `steps` inner steps to differentiate through; the
    outer loss scores only the blocks anchored in them."""

    def check(self, key: str) -> None:
        _at_least(f"{key}.chunk", self.chunk, 0)
        _at_least(f"{key}.steps", self.steps, 1)
        _at_least(f"{key}.window", self.window, 2)
        _at_least(f"{key}.num_anchors", self.num_anchors, 1)
        _at_least(f"{key}.max_chunks", self.max_chunks, 1)

    @property
    def enabled(self) -> bool:
        return self.chunk > 0


@dataclass
class TTTConfig:
    """What test-time training does on a prompt; meta-training exports it beside the LoRA init."""

    steps: int = 3
    """Inner SGD steps."""
    lr: float = 1e-2
    """Inner learning rate (scalar)."""
    learned_lrs: dict[str, float] | None = None
    """Per-tensor inner lrs (Meta-SGD); overrides `lr` where given."""
    clip: float | None = 1.0
    """Global-norm clip of inner gradients (None or <= 0: off)."""
    num_anchors: int = 64
    """Blocks sampled from the prompt per inner step."""
    gamma: float | None = None
    """Position decay exp(-(k-1)/γ) of the block loss; None: by block size (7 for 16, 5 for 10, 4 for 8)."""
    objective: TTTObjective = field(default_factory=TTTObjective)
    online: TTTOnlineConfig = field(default_factory=TTTOnlineConfig)
    """Online updates during decoding the init is meta-trained for (chunk 0: none, prefill TTT only)."""

    def __post_init__(self) -> None:
        self.check("meta.ttt")

    def check(self, key: str) -> None:
        """Refuse what TTT cannot run with; `key` is where the settings came from (a recipe section
        or a file). A negative inner lr would make TTT ascend its loss."""
        _at_least(f"{key}.steps", self.steps, 0)
        _positive(f"{key}.lr", self.lr, "an inner learning rate must be > 0 (a negative one ascends the loss)")
        lrs = self.learned_lrs or {}
        for name, lr in (lrs.items() if isinstance(lrs, dict) else enumerate(lrs)):
            _positive(f"{key}.learned_lrs[{name!r}]", lr, "a learned inner learning rate must be > 0 "
                      "(a negative one ascends the loss)")
        _at_least(f"{key}.num_anchors", self.num_anchors, 1)
        if self.gamma is not None:
            _positive(f"{key}.gamma", self.gamma, "the position decay must be > 0 (or null: by block size)")
        self.online.check(f"{key}.online")

    def lr_for(self, names: list[str]) -> float | dict[str, torch.Tensor]:
        if not self.learned_lrs:
            return self.lr
        return {n: torch.tensor(self.learned_lrs.get(n, self.lr)) for n in names}

    def gamma_for(self, block_size: int) -> float:
        return self.gamma if self.gamma is not None else default_gamma(block_size)

    def save(self, path: Path, **extra) -> None:
        atomic_write_json(Path(path), {**asdict(self), **extra})

    @classmethod
    def load(cls, path: Path) -> TTTConfig:
        """Read `ttt_config.json`; settings TTT cannot run with (e.g. a negative learned lr) are
        refused, naming the file."""
        try:
            d = json.loads(Path(path).read_text())
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            known["objective"] = TTTObjective(**known.get("objective", {}))
            # files written before online meta-training have no `online`: prefill TTT only
            known["online"] = TTTOnlineConfig(**known.get("online", {}))
            return cls(**known)
        except RecipeError as e:
            # written by a meta-train whose learned lrs were free to go negative, or edited by hand
            raise RecipeError(f"{path}: {str(e).replace('meta.ttt.', '')}; `metattt meta-train` writes it: run "
                              "meta-train again") from e
        except (ValueError, TypeError) as e:
            raise RecipeError(f"{path} is not a readable ttt_config.json ({e}): {rewrite_hint(path)}") from e


@dataclass
class TTTOverrides:
    """Test-time training settings that replace the exported ones (`ttt_config.json`) for one run;
    None keeps the exported value. Same names as `meta.ttt`."""

    steps: int | None = None
    """Inner SGD steps."""
    lr: float | None = None
    """Scalar inner lr (replaces learned Meta-SGD lrs)."""
    num_anchors: int | None = None
    """Blocks of the prompt per step. TTT's cost is mostly these blocks' rows of the vocabulary head."""

    def check(self, key: str) -> None:
        if self.steps is not None:
            _at_least(f"{key}.steps", self.steps, 0)
        if self.lr is not None:
            _positive(f"{key}.lr", self.lr, "an inner learning rate must be > 0 (a negative one ascends the loss)")
        if self.num_anchors is not None:
            _at_least(f"{key}.num_anchors", self.num_anchors, 1)

    def apply(self, ttt: TTTConfig) -> TTTConfig:
        out = TTTConfig(**{**ttt.__dict__})
        if self.steps is not None:
            out.steps = self.steps
        if self.lr is not None:
            out.lr, out.learned_lrs = self.lr, None
        if self.num_anchors is not None:
            out.num_anchors = self.num_anchors
        return out


@dataclass
class OnlineConfig:
    """Online TTT during decoding (metattt.ttt.online): the drafter keeps learning from the tokens the
    target commits, within one request, from the weights it started decoding with. `steps`, `window`
    and `num_anchors` left at None take what the meta-learned init was trained for (`ttt_config.json`
    `online`, when it was meta-trained with online chunks), else 1 / 64 / 16."""

    every: int = 4
    """An update after every this many verification steps (0: off)."""
    steps: int | None = None
    """Inner SGD steps per update, from the current fast weights."""
    window: int | None = None
    """Blocks are anchored in the most recent this many committed tokens."""
    num_anchors: int | None = None
    """Blocks per update from that window."""
    prompt_anchors: int = 0
    """Blocks of the prompt mixed into every update."""
    lr: float | None = None
    """Scalar inner lr of the updates; None: the TTT settings' (learned lrs where exported)."""
    detach_context: bool = False
    """Read the drafter's context keys/values of positions before the window from the decoding
    cache as constants: an update's cost stops growing with the context, but LoRA on the modules
    that compute them (`fc`, `k_proj`, `v_proj`) learns only through the window's positions (the
    forward is unchanged). Where LoRA is on none of those modules the cache is read in full either
    way, which is exact."""

    def __post_init__(self) -> None:
        self.check("eval.online")

    def check(self, key: str) -> None:
        _at_least(f"{key}.every", self.every, 0)
        for name, low in (("steps", 1), ("window", 2), ("num_anchors", 1)):
            if getattr(self, name) is not None:
                _at_least(f"{key}.{name}", getattr(self, name), low)
        _at_least(f"{key}.prompt_anchors", self.prompt_anchors, 0)
        if self.lr is not None:
            _positive(f"{key}.lr", self.lr, "an inner learning rate must be > 0 (a negative one ascends the loss)")

    def resolved(self, trained: TTTOnlineConfig) -> OnlineConfig:
        """Every None filled: from `trained` (the exported init's `online`) when the init was
        meta-trained for online updates, else from the defaults of `TTTOnlineConfig`."""
        source = trained if trained.enabled else TTTOnlineConfig()
        return replace(self, **{n: getattr(source, n) for n in ("steps", "window", "num_anchors")
                                if getattr(self, n) is None})


@dataclass
class MetaConfig:
    """Stage 2: bi-level meta-training of the LoRA initialization. `ttt` is what the inner loop does
    (and what test-time training does with the exported init): meta-train writes it to
    `meta_lora/ttt_config.json` with the learned lrs."""

    algorithm: str = "maml"
    """maml (exact second order, TTT-E2E), fomaml (first order) or reptile."""
    ttt: TTTConfig = field(default_factory=TTTConfig)
    """The inner loop: steps (reptile needs > 1), lr (the initial value of learned lrs with learn_inner_lr),
    clip, num_anchors (blocks sampled from the context), gamma, objective, online (the continuation walked
    chunk by chunk with updates between chunks: meta-training for online TTT during decoding)."""
    inner_lr_warmup_steps: int = 0
    """Outer steps over which the inner lr ramps linearly from 0 (TTT-E2E warms it up)."""
    learn_inner_lr: bool = False
    """Meta-SGD: one learned inner lr per LoRA tensor."""
    outer_anchors: int = 64
    """Blocks sampled from the continuation for the outer loss."""
    context: str = "random"
    """Where a task's context ends: random (a point drawn in [context_min, context_max]) or prompt (at the
    first trained token: the prompt the target continued; the inner loss then trains on all its tokens,
    as TTT on a prompt does)."""
    context_min: int = 64
    """Shortest context (tokens) of a context/continuation split."""
    context_max: int = 192
    """Longest context (tokens)."""
    prequential: bool = False
    """TTT-E2E's prequential outer loss over the context: each inner step trains on the next context chunk,
    scored before it, and those scores are averaged with the continuation's (every algorithm). With
    `meta.ttt.online` the continuation, too, is scored chunk by chunk: every chunk of the sequence is then
    scored with the weights from before training on it."""
    checkpoint_inner_steps: bool = False
    """Recompute each inner step in the backward (saves memory of second-order graphs)."""
    batch_tasks: bool = True
    """Adapt all tasks of a batch at once (one forward per inner step, each task with its own fast weights,
    metattt.ttt.meta); false: one task after another. Same meta-gradient either way; the attention-entropy
    objective always goes task by task."""
    update_base: bool = False
    """Also train the drafter's base weights in the outer loop."""
    lr: float = 1e-3
    """Outer AdamW learning rate."""
    weight_decay: float = 0.0
    """Outer AdamW weight decay."""
    warmup_ratio: float = 0.05
    """Outer warm-up fraction before cosine decay."""
    grad_clip: float = 1.0
    """Outer global-norm gradient clip."""
    max_epochs: int = 1
    """Epochs."""
    max_steps: int = -1
    """Outer steps (-1: no limit)."""
    val_check_interval: int | float = 1.0
    """Validate every N steps (int) or fraction of an epoch (float)."""
    limit_val_batches: int | float = 1.0
    """Validation batches per check."""
    checkpoint_every_n_steps: int = 50
    """Write last.ckpt every N outer steps."""
    drafter_path: str | None = None
    """Drafter to meta-train (DFlash layout); None: {out}/drafter, distilled first if missing."""

    def __post_init__(self) -> None:
        if self.algorithm not in META_ALGORITHMS:
            raise ValueError(f"meta.algorithm={self.algorithm!r}: choose one of {META_ALGORITHMS}")
        if self.algorithm == "reptile" and self.ttt.steps < 2:
            raise ValueError("reptile needs meta.ttt.steps > 1 (with k = 1 it is joint training)")
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"meta.context={self.context!r}: choose one of {CONTEXT_MODES}")
        _positive("meta.lr", self.lr)
        _at_least("meta.weight_decay", self.weight_decay, 0)
        _fraction("meta.warmup_ratio", self.warmup_ratio)
        _at_least("meta.grad_clip", self.grad_clip, 0)
        _at_least("meta.inner_lr_warmup_steps", self.inner_lr_warmup_steps, 0)
        _at_least("meta.outer_anchors", self.outer_anchors, 1)
        _at_least("meta.context_min", self.context_min, 1)
        _require(self.context_max >= self.context_min, "meta.context_max", self.context_max,
                 f"must be >= meta.context_min={self.context_min}")
        _at_least("meta.max_steps", self.max_steps, -1)
        _at_least("meta.checkpoint_every_n_steps", self.checkpoint_every_n_steps, 1)


@dataclass
class PrepareConfig:
    """`python -m metattt prepare`: chat data → (optionally target-regenerated) → tokenized Arrow
    folders that `data.train_files` / `data.val_files` read; optionally the hidden-state cache."""

    train_files: str | list[str] | None = None
    """Raw chat records: jsonl/json/parquet files, globs, folders (or a hub dataset where a network exists).
    `messages` (role/content), ShareGPT `conversations` (from/value), UltraChat `data` (alternating
    user/assistant strings) or `prompt` + `response`. None: nothing to prepare (only the feature cache)."""
    val_files: str | list[str] | None = None
    """Raw validation records, same forms; None: no validation folder is written."""
    output_dir: str | None = None
    """Where the prepared `train/` and `validation/` Arrow folders go; None: {out}/data."""
    max_records: int | None = None
    """Keep only the first N records of each source (smoke runs)."""
    max_val_records: int | None = None
    """Keep only the first N records of each validation source (regenerating a whole test set is costly)."""
    enable_thinking: bool | None = None
    """Qwen3: passed to the chat template as `enable_thinking`. false: the empty `<think></think>`
    block is part of the prompt (not trained), answers only; true: the think block is the
    assistant's (trained). None: not passed (the template's default; Qwen3's is thinking on)."""
    shard_size: int = 1000
    """Records per shard: finished shards are kept on disk and skipped when a run is repeated."""
    overwrite: bool = False
    """Rebuild even if the output exists with different settings (otherwise that is an error)."""
    records: str = "chat"
    """chat: chat records whose assistant turns are (re)generated; text: plain-text records (`text`), each
    window of `text_prompt_lens` tokens continued by the target for `max_new_tokens` tokens (needs
    regenerate=transformers); the loss covers the target's continuation only."""
    text_prompt_lens: list[int] = field(default_factory=lambda: [256])
    """records=text: prompt lengths (tokens), cycled over windows."""
    windows_per_doc: int = 1
    """records=text: non-overlapping prompt windows taken from one document at most."""
    greedy_fraction: float = 0.5
    """records=text: share of prompts continued greedily; the rest are sampled at `temperature`."""
    regenerate: str = "none"
    """Rewrite assistant turns with the target's own outputs: none, transformers (batched
    `generate` on the local target) or endpoint (an OpenAI-compatible server: vLLM, SGLang)."""
    regenerate_turns: str = "all"
    """all: every assistant turn, in order, each conditioned on the regenerated history; last:
    only the final one (the history is kept from the data)."""
    max_new_tokens: int = 2048
    """Longest regenerated turn; a turn that hits it is 'truncated' (see drop_truncated)."""
    temperature: float = 0.0
    """Sampling temperature of regeneration (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of regeneration."""
    drop_truncated: bool = True
    """Skip conversations whose regenerated turn hit max_new_tokens (counted in the summary)."""
    generate_batch_size: int = 16
    """Prompts per `generate` call (transformers backend; left-padded)."""
    endpoint_url: str = "http://127.0.0.1:30000/v1"
    """Base URL of the OpenAI-compatible server (POST {url}/chat/completions)."""
    endpoint_model: str | None = None
    """Model name the server serves; None: the first one {url}/models lists."""
    endpoint_concurrency: int = 32
    """Requests in flight at once (a thread pool)."""
    endpoint_timeout_s: float = 600.0
    """Timeout of one request."""
    endpoint_retries: int = 3
    """Retries of a failed request (connection errors, 429, 5xx), with exponential back-off."""
    api_key_env: str | None = None
    """Name of an environment variable holding the server's API key (sent as a Bearer token)."""
    cache_features: bool = False
    """Also write the offline hidden-state cache of the `data` section's sequences to
    `data.feature_cache` (set that key; training then reads features instead of running the target)."""
    cache_dtype: str = "bfloat16"
    """dtype of the cached features (bfloat16 matches a bf16 target exactly; float32 for fp32 targets)."""
    cache_batch_size: int = 4
    """Sequences per target forward while writing the cache."""
    cache_shard_mb: int = 4096
    """Approximate size of one feature-cache shard file (MB)."""


@dataclass
class EvalConfig:
    """Stage 3: prefill TTT + speculative decoding + τ."""

    splits: dict[str, str | list[str]] = field(default_factory=lambda: {
        "in_domain": ["checkpoints/tiny/corpus/python.heldout.jsonl", "checkpoints/tiny/corpus/prose.heldout.jsonl"],
        "drafter_shifted": "checkpoints/tiny/corpus/c.heldout.jsonl",
        "new_to_both": "checkpoints/tiny/corpus/new_to_both.jsonl",
    })
    """Split name -> data file(s) (jsonl/parquet/txt; text or chat records)."""
    num_prompts: int = 16
    """Prompts per split."""
    prompt_len: int = 128
    """Prompt tokens (a window of each record, at a seeded offset)."""
    max_new_tokens: int = 64
    """Tokens generated per prompt."""
    conditions: list[str] = field(default_factory=lambda: ["target", "static", "ttt_zero", "ttt_meta"])
    """Any of: target, static, meta_static, ttt_zero, ttt_meta."""
    temperature: float = 0.0
    """0: greedy; > 0: sampling (lossless with either rule)."""
    top_p: float = 1.0
    """Nucleus filter applied identically to target and drafter."""
    rule: str = "speculative"
    """Sampling protocol: speculative (sampled drafts, accept with min(1, p/q)), exact (sampled drafts,
    accept iff equal to the target's own sample) or dflash (DFlash's: argmax drafts + exact)."""
    ttt: TTTOverrides = field(default_factory=TTTOverrides)
    """TTT settings replacing the exported ones (meta_lora/ttt_config.json): steps, lr, num_anchors."""
    grid_steps: list[int] | None = None
    """Optional grid over TTT steps (adds conditions ttt_*@steps=k)."""
    grid_lrs: list[float] | None = None
    """Optional grid over inner lrs (adds conditions ttt_*@lr=x)."""
    drafter_path: str | None = None
    """Drafter folder; None: {out}/drafter (or meta_drafter when meta-training updated the base)."""
    meta_lora_path: str | None = None
    """Meta-learned adapter; None: {out}/meta_lora."""
    output_dir: str | None = None
    """Where the report goes; None: {out}/eval."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """Online TTT of the online_zero / online_meta conditions (prefill TTT, then updates while decoding)."""
    position_bucket: int = 64
    """τ is also reported per bucket of this many generated tokens (does τ climb as generation goes on?)."""

    def __post_init__(self) -> None:
        _at_least("eval.num_prompts", self.num_prompts, 1)
        _at_least("eval.prompt_len", self.prompt_len, 1)
        _at_least("eval.max_new_tokens", self.max_new_tokens, 1)
        _at_least("eval.temperature", self.temperature, 0)
        _require(0 < self.top_p <= 1, "eval.top_p", self.top_p, "must be in (0, 1]")
        unknown = [c for c in self.conditions if c not in EVAL_CONDITIONS]
        _require(not unknown, "eval.conditions", self.conditions, f"{unknown} unknown: choose from {EVAL_CONDITIONS}")
        for k in self.grid_steps or []:
            _at_least("eval.grid_steps", k, 0)
        for lr in self.grid_lrs or []:
            _positive("eval.grid_lrs", lr, "every inner learning rate must be > 0")
        self.ttt.check("eval.ttt")


@dataclass
class GuidedConfig:
    """Draft-guided decoding on context-learning tasks: category × temperature × α × TTT (+ null control)."""

    tasks: str | None = None
    """Task file(s) or folder (metattt.clbench format, or public CL-bench JSONL rows); None: synthetic tasks."""
    synthetic_categories: list[str] = field(default_factory=lambda: ["python", "glossary", "cipher", "rules"])
    """Synthetic categories when `tasks` is None: python, glossary, cipher, rules."""
    synthetic_tasks: int = 4
    """Synthetic tasks per category."""
    synthetic_questions: int = 3
    """Questions per synthetic task (1..8)."""
    max_tasks: int | None = None
    """Use at most this many tasks (after loading), per category."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.5])
    """Guidance strengths α (0 = the target alone)."""
    alpha_rule: str = "fixed"
    """fixed: α_t = α; kl: α_t = α · min(1, KL(p_draft ‖ p_target) / kl_tau)."""
    kl_tau: float = 1.0
    """KL (nats) at which the kl rule reaches the full α."""
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    """Decoding temperatures (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus filter (applied to the guided logits)."""
    samples: int = 1
    """Samples per question at temperature > 0 (greedy runs once)."""
    ttt_modes: list[bool] = field(default_factory=lambda: [False, True])
    """Drafter conditions: False = its init LoRA as is, True = TTT on the prompt."""
    null_control: bool = True
    """Add the noise control (matched scale, same α_t) for every α > 0 and TTT setting."""
    refine_rounds: int = 0
    """> 0: add `refine` conditions (TTT on, every α > 0): TTT on prompt + response, generate again, r times."""
    ttt_init: str = "meta"
    """LoRA the drafter starts from: meta (meta-learned, when exported) or zero (peft's B = 0)."""
    ttt: TTTOverrides = field(default_factory=TTTOverrides)
    """TTT settings replacing the exported ones: steps, lr, num_anchors."""
    max_new_tokens: int = 24
    """Tokens per answer (rubric-graded tasks such as CL-bench need far more than checkable ones)."""
    answer_logprob: bool = True
    """Also score the reference answer teacher-forced: mean log p_guided per answer token (finer than accuracy)."""
    stop_at_line: bool = True
    """Stop once the first non-empty line of the answer is complete (when its check reads only that line)."""
    max_prompt_tokens: int = 768
    """Longer prompts keep their last tokens (the question is at the end)."""
    judge: str = "auto"
    """rule (checkable answers), endpoint (rubrics, OpenAI-compatible), auto (rule where checkable, else endpoint)."""
    judge_base_url: str | None = None
    """OpenAI-compatible endpoint of the rubric judge, e.g. http://127.0.0.1:8000/v1."""
    judge_model: str = "gpt-4o-mini"
    """Model name sent to the endpoint judge."""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (unset: no Authorization header)."""
    judge_timeout_s: float = 60.0
    """Per-request timeout of the endpoint judge."""
    cpu_threads: int | None = None
    """torch intra-op threads when running on the CPU (None: torch's default). Token-by-token decoding
    of a small model is latency bound: 1 thread is as fast, and far faster when cores are shared."""
    drafter_path: str | None = None
    """Drafter folder; None: as eval (the meta adapter's base, or {out}/drafter)."""
    meta_lora_path: str | None = None
    """Meta-learned adapter; None: {out}/meta_lora."""
    allow_ttt_on_clbench_rows_despite_licence: bool = False
    """CL-bench's licence allows evaluation only: TTT (guided.ttt_modes with true, or refine_rounds > 0)
    on its rows adapts the drafter's parameters on them, which it forbids, so such a run is refused.
    true runs it anyway: only where you hold other rights to the data."""

    def __post_init__(self) -> None:
        _positive("guided.kl_tau", self.kl_tau, "must be > 0 (the KL, in nats, at which the kl rule reaches α)")
        _require(0 < self.top_p <= 1, "guided.top_p", self.top_p, "must be in (0, 1]")
        _at_least("guided.samples", self.samples, 1)
        _at_least("guided.refine_rounds", self.refine_rounds, 0)
        _at_least("guided.max_new_tokens", self.max_new_tokens, 1)
        _at_least("guided.max_prompt_tokens", self.max_prompt_tokens, 1)
        _at_least("guided.synthetic_tasks", self.synthetic_tasks, 1)
        self.ttt.check("guided.ttt")
        if self.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"guided.alpha_rule must be one of {ALPHA_RULES}")
        if self.ttt_init not in ("meta", "zero"):
            raise ValueError("guided.ttt_init must be meta or zero")
        if any(t < 0 for t in self.temperatures):
            raise ValueError("guided.temperatures must be >= 0")
        if not self.alphas or not self.ttt_modes:
            raise ValueError("guided.alphas and guided.ttt_modes need at least one value")


@dataclass
class SweepConfig:
    """`python -m metattt sweep`: the TTT sweep (TTT steps, inner lr, LoRA rank, LoRA placement)."""

    splits: list[str] = field(default_factory=lambda: ["drafter_shifted", "in_domain"])
    """Eval splits (names of `eval.splits`) to sweep on."""
    num_prompts: int = 16
    """Prompts per split (the final numbers come from `make eval`, n >= 48)."""
    prompt_len: int | None = None
    """Prompt tokens; None: eval.prompt_len."""
    max_new_tokens: int = 64
    """Tokens generated per prompt and condition."""
    steps: list[int] = field(default_factory=lambda: [1, 3, 10, 30])
    """TTT steps."""
    lrs: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3])
    """Scalar inner lrs (the meta init also runs with its learned lrs)."""
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16])
    """LoRA ranks (zero init)."""
    placements: list[str] = field(default_factory=lambda: ["fc", "fc+kv", "fc+qkv", "fc+qkv+mlp"])
    """LoRA placements, names of metattt.eval.sweep.PLACEMENTS."""
    default_steps: int = 3
    """TTT steps of the rank and placement rows."""
    default_lr: float = 0.1
    """Inner lr of the rank and placement rows."""

    def __post_init__(self) -> None:
        _at_least("sweep.num_prompts", self.num_prompts, 1)
        _at_least("sweep.max_new_tokens", self.max_new_tokens, 1)
        for k in self.steps:
            _at_least("sweep.steps", k, 0)
        _at_least("sweep.default_steps", self.default_steps, 0)
        for lr in self.lrs:
            _positive("sweep.lrs", lr, "every inner learning rate must be > 0")
        _positive("sweep.default_lr", self.default_lr, "an inner learning rate must be > 0")
        for rank in self.ranks:
            _at_least("sweep.ranks", rank, 1)


@dataclass
class ExportConfig:
    """Serving exports (`metattt export`): DFlash-layout drafter folders that vLLM, SGLang and DFlash load."""

    merge_lora: bool = False
    """Merge the meta-learned LoRA into the drafter's weights (the `meta_static` condition as a plain
    drafter; also `--merge-lora`); false: the static drafter. TTT is per prompt: no server runs it."""
    drafter_path: str | None = None
    """Drafter folder; None: the adapter's base drafter when merging (meta_drafter/ when meta-training
    updated the base), else {out}/drafter."""
    meta_lora_path: str | None = None
    """Meta-learned adapter folder; None: {out}/meta_lora."""
    path: str | None = None
    """Output folder; None: {out}/serve/meta_static (merged) or {out}/serve/static."""
    dtype: str | None = None
    """Cast the exported weights (e.g. bfloat16, as released drafters are); None: the drafter's dtype."""


@dataclass
class BenchConfig:
    """`python -m metattt bench` (`make bench`): cost ratios measured side by side, and τ of the recipe."""

    full: bool = False
    """The GPU preset: a Qwen3-4B-shaped random target in bf16 (needs CUDA)."""
    skip_tau: bool = False
    """Costs only: no eval stage."""
    fresh_eval: bool = False
    """Evaluate again even when an eval report newer than the meta-learned adapter exists."""
    qwen3_4b_ttt: bool = False
    """Only TTT ÷ prefill at Qwen3-4B's shape (bf16; GPU if any, else CPU: ~15 GB RAM, ~20 min on 2 cores)."""
    qwen3_4b_meta: bool = False
    """Only meta steps (tasks batched and one by one) ÷ a distillation step at Qwen3-4B's shape (bf16; GPU if
    any, else CPU, at a short sequence)."""
    batched: bool = False
    """Only batched decoding (tokens/s at batch 1..16: target-only, static, ttt_meta) and batched TTT ÷ one TTT
    per request, at the tiny recipe's widths (GPU if any, else CPU)."""
    sections: list[str] | None = None
    """Only these sections of the run (metattt.bench.SECTIONS: meta_step, task_batching, ttt_prefill,
    draft_cost, batched, online, scaling, tau), merged into the results already in the output file;
    None: all of them."""
    out: str | None = None
    """Results JSON; None: bench/results.json (bench/results_gpu.json with full)."""


@dataclass
class Recipe:
    """One recipe, every stage: `recipes/<name>.yaml` maps onto these sections key for key."""

    run: RunConfig = field(default_factory=RunConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    tiny_target: TinyTargetConfig = field(default_factory=TinyTargetConfig)
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guided: GuidedConfig = field(default_factory=GuidedConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


#: Recipe keys that were renamed (old key -> what to write instead). A recipe or command line that
#: still uses one is refused with this message, before anything runs.
RENAMED_KEYS: dict[str, str] = {
    "meta.inner_steps": "meta.ttt.steps",
    "meta.inner_lr": "meta.ttt.lr",
    "meta.inner_clip": "meta.ttt.clip",
    "meta.inner_anchors": "meta.ttt.num_anchors",
    "meta.gamma": "meta.ttt.gamma",
    "meta.objective_block": "meta.ttt.objective.block",
    "meta.objective_clm": "meta.ttt.objective.clm",
    "meta.objective_feature": "meta.ttt.objective.feature",
    "meta.objective_attn_entropy": "meta.ttt.objective.attn_entropy",
    "eval.ttt_steps": "eval.ttt.steps",
    "eval.ttt_lr": "eval.ttt.lr",
    "eval.ttt_anchors": "eval.ttt.num_anchors",
    "guided.ttt_steps": "guided.ttt.steps",
    "guided.ttt_lr": "guided.ttt.lr",
    "data.seed": "run.seed (it seeds the data split and order as well)",
    "target.build_tiny": "nothing: the embedded target ships in data/tiny_target (rebuild it with `make target`); "
                         "corpus.build builds the embedded corpus",
}
#: A key whose type changed: its old form (a list) now has another name.
RENAMED_LIST_KEYS: dict[str, str] = {"guided.ttt": "guided.ttt_modes"}
