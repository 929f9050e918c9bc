"""Records → token sequences with a loss mask, built on Hugging Face ``datasets``.

Two record formats are understood:

* plain text: a ``text`` field; every token (and the appended eos) is a training target;
* chat: a ``messages`` field (``[{"role", "content"}, ...]``) or a ShareGPT ``conversations``
  field (``[{"from", "value"}, ...]``); rendered with the tokenizer's chat template, and only
  the tokens the assistant writes are training targets.

Every transformation goes through ``Dataset.map``/``filter`` so ``datasets`` caches it on disk
next to the loaded files and a second run (or the other ranks of a DDP job) reuses the result.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError
from transformers import PreTrainedTokenizerBase

from metattt.errors import RecipeError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "check_sources",
    "load_records",
    "normalize_messages",
    "tokenize_chat",
    "tokenize_dataset",
    "pack_sequences",
    "train_val_split",
]

# extension -> `datasets` packaged builder
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
# `datasets` decompresses these transparently, so `train.jsonl.gz` is a json file.
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = re.compile(r"[*?\[]")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

#: Speaker names seen in chat datasets (ShareGPT `from`, OpenAI `role`, ...; matched lower-case)
#: → chat-template roles. Reading data and preparing it both use this one map.
ROLE_ALIASES: dict[str, str] = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "ipython": "tool",
}
_CHAT_COLUMNS = ("messages", "conversations")
# Records written by `python -m metattt prepare` are already tokenized: used as they are.
_TOKENIZED_COLUMNS = ("input_ids", "loss_mask")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _extension(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.splitext(name)[1]


def _looks_local(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything with a data extension, a glob or a path
    prefix is meant as a local file, so a typo must raise FileNotFoundError, not a hub lookup."""
    return (
        os.path.exists(source)
        or bool(_GLOB_CHARS.search(source))
        or _extension(source) in SUPPORTED_EXTENSIONS
        or source.startswith(("/", "./", "../", "~", "\\"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _expand_local(source: str) -> list[str]:
    """Files that one local source names (a file, a glob, or a directory)."""
    path = os.path.expanduser(source)
    if _GLOB_CHARS.search(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"no files match the pattern {source!r}: check the path and the glob")
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
            if _extension(name) in SUPPORTED_EXTENSIONS and not name.startswith(".")
        )
        if not files:
            raise FileNotFoundError(
                f"directory {source!r} holds no data files; expected files ending in "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(
            f"data file {source!r} does not exist: check the path (relative to {os.getcwd()})"
        )
    for f in files:
        if _extension(f) not in SUPPORTED_EXTENSIONS:
            raise ValueError(
                f"cannot read {f!r}: unknown extension {_extension(f)!r}; "
                f"supported are {', '.join(SUPPORTED_EXTENSIONS)} (optionally compressed)"
            )
    return files


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _json_error(files: list[str]) -> str | None:
    """Where the first of `files` stops being valid JSON (file, line, the parser's error), or None:
    datasets reports a bad line as "An error occurred while generating the dataset", naming neither.
    A `.jsonl` file is read line by line, a `.json` file as one document (a list or an object), and
    as JSON lines when it is not one."""
    for f in files:
        suffix = os.path.splitext(f)[1].lower()
        if suffix not in _OPENERS and suffix not in (".json", ".jsonl"):
            continue  # zstd / lz4: no reader in the standard library; datasets' message stands
        try:
            with _OPENERS.get(suffix, open)(f, "rt", encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as e:
            return f"{f}: cannot be read as UTF-8 text ({e})"
        if _extension(f) == ".json":
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as whole:
                first = next((line for line in text.splitlines() if line.strip()), "")
                try:
                    json.loads(first)  # a first line that parses alone: JSON lines in a .json file
                except json.JSONDecodeError:
                    return (f"{f}: line {whole.lineno}: invalid JSON ({whole.msg}, column {whole.colno}): "
                            "fix the file or remove it from the data")
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return (f"{f}: line {n}: invalid JSON ({e.msg}, column {e.colno}): fix or remove that line "
                            "(one JSON object per line)")
    return None


def check_sources(source: str | Sequence[str], key: str) -> None:
    """Every local source of `source` exists and names readable files (a hub dataset name is left to
    the hub); the error names the recipe `key`. Reads no file: a stage calls it before building anything."""
    for s in [source] if isinstance(source, str) else list(source):
        if not _looks_local(s) or _is_saved_dataset(os.path.expanduser(s)):
            continue
        try:
            _expand_local(s)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{key}: {e}") from e


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "state.json"))


def _align_and_concatenate(parts: list[datasets.Dataset]) -> datasets.Dataset:
    """Concatenate datasets from different builders (e.g. text files and chat jsonl).

    Only the columns the tokenizer reads survive: metadata columns rarely agree in type across
    files, and a column missing from one part is filled with nulls so the schemas match.
    """
    wanted = ("text", *_CHAT_COLUMNS, *_TOKENIZED_COLUMNS)
    present = [c for c in wanted if any(c in p.column_names for p in parts)]
    features: dict[str, Any] = {}
    for p in parts:
        for c in present:
            if c in p.column_names and c not in features:
                features[c] = p.features[c]
    aligned = []
    for p in parts:
        p = p.select_columns([c for c in present if c in p.column_names])
        for c in present:
            if c not in p.column_names:
                p = p.add_column(c, [None] * len(p), feature=features[c])
        aligned.append(p.cast(datasets.Features({c: features[c] for c in present})))
    return datasets.concatenate_datasets(aligned)


def load_records(
    source: str | Sequence[str],
    split: str = "train",
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Load raw records from local files or the Hugging Face hub.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet``/``.txt`` file (optionally ``.gz`` etc.),
            a glob, a directory of such files (or one written by ``Dataset.save_to_disk``),
            or a list of any of these. Anything else is taken as a hub dataset name.
            A ``.txt`` file is one record whose ``text`` is the whole file.
        split: split to take from a hub dataset (local files always form one split).
        cache_dir: where ``datasets`` keeps its Arrow cache (default: ``HF_DATASETS_CACHE``).
        num_proc: processes used to read the files.

    Raises:
        FileNotFoundError: a local path or glob that matches nothing.
        ValueError: a file with an extension that cannot be read; a json/jsonl file with an invalid
            line (RecipeError naming the file, the line and the JSON error).
    """
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError("no data source given: pass a file, glob, directory or hub dataset name")

    if len(sources) == 1 and not _looks_local(sources[0]):
        # Real path for hub datasets; tests run offline and never reach it.
        ds = datasets.load_dataset(sources[0], split=split, cache_dir=cache_dir, num_proc=num_proc)
        if not isinstance(ds, datasets.Dataset):
            raise ValueError(
                f"hub dataset {sources[0]!r} split {split!r} did not load as a map-style Dataset"
            )
        return ds

    saved: list[datasets.Dataset] = []
    by_builder: dict[str, list[str]] = {}
    for s in sources:
        if not _looks_local(s):
            raise ValueError(
                f"{s!r} looks like a hub dataset name; a list of sources may only hold local files, "
                "globs or directories (pass a hub dataset on its own)"
            )
        if _is_saved_dataset(os.path.expanduser(s)):
            saved.append(datasets.load_from_disk(os.path.expanduser(s)))
            continue
        for f in _expand_local(s):
            by_builder.setdefault(SUPPORTED_EXTENSIONS[_extension(f)], []).append(f)

    empty = [f for files in by_builder.values() for f in files if os.path.getsize(f) == 0]
    if empty:
        raise ValueError(f"empty data file(s), no records to read: {empty[:5]}; remove them or point at real data")
    parts = list(saved)
    for builder, files in by_builder.items():
        # `sample_by="document"`: one record per .txt file, so documents stay whole for packing.
        extra = {"sample_by": "document"} if builder == "text" else {}

        def load(data_files: list[str], builder: str = builder, extra: dict = extra) -> datasets.Dataset:
            return datasets.load_dataset(
                builder, data_files=data_files, split="train", cache_dir=cache_dir, num_proc=num_proc, **extra
            )

        try:
            parts.append(load(files))
        except DatasetGenerationError as e:
            bad = _json_error(files) if builder == "json" else None
            if bad:
                raise RecipeError(bad) from e
            if len(files) == 1:
                raise
            # Files whose schemas differ (`messages` next to ShareGPT `conversations`) cannot share
            # one Arrow table; load them one by one and keep the columns the tokenizer reads.
            parts.extend(load([f]) for f in files)
    return parts[0] if len(parts) == 1 else _align_and_concatenate(parts)


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` or ShareGPT ``conversations`` → ``[{"role", "content", ...}]``.

    Keys whose value is None are dropped: Arrow stores a union of all keys seen in a column,
    and chat templates test ``message.get(...) is defined`` rather than ``is not none``.
    """
    out = []
    for i, m in enumerate(messages):
        m = {k: v for k, v in dict(m).items() if v is not None}
        if "role" not in m and "from" in m:
            speaker = m.pop("from")
            if not isinstance(speaker, str) or speaker.lower() not in ROLE_ALIASES:
                raise ValueError(
                    f"message {i}: unknown ShareGPT speaker {speaker!r}; known are {sorted(ROLE_ALIASES)}"
                )
            m["role"] = ROLE_ALIASES[speaker.lower()]
        if "content" not in m and "value" in m:
            m["content"] = m.pop("value")
        if "role" not in m or "content" not in m:
            raise ValueError(
                f"message {i} has keys {sorted(m)}; chat messages need role/content (or ShareGPT from/value)"
            )
        out.append(m)
    return out


def _has_generation_blocks(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(_GENERATION_TAG.search(_chat_template(tokenizer)))


def _chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    try:
        return tokenizer.get_chat_template()
    except ValueError as e:
        raise ValueError(
            "chat records need a tokenizer with a chat template: set `tokenizer.chat_template` "
            "(and save the tokenizer), or convert the records to plain `text`"
        ) from e


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_spans_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]
) -> tuple[str, list[tuple[int, int]]]:
    """Character spans of the assistant turns in the rendered conversation, found by rendering
    prefixes of the conversation (for templates without ``{% generation %}`` blocks).

    A turn starts where ``messages[:i]`` + generation prompt stops: the header
    (``<|im_start|>assistant\\n`` and, e.g. for Qwen3 with ``enable_thinking=False``, an empty
    think block) belongs to the prompt, as at inference. It ends where ``messages[:i+1]`` stops,
    minus trailing whitespace after the content (the ``\\n`` after ``<|im_end|>`` is written
    by the template, never generated).
    """

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
        )

    full = render(messages, False)
    special = sorted((t for t in tokenizer.all_special_tokens if t), key=len, reverse=True)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"] if isinstance(m["content"], str) else ""
        if i > 0:
            # Common prefix rather than startswith: templates that render history differently
            # from the last turn (Qwen3 drops old think blocks) still agree up to the header.
            start = max(cursor, _common_prefix_len(render(messages[:i], True), full))
        else:
            start = full.find(content, cursor) if content else cursor
            start = cursor if start < 0 else start
        upto = render(messages[: i + 1], False)
        if full.startswith(upto):
            end = len(upto)
        else:
            # History rendered unlike a final turn: locate the content, then take the end-of-turn
            # tokens that immediately follow it.
            pos = full.find(content, start)
            if pos < 0 and "</think>" in content:
                # Qwen3-style templates render history answers without their inline think block
                content = content.split("</think>")[-1].lstrip("\n")
                pos = full.find(content, start)
            if pos < 0:
                warnings.warn(
                    f"assistant turn {i} could not be located in the rendered chat; it gets no loss",
                    stacklevel=3,
                )
                continue
            end = pos + len(content)
            matched = True
            while matched:
                matched = False
                for tok in special:
                    if full.startswith(tok, end):
                        end += len(tok)
                        matched = True
                        break
        pos = full.rfind(content, start, end) if content else -1
        content_end = pos + len(content) if pos >= 0 else start
        while end > content_end and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    return full, spans


def _mask_from_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Tokenize ``text`` and mark every token overlapping a character span (the same rule
    transformers uses for ``return_assistant_tokens_mask``, so both paths agree)."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [0] * len(ids)
        for j, (s, e) in enumerate(enc["offset_mapping"]):
            if any(e > a and s < b for a, b in spans):
                mask[j] = 1
        return ids, mask
    # Slow tokenizers have no offsets: count the tokens of each text prefix instead, which is
    # exact unless the tokenizer merges across a span boundary.
    ids = tokenizer.encode(text, add_special_tokens=False)
    mask = [0] * len(ids)
    for a, b in spans:
        lo = len(tokenizer.encode(text[:a], add_special_tokens=False))
        hi = len(tokenizer.encode(text[:b], add_special_tokens=False))
        for j in range(lo, min(hi, len(ids))):
            mask[j] = 1
    return ids, mask


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    chat_template_kwargs: dict[str, Any] | None = None,
    use_generation_blocks: bool | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenize one conversation with the chat template; returns ``(input_ids, loss_mask)``
    where the mask is 1 exactly on tokens written by the assistant.

    Args:
        use_generation_blocks: force (True) or forbid (False) the ``{% generation %}`` path;
            default: use it when the template has such blocks and the tokenizer is fast.
    """
    kwargs = dict(chat_template_kwargs or {})
    messages = normalize_messages(messages)
    if not messages:
        raise ValueError("empty conversation: a chat record needs at least one message")
    if use_generation_blocks is None:
        use_generation_blocks = tokenizer.is_fast and _has_generation_blocks(tokenizer)
    else:
        _chat_template(tokenizer)  # fail with the clear message if there is no template
    if use_generation_blocks:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
        )
        return list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
    text, spans = _assistant_spans_by_prefix(tokenizer, messages, kwargs)
    return _mask_from_spans(tokenizer, text, spans)


# --------------------------------------------------------------------------------------------
# tokenization, packing, splitting
# --------------------------------------------------------------------------------------------


def _record_columns(ds: datasets.Dataset) -> tuple[str | None, list[str]]:
    text_col = "text" if "text" in ds.column_names else None
    chat_cols = [c for c in _CHAT_COLUMNS if c in ds.column_names]
    if text_col is None and not chat_cols:
        raise ValueError(
            f"records have neither a `text` nor a `messages` field (columns: {ds.column_names}); "
            "give plain-text records a `text` field and chat records `messages` "
            "(or ShareGPT `conversations`)"
        )
    return text_col, chat_cols


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    pack: bool,
    chat_template_kwargs: dict[str, Any] | None = None,
    num_proc: int | None = None,
    pack_batch_size: int = 1000,
) -> datasets.Dataset:
    """Records → ``input_ids`` / ``loss_mask`` (lists of ints).

    Plain text gets eos appended (a target too: the drafter must learn where documents end).
    Chat keeps the template's own end-of-turn tokens. ``pack=True`` concatenates documents
    and cuts chunks of exactly ``max_length``, dropping the ragged tail of every
    ``pack_batch_size`` documents (packing is a batched map so it streams and caches);
    ``pack=False`` truncates each record to ``max_length``.

    Raises:
        ValueError: no ``text``/``messages`` column, or a record with neither field set.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if all(c in ds.column_names for c in _TOKENIZED_COLUMNS):
        return _pretokenized(ds, max_length, pack, num_proc, pack_batch_size)
    text_col, chat_cols = _record_columns(ds)
    if chat_cols:
        _chat_template(tokenizer)
    eos = tokenizer.eos_token_id
    template_kwargs = dict(chat_template_kwargs or {})
    use_generation_blocks = bool(chat_cols) and tokenizer.is_fast and _has_generation_blocks(tokenizer)

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[list[int]]]:
        n = len(indices)
        texts = batch[text_col] if text_col else [None] * n
        # Sources merged from `messages` and ShareGPT files carry both columns, one null per row.
        chats = [next((batch[c][j] for c in chat_cols if batch[c][j]), None) for j in range(n)]
        out_ids: list[list[int]] = []
        out_mask: list[list[int]] = []
        plain_rows = [j for j in range(n) if not chats[j] and texts[j] is not None]
        plain_ids = (
            tokenizer([texts[j] for j in plain_rows], add_special_tokens=True)["input_ids"]
            if plain_rows
            else []
        )
        plain = dict(zip(plain_rows, plain_ids))
        for j in range(n):
            if chats[j]:
                ids, mask = tokenize_chat(tokenizer, chats[j], template_kwargs, use_generation_blocks)
            elif j in plain:
                ids = list(plain[j])
                if eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)
                mask = [1] * len(ids)
            else:
                raise ValueError(
                    f"record {indices[j]} has neither `text` nor `messages` set; "
                    "fix or drop it (plain text needs `text`, chat needs `messages`/`conversations`)"
                )
            if not pack:
                ids, mask = ids[:max_length], mask[:max_length]
            out_ids.append(ids)
            out_mask.append(mask)
        return {"input_ids": out_ids, "loss_mask": out_mask}

    tokenized = ds.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc,
        desc="tokenizing",
    )
    if pack:
        tokenized = pack_sequences(tokenized, max_length, num_proc=num_proc, batch_size=pack_batch_size)
    return tokenized


