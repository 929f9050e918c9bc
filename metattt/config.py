"""Typed recipe sections. A recipe YAML maps one-to-one onto these (plus `data:`, which maps
onto `SequenceDataModule.__init__`). Every stage reads the same recipe, so one file drives
distill → meta-train → eval → export. `python -m metattt distill --help` prints all keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
class DrafterArgs:
    """The drafter. Unset dimensions follow the target (as published DFlash drafters do)."""

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


@dataclass
class LoraArgs:
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


@dataclass
class MetaConfig:
    """Stage 2: bi-level meta-training of the LoRA initialization."""

    algorithm: str = "maml"
    """maml (exact second order, TTT-E2E), fomaml (first order) or reptile."""
    inner_steps: int = 3
    """Inner SGD steps k (reptile needs k > 1; k = 1 is joint training)."""
    inner_lr: float = 1e-2
    """Inner learning rate (the initial value of learned lrs with learn_inner_lr)."""
    inner_lr_warmup_steps: int = 0
    """Outer steps over which the inner lr ramps linearly from 0 (TTT-E2E warms it up)."""
    learn_inner_lr: bool = False
    """Meta-SGD: one learned inner lr per LoRA tensor."""
    inner_clip: float = 1.0
    """Global-norm clip of inner gradients (<= 0: off)."""
    inner_anchors: int = 64
    """Blocks sampled from the context for the inner loss."""
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
    """TTT-E2E's prequential outer loss: each inner step trains on the next context chunk, scored before it."""
    checkpoint_inner_steps: bool = False
    """Recompute each inner step in the backward (saves memory of second-order graphs)."""
    update_base: bool = False
    """Also train the drafter's base weights in the outer loop."""
    objective_block: float = 1.0
    """Inner objective weight: block prediction on the context."""
    objective_clm: float = 0.0
    """Inner objective weight: next-token CE on the context."""
    objective_feature: float = 0.0
    """Inner objective weight: reconstruct the target's hidden state through a learned head."""
    objective_attn_entropy: float = 0.0
    """Inner objective weight: attention-entropy regularizer (forces eager attention)."""
    gamma: float | None = None
    """Block position decay; None: by block size."""
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
