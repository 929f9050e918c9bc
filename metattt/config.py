"""Typed recipe sections. A recipe YAML maps one-to-one onto these (plus `data:`, which maps
onto `SequenceDataModule.__init__`). Every stage reads the same recipe, so one file drives
distill → meta-train → eval → export. `python -m metattt distill --help` prints all keys.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    build_tiny: bool = False
    """Build the tiny CPU target (corpus + tokenizer + LM from the Python stdlib) at `path` if missing."""


@dataclass
class DrafterArgs:
    """The block drafter. Unset dimensions follow the target (as published DFlash drafters do)."""

    init_from: str | None = None
    """A drafter folder in DFlash layout (config.json + safetensors) to start from, e.g. a released one."""
    num_hidden_layers: int = 5
    """Drafter decoder layers (also the number of tapped target layers by default)."""
    block_size: int = 16
    """Tokens per block: the anchor + block_size-1 drafts."""
    intermediate_size: int | None = None
    """MLP width; None: the target's."""
    num_attention_heads: int | None = None
    """None: the target's."""
    num_key_value_heads: int | None = None
    """None: the target's."""
    head_dim: int | None = None
    """None: the target's."""
    mask_token: str = "<|mask|>"
    """Token the blocks are filled with; must exist in the target's tokenizer."""
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
    """Show the progress bar."""
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
    """Module names that carry LoRA; None: fc, q_proj, k_proj, v_proj."""


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
