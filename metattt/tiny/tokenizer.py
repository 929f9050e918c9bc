"""The embedded target's tokenizer: a byte-level BPE trained on every domain of the corpus."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from metattt.tiny.corpus import read_texts

log = logging.getLogger("metattt.tiny")

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


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` plus a tokenizer_config.json that transformers 4.x loads too.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list-valued
    ``extra_special_tokens``, both unknown to 4.x; the classic spelling
    (``PreTrainedTokenizerFast``, ``additional_special_tokens``) loads in both.
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


def train_tokenizer(train_files: Iterable[Path], out_dir: Path, vocab_size: int = 4096,
                    model_max_length: int = 2048):  # -> PreTrainedTokenizerFast
    """Train a byte-level BPE on the texts of ``train_files`` and save it (transformers format).

    Byte-level, so any text encodes without unknown tokens; the GPT-2 pre-tokenizer keeps runs
    of indentation spaces together, which suits code. Special tokens get the first ids:
    ``<|endoftext|>`` = 0 (eos and pad, no bos), ``<|mask|>`` = 1 (the tokenizer's
    ``mask_token``), ``<|im_start|>`` = 2, ``<|im_end|>`` = 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for f in train_files for t in read_texts(Path(f))]
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
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # code: never rewrite " ." / " ," on decode
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out_dir)
    log.info("tokenizer: %d tokens from %d documents -> %s", len(tokenizer), len(texts), out_dir)
    return tokenizer
