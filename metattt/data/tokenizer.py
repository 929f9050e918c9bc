"""The target's tokenizer: loading it, and the one rule for the block drafter's mask token."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger("metattt")

MASK_TOKEN = "<|mask|>"


def load_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer object as it is, or one loaded from a local folder (or hub id) with AutoTokenizer."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer))


def mask_token_id(tokenizer: PreTrainedTokenizerBase, mask_token: str = MASK_TOKEN,
                  embedding_rows: int | None = None) -> int:
    """Id of the token the block drafter fills its blocks with.

    In order: `mask_token` if the vocabulary has it; for the default `<|mask|>` only (a token named
    otherwise must exist), the tokenizer's own `mask_token_id`, and, when
    the target's embedding has rows past the tokenizer's vocabulary (`embedding_rows`; Qwen3:
    151,669 tokens, 151,936 rows), the first such row — an untrained row, what released DFlash
    drafters for Qwen3 use (`dflash_config.mask_token_id`).

    Raises:
        ValueError: none of these exists, with the fix.
    """
    vocab = tokenizer.get_vocab()
    if mask_token in vocab:
        return int(vocab[mask_token])
    if mask_token == MASK_TOKEN:  # a token the user named otherwise must exist: no fallback for it
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        if embedding_rows is not None and len(tokenizer) < embedding_rows:
            log.warning("the tokenizer has no %r: the drafter's mask is embedding row %d, the first past the "
                        "tokenizer's %d tokens", mask_token, len(tokenizer), len(tokenizer))
            return len(tokenizer)
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no mask token {mask_token!r}: the block drafter "
        f"fills its blocks with one. Add it with `tok.add_special_tokens({{'mask_token': '{mask_token}'}})` and "
        "`tok.save_pretrained(path)` (its id must be below the target's embedding size), or set drafter.mask_token "
        "to a special token the tokenizer has (a released DFlash drafter names its id in config.json "
        "`dflash_config.mask_token_id`)"
    )
