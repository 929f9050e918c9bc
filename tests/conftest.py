"""Shared fixtures: everything on CPU in float32, tiny models built from configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _cpu_float32():
    torch.set_default_dtype(torch.float32)
    # one thread: tiny models gain nothing from more, and oversubscribed cores slow them ~8x
    torch.set_num_threads(1)
    yield


def qwen3_config(vocab_size: int = 96, layers: int = 4, hidden: int = 32):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=0, pad_token_id=0,
    )


def llama_config(vocab_size: int = 96, layers: int = 4, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=0, pad_token_id=0,
    )


MASK_ID = 1


def varied_target(vocab_size: int = 96, layers: int = 4, init: float = 0.3, seed: int = 0, dtype=torch.float32):
    """A random Qwen3-style target whose greedy continuations vary: at the default init (0.02) a
    random target repeats one token, which any drafter predicts; at 0.3 they are varied."""
    from metattt.models.target import FrozenTarget

    cfg = qwen3_config(vocab_size=vocab_size, layers=layers)
    cfg.initializer_range = init
    return FrozenTarget.from_config(cfg, num_draft_layers=2, seed=seed).to(dtype)


def greedy_sequences(target, n: int = 24, prompt_len: int = 4, new_tokens: int = 44, seed: int = 100) -> torch.Tensor:
    """(n, prompt_len + new_tokens): random prompts and the target's greedy continuations."""
    import random

    from metattt.spec.decode import target_generate

    rng = random.Random(seed)
    vocab = target.config.vocab_size
    seqs = []
    for _ in range(n):
        prompt = torch.tensor([[rng.randrange(2, vocab) for _ in range(prompt_len)]])
        seqs.append(torch.cat([prompt[0], torch.tensor(target_generate(target, prompt, new_tokens, None).tokens)]))
    return torch.stack(seqs)


def train_on_target(drafter, target, ids: torch.Tensor, steps: int, anchors_per_seq: int = 16,
                    lr: float = 3e-3) -> float:
    """A few AdamW steps of the distillation loss (either drafter kind) on sequences `ids` (B, T);
    the drafter is frozen afterwards. Returns the last loss."""
    from metattt.anchors import sample_anchors, valid_anchor_mask
    from metattt.losses import block_prediction_loss

    attn = torch.ones_like(ids)
    feats = target(ids).features
    S = drafter.config.block_size
    valid = valid_anchor_mask(attn, attn, S)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(drafter.parameters(), lr=lr)
    for _ in range(steps):
        anchors, ok = sample_anchors(valid, anchors_per_seq, g)
        out = block_prediction_loss(drafter, feats, ids, attn, attn, anchors, ok, S, MASK_ID, 2.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    drafter.requires_grad_(False)
    return out.loss.item()


@pytest.fixture
def tiny_target():
    from metattt.models.target import FrozenTarget

    return FrozenTarget.from_config(qwen3_config(), num_draft_layers=2, seed=0)


@pytest.fixture
def tiny_drafter(tiny_target):
    from metattt.models.drafter import BlockDrafter, BlockDrafterConfig

    torch.manual_seed(1)
    cfg = BlockDrafterConfig.from_target(tiny_target.config, mask_token_id=MASK_ID, target_layer_ids=tiny_target.layer_ids,
                                    num_hidden_layers=2, block_size=4)
    return BlockDrafter(cfg).attach_target(tiny_target)


CODE_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    line = input()\n    if not line:\n        break\n",
    "numbers = [n for n in range(100) if n % 3 == 0]\n",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "with open('x.txt') as f:\n    data = f.read().split()\n",
]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A folder laid out like a recipe's: tokenizer + randomly initialised tiny target + jsonl data."""
    from metattt.tiny.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ws")
    corpus = root / "corpus"
    corpus.mkdir()
    texts = [s * 3 for s in CODE_SNIPPETS] * 6
    for name, rows in (("train", texts), ("validation", texts[:8])):
        with open(corpus / f"{name}.jsonl", "w") as f:
            for t in rows:
                f.write(json.dumps({"text": t}) + "\n")
    tok = train_tokenizer([corpus / "train.jsonl"], root / "tokenizer", vocab_size=300)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_config(vocab_size=len(tok)))
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    return root


def recipe_args(ws: Path, *extra: str) -> list[str]:
    """CLI overrides that point the tiny recipe at a test workspace and shrink everything."""
    return [
        "--config", "recipes/tiny.yaml",
        f"--run.output_root={ws / 'out'}", "--run.name=t",
        f"--target.path={ws / 'target'}", f"--corpus.dir={ws / 'corpus'}", "--corpus.build=false",
        f"--data.train_files={ws / 'corpus' / 'train.jsonl'}",
        f"--data.val_files={ws / 'corpus' / 'validation.jsonl'}",
        "--data.feature_cache=null", "--prepare.cache_features=false",
        "--data.max_length=48", "--data.batch_size=4", "--data.pack=true", "--meta.context=random",
        "--drafter.block_size=4", "--drafter.num_hidden_layers=2",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        "--distill.num_anchors=8", "--distill.limit_val_batches=1",
        *extra,
    ]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (tests/test_gpu.py) are skipped where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def check_meta_gradient_by_central_differences(meta_loss, phi: dict, select, eps: float = 1e-6,
                                               per_tensor: int = 2, seed: int = 0, rtol: float = 1e-3) -> int:
    """Compare autograd's gradient of `meta_loss()` w.r.t. `phi` with central differences on
    `per_tensor` random coordinates of every tensor whose name passes `select`; returns how many
    coordinates were checked (relative error below `rtol` each)."""
    grads = torch.autograd.grad(meta_loss(), list(phi.values()))
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for (name, p), grad in zip(phi.items(), grads):
        if not select(name):
            continue
        for _ in range(per_tensor):
            i = int(torch.randint(p.numel(), (1,), generator=g))
            old = p.view(-1)[i].item()

            def at(value: float, p=p, i=i) -> float:
                with torch.no_grad():
                    p.view(-1)[i] = value
                return meta_loss().item()

            up, down = at(old + eps), at(old - eps)
            at(old)
            fd = (up - down) / (2 * eps)
            an = grad.reshape(-1)[i].item()
            assert abs(an - fd) <= rtol * max(abs(fd), 1e-4), f"{name}[{i}]: autograd {an:.6g} vs FD {fd:.6g}"
            checked += 1
    return checked
