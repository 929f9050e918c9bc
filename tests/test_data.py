"""Data pipeline: loading, chat loss masks, packing, splits, DataModule batches, errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from metattt.data import (
    SequenceDataModule,
    load_records,
    mask_token_id,
    tokenize_chat,
    tokenize_dataset,
    train_val_split,
)

SPECIAL = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "I am fine, thank you. And you?",
    "def add(x, y):\n    return x + y\n",
    "Speculative decoding drafts tokens that the target model verifies.",
    "user assistant system",
]

# ChatML; assistant content + <|im_end|> inside {% generation %}, the header and the "\n" outside.
CHATML_GENERATION = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering without generation blocks: exercises the prefix-rendering fallback.
CHATML_PLAIN = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3-like: an empty think block on the last assistant turn and in the generation prompt
# when enable_thinking is false; history turns are rendered without it.
QWEN3_LIKE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and loop.last and enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You are fine."},
    {"role": "user", "content": "Hello world, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you."},
    {"role": "user", "content": "And the fox?"},
    {"role": "assistant", "content": "The quick brown fox jumps."},
]


def build_tokenizer(
    chat_template: str = CHATML_GENERATION, with_mask: bool = True
) -> PreTrainedTokenizerFast:
    special = SPECIAL if with_mask else [t for t in SPECIAL if t != "<|mask|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", extra_special_tokens=special[1:]
    )
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keep the Arrow caches of these tests out of the user's ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def golden(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Expected ids/mask built piece by piece: headers and the trailing newline are 0,
    assistant content and its <|im_end|> are 1, everything else 0."""
    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, bit: int) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([bit] * len(piece))

    for m in messages:
        add(f"<|im_start|>{m['role']}\n", 0)
        if m["role"] == "assistant":
            add(m["content"] + "<|im_end|>", 1)
            add("\n", 0)
        else:
            add(m["content"] + "<|im_end|>\n", 0)
    return ids, mask


# ------------------------------------------------------------------------------ loading


def test_load_jsonl_parquet_txt_glob_dir_and_list(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    datasets.Dataset.from_list([{"text": "three"}, {"text": "four"}, {"text": "five"}]).to_parquet(
        str(tmp_path / "b.parquet")
    )
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    (txt_dir / "x.txt").write_text("line one\nline two\n")
    (txt_dir / "y.txt").write_text("another file")

    assert load_records(str(tmp_path / "a.jsonl"))["text"] == ["one", "two"]
    assert load_records(str(tmp_path / "b.parquet"))["text"] == ["three", "four", "five"]
    # .txt: one record per file, whole file as `text`
    txt = load_records(str(txt_dir / "*.txt"))
    assert len(txt) == 2 and txt[0]["text"].startswith("line one\nline two")
    assert len(load_records(str(txt_dir))) == 2
    both = load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")])
    assert sorted(both["text"]) == sorted(["one", "two", "three", "four", "five"])


def test_load_mixed_text_chat_and_sharegpt_files(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT, "id": 7}])
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": role[m["role"]], "value": m["content"]} for m in CHAT]
    write_jsonl(tmp_path / "sharegpt.json", [{"conversations": sharegpt, "source": "x"}])
    (tmp_path / "doc.txt").write_text("plain document")
    ds = load_records(
        [str(tmp_path / "chat.jsonl"), str(tmp_path / "sharegpt.json"), str(tmp_path / "doc.txt")]
    )
    assert set(ds.column_names) == {"text", "messages", "conversations"} and len(ds) == 3
    out = tokenize_dataset(ds, tokenizer, max_length=512, pack=False)
    want_ids, want_mask = golden(tokenizer, CHAT)
    assert out["input_ids"][:2] == [want_ids, want_ids] and out["loss_mask"][:2] == [want_mask, want_mask]
    assert out["input_ids"][2][-1] == tokenizer.eos_token_id


