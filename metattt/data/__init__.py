"""Datasets → token sequences with loss masks, and the Lightning DataModule that batches them."""

from metattt.data.datamodule import PadCollator, SequenceDataModule
from metattt.data.text import (
    SUPPORTED_EXTENSIONS,
    load_records,
    normalize_messages,
    pack_sequences,
    tokenize_chat,
    tokenize_dataset,
    train_val_split,
)
from metattt.data.tokenizer import MASK_TOKEN, load_tokenizer, mask_token_id

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
