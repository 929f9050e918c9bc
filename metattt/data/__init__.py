"""Datasets → token sequences with loss masks, and the Lightning DataModule that batches them."""

from metattt.data.datamodule import MASK_TOKEN, PadCollator, SequenceDataModule, load_tokenizer, mask_token_id
from metattt.data.text import (
    SUPPORTED_EXTENSIONS,
    load_records,
    normalize_messages,
    pack_sequences,
    tokenize_chat,
    tokenize_dataset,
    train_val_split,
)

__all__ = [
    "MASK_TOKEN",
    "SUPPORTED_EXTENSIONS",
    "PadCollator",
    "SequenceDataModule",
    "load_records",
    "load_tokenizer",
    "mask_token_id",
    "normalize_messages",
    "pack_sequences",
    "tokenize_chat",
    "tokenize_dataset",
    "train_val_split",
]