def test_missing_file_and_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_records(str(tmp_path / "*.jsonl"))
    (tmp_path / "data.csvx").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown extension"):
        load_records(str(tmp_path / "data.csvx"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_records(str(empty))


# ------------------------------------------------------------------------------ chat masks


def test_chat_mask_generation_blocks_matches_golden(tokenizer: PreTrainedTokenizerFast) -> None:
    ids, mask = tokenize_chat(tokenizer, CHAT)
    want_ids, want_mask = golden(tokenizer, CHAT)
    assert ids == want_ids
    assert mask == want_mask
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "I am fine, thank you.<|im_end|>The quick brown fox jumps.<|im_end|>"


def test_prefix_fallback_gives_same_mask(tokenizer: PreTrainedTokenizerFast) -> None:
    plain = build_tokenizer(CHATML_PLAIN)
    assert tokenize_chat(plain, CHAT) == tokenize_chat(tokenizer, CHAT)
    # the fallback can also be forced on the generation-block template
    assert tokenize_chat(tokenizer, CHAT, use_generation_blocks=False) == tokenize_chat(tokenizer, CHAT)


def test_sharegpt_conversations(tokenizer: PreTrainedTokenizerFast) -> None:
    role = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": role[m["role"]], "value": m["content"]} for m in CHAT]
    assert tokenize_chat(tokenizer, sharegpt) == tokenize_chat(tokenizer, CHAT)
    ds = datasets.Dataset.from_list([{"conversations": sharegpt}])
    out = tokenize_dataset(ds, tokenizer, max_length=512, pack=False)
    assert out[0]["loss_mask"] == golden(tokenizer, CHAT)[1]


def test_chat_template_kwargs_pass_through() -> None:
    tok = build_tokenizer(QWEN3_LIKE)
    ids, mask = tokenize_chat(tok, CHAT, {"enable_thinking": False})
    text = tok.decode(ids)
    assert text.count("<think>") == 1  # only on the last turn
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    # the empty think block is part of the generation prompt, so it is not a target
    assert trained == "I am fine, thank you.<|im_end|>The quick brown fox jumps.<|im_end|>"
    ids_default, _ = tokenize_chat(tok, CHAT)
    assert "<think>" not in tok.decode(ids_default)


# ------------------------------------------------------------------------------ tokenize / pack / split


def test_plain_text_gets_eos_and_full_mask(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = datasets.Dataset.from_list([{"text": "Hello world"}, {"text": "The quick brown fox"}])
    out = tokenize_dataset(ds, tokenizer, max_length=512, pack=False)
    assert out.column_names == ["input_ids", "loss_mask"]
    for row, text in zip(out, ds["text"]):
        assert row["input_ids"] == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        assert row["loss_mask"] == [1] * len(row["input_ids"])
    short = tokenize_dataset(ds, tokenizer, max_length=3, pack=False)
    assert [len(r) for r in short["input_ids"]] == [3, 3]


def test_packing_exact_chunks_and_no_token_lost(tokenizer: PreTrainedTokenizerFast) -> None:
    # from_list takes its columns from the first row: name both fields in every row
    rows = [{"text": s, "messages": None} for s in CORPUS * 3] + [{"text": None, "messages": CHAT}]
    ds = datasets.Dataset.from_list(rows)
    unpacked = tokenize_dataset(ds, tokenizer, max_length=10_000, pack=False)
    stream = [t for seq in unpacked["input_ids"] for t in seq]
    stream_mask = [m for seq in unpacked["loss_mask"] for m in seq]
    max_length = 16
    packed = tokenize_dataset(ds, tokenizer, max_length=max_length, pack=True)
    assert len(packed) == len(stream) // max_length
    assert all(len(r) == max_length for r in packed["input_ids"])
    assert [t for seq in packed["input_ids"] for t in seq] == stream[: len(packed) * max_length]
    assert [m for seq in packed["loss_mask"] for m in seq] == stream_mask[: len(packed) * max_length]
    # every plain-text document ends in eos inside the packed stream
    assert stream.count(tokenizer.eos_token_id) == len(CORPUS) * 3


def test_record_without_text_or_messages(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="neither a `text` nor a `messages`"):
        tokenize_dataset(datasets.Dataset.from_list([{"body": "x"}]), tokenizer, 8, pack=False)
    ds = datasets.Dataset.from_list([{"text": "fine"}, {"text": None}])
    with pytest.raises(ValueError, match="record 1 has neither"):
        tokenize_dataset(ds, tokenizer, 8, pack=False)


def test_train_val_split_deterministic() -> None:
    ds = datasets.Dataset.from_list([{"text": str(i)} for i in range(100)])
    a_train, a_val = train_val_split(ds, 0.1, seed=3)
    b_train, b_val = train_val_split(ds, 0.1, seed=3)
    _, c_val = train_val_split(ds, 0.1, seed=4)
    assert a_val["text"] == b_val["text"] and a_train["text"] == b_train["text"]
    assert len(a_val) == 10 and len(a_train) == 90
    assert set(a_val["text"]).isdisjoint(a_train["text"])
    assert a_val["text"] != c_val["text"]
    assert len(train_val_split(ds, 0.0, seed=0)[1]) == 0


# ------------------------------------------------------------------------------ DataModule


@pytest.fixture()
def chat_and_text_files(tmp_path: Path) -> dict[str, str]:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"text": s} for s in CORPUS * 5] + [{"messages": CHAT}] * 5
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"messages": CHAT}] * 3)
    return {"train": str(train), "val": str(val)}


