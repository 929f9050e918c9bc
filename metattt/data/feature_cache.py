"""Offline hidden-state cache: the target's tapped-layer features, written once, read by training.

Distillation and meta-training read the frozen target's hidden states of `target.layer_ids` on
every batch. Running the target each epoch costs one target forward per sequence per epoch; the
cache pays it once. It costs disk: `tokens × n_layers × hidden × 2 bytes` in bf16, e.g.
Qwen3-8B (5 × 4096) is 40 KB per token, 40 GB per million tokens — so the writer prints the
expected size and checks the free disk (`shutil.disk_usage`) before it writes anything.

Layout of a cache folder::

    feature_cache.json             target, layer ids, feature width, dtype, counts
    features-00000.safetensors     one tensor per sequence, (T, n·H), named by the sequence key
    features-00001.safetensors     ...

A sequence's key is a hash of its token ids, so the cache does not depend on the order, the
split or the filtering of the sequences (distill and meta-train keep different minimum lengths)
and a rerun skips every sequence already written (shards are written atomically: resumable).
`data.feature_cache: <dir>` makes the DataModule add a `features` tensor (B, T, n·H) to each
batch, and the LightningModules then use it instead of running the target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from metattt.atomic import atomic_file, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "feature_cache.json"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sequence_key(input_ids: Sequence[int] | torch.Tensor) -> str:
    """Content key of a token sequence (blake2b-128 of its int64 ids)."""
    t = torch.as_tensor(input_ids, dtype=torch.int64).contiguous()
    return hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("features-*.safetensors"))


class FeatureCache:
    """Read side: key → shard index over every shard header; tensors are read lazily (mmap)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"no feature cache at {self.path} (no {MANIFEST}): write it with "
                "`python -m metattt prepare --config <recipe> --prepare.cache_features=true`, "
                "or unset data.feature_cache to run the target online")
        self.info = json.loads(manifest.read_text())
        self.index: dict[str, str] = {}
        for f in _shard_files(self.path):
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self.index[k] = f.name
        self._handles: dict[str, object] = {}

    @property
    def feature_dim(self) -> int:
        return int(self.info["feature_dim"])

    @property
    def layer_ids(self) -> list[int]:
        return list(self.info["layer_ids"])

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, input_ids) -> bool:
        return sequence_key(input_ids) in self.index

    def get(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Features (T, n·H) of this exact token sequence."""
        key = sequence_key(input_ids)
        shard = self.index.get(key)
        if shard is None:
            raise KeyError(
                f"sequence of {len(input_ids)} tokens (key {key}) is not in the feature cache {self.path}: the "
                "data changed since the cache was written (data.* settings, tokenizer, prepared files). Rewrite it "
                "with `python -m metattt prepare ... --prepare.cache_features=true` (written sequences are kept)")
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return handle.get_tensor(key)

    def check(self, layer_ids: list[int], feature_dim: int | None = None) -> None:
        if list(layer_ids) != self.layer_ids:
            raise ValueError(f"feature cache {self.path} holds layers {self.layer_ids}, the target taps {layer_ids}: "
                             "rewrite the cache or set target.layer_ids to match")
        if feature_dim is not None and feature_dim != self.feature_dim:
            raise ValueError(f"feature cache {self.path} has feature width {self.feature_dim}, expected {feature_dim}")

    def __getstate__(self) -> dict:  # DataLoader workers reopen the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class FeatureDataset(torch.utils.data.Dataset):
    """Rows of a tokenized dataset with their cached `features` (T, n·H) added."""

    def __init__(self, rows, cache: FeatureCache):
        self.rows, self.cache = rows, cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[i])
        feats = self.cache.get(row["input_ids"])
        if feats.shape[0] != len(row["input_ids"]):  # pragma: no cover - a key collision
            raise ValueError(f"cached features of row {i} have {feats.shape[0]} positions, the row {len(row['input_ids'])}")
        row["features"] = feats
        return row


def expected_bytes(num_tokens: int, feature_dim: int, dtype: torch.dtype) -> int:
    return int(num_tokens) * int(feature_dim) * torch.empty((), dtype=dtype).element_size()


def write_feature_cache(target, sequences: Sequence, out_dir: str | Path, *,
                        dtype: str | torch.dtype = "bfloat16", batch_size: int = 4, shard_bytes: int = 4 << 30,
                        target_name: str = "", pad_id: int = 0, progress: bool = True,
                        min_free_margin: float = 0.05) -> dict:
    """Run `target` (a FrozenTarget) over `sequences` and store the tapped features.

    `sequences`: anything indexable whose items are token-id lists or rows with `input_ids`
    (a tokenized `datasets.Dataset`, a list of lists).

    Sequences already in the cache (by content) are skipped, so a rerun resumes. Prints the
    expected size of what is left to write and raises OSError before writing if the disk lacks it.
    Returns counts: sequences/tokens written now, already cached, bytes written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dt = _DTYPES[str(dtype).removeprefix("torch.")] if not isinstance(dtype, torch.dtype) else dtype
    H = target.hidden_size
    D = H * len(target.layer_ids)
    info = {"format": FORMAT_VERSION, "target": target_name, "layer_ids": list(target.layer_ids),
            "hidden_size": H, "feature_dim": D, "dtype": str(dt).removeprefix("torch.")}
    manifest = out / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        clash = {k: (old.get(k), v) for k, v in info.items() if k != "target" and old.get(k) != v}
        if clash:
            raise ValueError(f"feature cache {out} was written with other settings {clash} (cached, now): "
                             "use another data.feature_cache folder or delete this one")
    if not manifest.is_file():
        atomic_write_json(manifest, {**info, "num_sequences": 0, "num_tokens": 0})
    cache = FeatureCache(out)

    # first pass: keys and lengths only (the token ids are read again when their batch runs)
    todo: dict[str, tuple[int, int]] = {}  # key -> (row, length)
    cached = 0
    for i in tqdm(range(len(sequences)), desc="hashing sequences", unit="seq", disable=not progress, leave=False):
        ids = _ids(sequences, i)
        key = sequence_key(ids)
        if key in cache.index:
            cached += 1
        else:
            todo.setdefault(key, (i, len(ids)))
    tokens = sum(n for _, n in todo.values())
    need = expected_bytes(tokens, D, dt)
    free = shutil.disk_usage(out).free
    msg = (f"feature cache {out}: {len(todo)} sequences / {tokens} tokens to write × {D} features × "
           f"{torch.empty((), dtype=dt).element_size()} B = {human_bytes(need)} ({cached} sequences already cached); "
           f"{human_bytes(free)} free")
    log.info(msg)
    print(msg, flush=True)
    if need * (1 + min_free_margin) > free:
        raise OSError(f"not enough disk for the feature cache: {human_bytes(need)} needed (+{min_free_margin:.0%} margin), "
                      f"{human_bytes(free)} free on {out}. Free space, point data.feature_cache elsewhere, cache "
                      "fewer records (prepare.max_records) or train online (unset data.feature_cache)")

    device = next(target.model.parameters()).device
    order = sorted(todo.items(), key=lambda kv: kv[1][1])  # by length: little padding
    next_shard = 1 + max((int(f.stem.split("-")[1]) for f in _shard_files(out)), default=-1)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = written_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes, next_shard, written_bytes
        if not pending:
            return
        name = out / f"features-{next_shard:05d}.safetensors"
        with atomic_file(name) as tmp:
            save_file(pending, str(tmp), metadata={"format": "pt", "layer_ids": json.dumps(info["layer_ids"])})
        written_bytes += pending_bytes
        next_shard += 1
        pending, pending_bytes = {}, 0

    bar = tqdm(total=tokens, desc="caching features", unit="tok", unit_scale=True, disable=not progress)
    for k in range(0, len(order), max(1, batch_size)):
        chunk = [(key, _ids(sequences, row)) for key, (row, _) in order[k:k + max(1, batch_size)]]
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, ids) in enumerate(chunk):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention[r, :len(ids)] = 1
        with torch.no_grad():
            feats = target(input_ids.to(device), attention_mask=attention.to(device), return_logits=False).features
        for r, (key, ids) in enumerate(chunk):
            t = feats[r, :len(ids)].to(dt).cpu().contiguous()
            pending[key] = t
            pending_bytes += t.numel() * t.element_size()
        bar.update(sum(len(ids) for _, ids in chunk))
        if pending_bytes >= shard_bytes:
            flush()
    flush()
    bar.close()
    total = FeatureCache(out)
    atomic_write_json(manifest, {**info, "num_sequences": len(total), "num_tokens": _count_tokens(total)})
    return {"written_sequences": len(todo), "written_tokens": tokens, "cached_sequences": cached,
            "bytes": written_bytes, "expected_bytes": need}


def _ids(sequences, i: int) -> list[int]:
    item = sequences[i]
    ids = item["input_ids"] if isinstance(item, dict) else item
    return [int(t) for t in ids]


def _count_tokens(cache: FeatureCache) -> int:
    n = 0
    for f in _shard_files(cache.path):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                n += sf.get_slice(k).get_shape()[0]
    return n



