"""LightningDataModule over token sequences (plain text and chat) with an assistant loss mask."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from metattt.data.text import load_records, tokenize_dataset, train_val_split
from metattt.data.tokenizer import MASK_TOKEN, load_tokenizer, mask_token_id

__all__ = ["MASK_TOKEN", "PadCollator", "SequenceDataModule", "load_tokenizer", "mask_token_id"]

log = logging.getLogger(__name__)

class PadCollator:
    """Right-pads a list of ``{"input_ids", "loss_mask"}`` rows into a dict of (B, T) tensors.

    A class rather than a closure so DataLoader workers can pickle it under spawn.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        batch, width = len(rows), max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        loss_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            input_ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            loss_mask[i, :n] = torch.as_tensor(r["loss_mask"], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
        if "features" in rows[0]:  # cached target features (data.feature_cache), zero on padding
            feats = rows[0]["features"].new_zeros((batch, width, rows[0]["features"].shape[-1]))
            for i, (r, n) in enumerate(zip(rows, lengths)):
                feats[i, :n] = r["features"]
            out["features"] = feats
        return out


class SequenceDataModule(L.LightningDataModule):
    """Token sequences from local files or a hub dataset, for distillation and meta-training.

    Batches are dicts of LongTensors of shape (B, T), right-padded:
    ``input_ids`` (pad id, or eos if the tokenizer has no pad), ``attention_mask`` (1 on real
    tokens) and ``loss_mask`` (1 on training targets: every token of plain text, the assistant's
    tokens of chat, never padding).

    Args:
        tokenizer: path to a tokenizer folder (loaded with ``AutoTokenizer.from_pretrained``),
            usually the target model's folder; a tokenizer object is accepted too.
        train_files: training data: a ``.jsonl``/``.json``/``.parquet``/``.txt`` file, a glob,
            a directory, a list of these, or a hub dataset name.
        val_files: validation data in the same forms; when given, ``val_fraction`` is ignored.
        val_fraction: share of the training records held out for validation when
            ``val_files`` is not given (0 disables validation).
        max_length: tokens per sequence: packed chunks have exactly this length, unpacked
            records are truncated to it.
        min_length: drop sequences shorter than this (only matters without packing).
        pack: concatenate documents (separated by eos) into ``max_length`` chunks; otherwise
            one record per sequence.
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the train/validation split and of the training shuffle order.
        chat_template_kwargs: extra variables for the chat template, e.g.
            ``{"enable_thinking": false}`` for Qwen3.
        max_records: keep only the first this many records of each source (quick runs).
        hub_split: split to read when ``train_files``/``val_files`` name a hub dataset.
        cache_dir: ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``); point it at
            shared storage on a cluster so ranks and reruns reuse the tokenized data.
        num_proc: processes for reading and tokenizing (None: in-process).
        feature_cache: a hidden-state cache folder (``metattt.data.feature_cache``, written by
            ``python -m metattt prepare`` with ``prepare.cache_features``): batches then carry
            ``features`` (B, T, n·H) and training reads them instead of running the target.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.02,
        max_length: int = 512,
        min_length: int = 0,
        pack: bool = True,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        chat_template_kwargs: dict | None = None,
        max_records: int | None = None,
        hub_split: str = "train",
        cache_dir: str | None = None,
        num_proc: int | None = None,
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        # A tokenizer object is not a hyperparameter: keep the path only.
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(tokenizer)
        self.train_files = train_files
        self.val_files = val_files
        self.val_fraction = val_fraction
        self.max_length = max_length
        self.min_length = min_length
        self.pack = pack
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_records = max_records
        self.hub_split = hub_split
        self.cache_dir = cache_dir
        self.num_proc = num_proc
        self.feature_cache = feature_cache
        self._feature_cache = None
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self._prepared: tuple[datasets.Dataset, datasets.Dataset] | None = None
        self._unfiltered: dict[str, datasets.Dataset] = {}  # tokenized, before filtering (Arrow: no copy)
        #: sequences removed by ``min_length`` or for having no training target, per split
        self.num_dropped: dict[str, int] = {}
        #: of those, the ones removed only for their length (they had a training target); counted
        #: when no training sequence is left, to say why
        self.num_too_short: dict[str, int] = {}

    # ---------------------------------------------------------------- tokenizer facts

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set `tokenizer.pad_token`")
        return int(pad)

    @property
    def mask_token_id(self) -> int:
        """Id of ``<|mask|>`` (or the tokenizer's mask token); raises ValueError with the fix if absent."""
        return mask_token_id(self.tokenizer)

    # ---------------------------------------------------------------- building

    def _load(self, source: str | list[str]) -> datasets.Dataset:
        ds = load_records(source, split=self.hub_split, cache_dir=self.cache_dir, num_proc=self.num_proc)
        if self.max_records is not None:
            ds = ds.select(range(min(self.max_records, len(ds))))
        return ds

    def _tokenize(self, ds: datasets.Dataset, name: str) -> datasets.Dataset:
        ds = tokenize_dataset(
            ds,
            self.tokenizer,
            max_length=self.max_length,
            pack=self.pack,
            chat_template_kwargs=self.chat_template_kwargs,
            num_proc=self.num_proc,
        )
        before = len(ds)
        min_length = max(self.min_length, 1)

        # A sequence without targets (a chat cut before the assistant spoke) only costs compute.
        def keep(batch: dict[str, list[list[int]]]) -> list[bool]:
            return [
                len(ids) >= min_length and any(m) for ids, m in zip(batch["input_ids"], batch["loss_mask"])
            ]

        self._unfiltered[name] = ds
        ds = ds.filter(keep, batched=True, num_proc=self.num_proc, desc=f"filtering {name}")
        self.num_dropped[name] = before - len(ds)
        if self.num_dropped[name]:
            log.info(
                "%s: dropped %d of %d sequences (shorter than min_length=%d or without a loss token)",
                name,
                self.num_dropped[name],
                before,
                self.min_length,
            )
        return ds

    def _build(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        records = self._load(self.train_files)
        if self.val_files is not None:
            train_records, val_records = records, self._load(self.val_files)
        else:
            train_records, val_records = train_val_split(records, self.val_fraction, self.seed)
        train = self._tokenize(train_records, "train")
        val = self._tokenize(val_records, "val") if len(val_records) else val_records
        if len(train) == 0:
            raise ValueError(self._no_sequences(len(train_records)))
        return train, val

    def _no_sequences(self, records: int) -> str:
        """Why no training sequence is left, with only the reasons that happened."""
        head = (f"no sequences: check train_files / min_length / max_length (data.train_files={self.train_files!r}, "
                f"{records} record{'s' * (records != 1)})")
        if records == 0:
            return f"{head} holds no records: point data.train_files at real data"
        unfiltered = self._unfiltered.get("train")
        made = len(unfiltered) if unfiltered is not None else 0
        min_length = max(self.min_length, 1)
        short = sum(len(ids) < min_length and any(m) for ids, m in zip(unfiltered["input_ids"], unfiltered["loss_mask"])
                    ) if made else 0
        self.num_too_short["train"] = short
        reasons = []
        if made == 0 and self.pack:
            reasons.append(f"packing (data.pack=true) cuts chunks of exactly data.max_length={self.max_length} tokens "
                           "and the records do not fill one: lower data.max_length or set data.pack=false")
        if made - short:
            reasons.append(f"{made - short} sequences have no trained token (chat records without an assistant "
                           "turn: only assistant tokens are trained)")
        if short:
            reasons.append(f"{short} sequences are shorter than min_length={self.min_length} tokens")
        return f"{head}: " + "; ".join(reasons or ["none survived tokenization"])

    def prepare_data(self) -> None:
        # Runs on one process per node: downloads and fills the `datasets` cache, so the other
        # ranks' `setup` reads the tokenized Arrow files instead of tokenizing again.
        if self.train_dataset is None:
            self._prepared = self._build()

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            # Same process as prepare_data (single device, or rank 0): reuse what it built.
            built = self._prepared if self._prepared is not None else self._build()
            self.train_dataset, self.val_dataset = built
            self._prepared = None
            if self.feature_cache and len(self.train_dataset):
                self.features().get(self.train_dataset[0]["input_ids"])  # a stale cache fails here, with the fix

    # ---------------------------------------------------------------- loaders

    def features(self):
        """The opened ``feature_cache`` (None when unset)."""
        if self.feature_cache and self._feature_cache is None:
            from metattt.data.feature_cache import FeatureCache

            self._feature_cache = FeatureCache(self.feature_cache)
        return self._feature_cache

    def _loader(self, ds: datasets.Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        if self.feature_cache:
            from metattt.data.feature_cache import FeatureDataset

            ds = FeatureDataset(ds, self.features())
        loader_cls, sampler = DataLoader, None
        if shuffle:
            # order = f(seed, epoch), the same global order on any number of ranks, resumable mid-epoch
            from metattt.checkpointing import ResumableDataLoader, ResumableSampler

            t = self.trainer
            sampler = ResumableSampler(ds, num_replicas=t.world_size if t else 1, rank=t.global_rank if t else 0,
                                       seed=self.seed)
            loader_cls, shuffle, generator = ResumableDataLoader, False, None
        return loader_cls(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            collate_fn=PadCollator(self.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_dataset is None:
            self.setup("validate")
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return []  # Lightning skips validation for an empty loader list
        return self._loader(self.val_dataset, shuffle=False)