def test_datamodule_batches(tokenizer: PreTrainedTokenizerFast, chat_and_text_files: dict[str, str]) -> None:
    dm = SequenceDataModule(
        tokenizer,
        train_files=chat_and_text_files["train"],
        val_files=chat_and_text_files["val"],
        max_length=64,
        pack=False,
        batch_size=4,
    )
    dm.setup("fit")
    assert len(dm.val_dataset) == 3
    pad = tokenizer.eos_token_id  # no pad token: eos pads
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
        assert all(v.dtype == torch.long and v.shape == batch["input_ids"].shape for v in batch.values())
        assert batch["input_ids"].shape[0] <= 4 and batch["input_ids"].shape[1] <= 64
        padding = batch["attention_mask"] == 0
        assert (batch["loss_mask"][padding] == 0).all()
        assert (batch["input_ids"][padding] == pad).all()
        # right padding: real tokens form a prefix
        assert (
            (batch["attention_mask"].cumsum(1) == torch.arange(1, batch["input_ids"].shape[1] + 1))
            .logical_or(padding)
            .all()
        )
    val_batch = next(iter(dm.val_dataloader()))
    want_ids, want_mask = golden(tokenizer, CHAT)
    assert val_batch["input_ids"][0].tolist() == want_ids
    assert val_batch["loss_mask"][0].tolist() == want_mask
    assert dm.mask_token_id == tokenizer.convert_tokens_to_ids("<|mask|>")


def test_datamodule_from_path_packed_seeded_shuffle(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, chat_and_text_files: dict[str, str]
) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")

    def first_batches(seed: int) -> list[torch.Tensor]:
        dm = SequenceDataModule(
            str(tmp_path / "tok"),
            train_files=chat_and_text_files["train"],
            val_fraction=0.1,
            max_length=16,
            batch_size=2,
            seed=seed,
        )
        dm.setup("fit")
        assert len(dm.val_dataset) > 0
        batches = [b["input_ids"] for b in dm.train_dataloader()]
        assert all(b.shape[1] == 16 for b in batches)
        return batches

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_datamodule_min_length_and_max_records(
    tokenizer: PreTrainedTokenizerFast, chat_and_text_files: dict[str, str]
) -> None:
    dm = SequenceDataModule(
        tokenizer,
        train_files=chat_and_text_files["train"],
        val_fraction=0.0,
        pack=False,
        min_length=12,
        max_records=len(CORPUS),
    )
    dm.setup()
    lengths = [len(ids) for ids in dm.train_dataset["input_ids"]]
    assert all(n >= 12 for n in lengths)
    assert len(lengths) + dm.num_dropped["train"] == len(CORPUS)
    assert dm.num_dropped["train"] > 0
    assert dm.val_dataloader() == []


def test_datamodule_empty_dataset_error(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "Hi"}])
    dm = SequenceDataModule(tokenizer, train_files=str(train), val_fraction=0.0, pack=True, max_length=64)
    with pytest.raises(ValueError, match="no sequences: check train_files / min_length / max_length"):
        dm.setup("fit")


def test_missing_mask_token_error() -> None:
    tok = build_tokenizer(with_mask=False)
    with pytest.raises(ValueError, match="has no mask token.*add_special_tokens"):
        mask_token_id(tok)
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    assert mask_token_id(tok) == tok.convert_tokens_to_ids("<|mask|>")