def _pretokenized(ds: datasets.Dataset, max_length: int, pack: bool, num_proc: int | None,
                  pack_batch_size: int) -> datasets.Dataset:
    """Records that already hold ``input_ids``/``loss_mask`` (``metattt prepare``): pack or truncate."""
    ds = ds.select_columns(list(_TOKENIZED_COLUMNS))

    def cut(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        if any(ids is None for ids in batch["input_ids"]):
            raise ValueError("some records are tokenized (input_ids/loss_mask) and others are not: prepare every "
                             "source with `python -m metattt prepare`, or none")
        return {"input_ids": [list(ids[:max_length]) for ids in batch["input_ids"]],
                "loss_mask": [[int(m) for m in mask[:max_length]] for mask in batch["loss_mask"]]}

    ds = ds.map(cut, batched=True, num_proc=num_proc, desc="reading tokenized records")
    return pack_sequences(ds, max_length, num_proc=num_proc, batch_size=pack_batch_size) if pack else ds


def _pack_batch(batch: dict[str, list[list[int]]], max_length: int) -> dict[str, list[list[int]]]:
    ids = [t for seq in batch["input_ids"] for t in seq]
    mask = [m for seq in batch["loss_mask"] for m in seq]
    n = len(ids) // max_length * max_length
    return {
        "input_ids": [ids[i : i + max_length] for i in range(0, n, max_length)],
        "loss_mask": [mask[i : i + max_length] for i in range(0, n, max_length)],
    }


def pack_sequences(
    ds: datasets.Dataset, max_length: int, num_proc: int | None = None, batch_size: int = 1000
) -> datasets.Dataset:
    """Concatenate tokenized documents and cut chunks of exactly ``max_length`` tokens; each
    batch of ``batch_size`` documents drops its ragged tail."""
    return ds.map(
        _pack_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs={"max_length": max_length},
        remove_columns=ds.column_names,
        num_proc=num_proc,
        desc=f"packing into {max_length}-token chunks",
    )


def train_val_split(
    ds: datasets.Dataset, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Deterministic shuffled split: the same ``seed`` always gives the same records.

    Split raw records (before packing) so no document straddles train and validation.
    ``val_fraction = 0`` (or fewer than two records) gives an empty validation set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or len(ds) < 2:
        return ds, ds.select([])
    parts = ds.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
