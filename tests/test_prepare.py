"""Chat data preparation (`python -m metattt prepare`) and the offline hidden-state cache.

Offline: a byte-level BPE trained here with a Qwen3-style chat template (system/user/assistant
turns, `<think>` blocks, `enable_thinking`), tiny randomly initialised targets, and a stub
OpenAI-compatible server on 127.0.0.1 that serves a bounded number of requests.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import pytest
import torch
from conftest import CODE_SNIPPETS, llama_config, qwen3_config

from metattt.config import PrepareConfig
from metattt.data import SequenceDataModule, load_records, tokenize_chat
from metattt.data.feature_cache import FeatureCache, sequence_key, write_feature_cache
from metattt.data.prepare import (
    EndpointBackend,
    TransformersBackend,
    prepare_chat_data,
    record_to_messages,
)

# Qwen3's chat-template behaviour, written out: the last query's answer carries a think block (an
# empty one when the turn has no reasoning), earlier answers lose theirs, reasoning comes from
# `reasoning_content` or from `<think>...</think>` inside the content, and with enable_thinking
# false the generation prompt ends in an empty think block.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '<|im_start|>system\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is defined and m.reasoning_content is not none %}"
    "{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "<think>\nsum them\n</think>\n\ndef add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now print squares."},
    {"role": "assistant", "content": "for i in range(10):\n    print(i * i)", "reasoning_content": "a loop"},
]


def bpe_tokenizer(root: Path, specials: list[str], template: str, eos: str, pad: str, added: tuple[str, ...] = (),
                  bos: str | None = None, vocab_size: int = 400):
    """A byte-level BPE trained here (offline), saved in transformers format under `root`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = CODE_SNIPPETS * 4 + [m["content"] for m in CHAT] * 4 + ["Hello, how are you? I am fine."] * 4
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, pad_token=pad, bos_token=bos,
                                  additional_special_tokens=[t for t in specials if t not in (eos, pad, bos)],
                                  clean_up_tokenization_spaces=False)
    tok.add_tokens(list(added))
    tok.chat_template = template
    root.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(root)
    return tok


def qwen3_tokenizer(root: Path):
    """Qwen3's layout: `<|im_end|>` is eos, `<|endoftext|>` pad, `<think>`/`</think>` plain added
    tokens, and no mask token (the drafter's mask is a spare embedding row, as in DFlash)."""
    return bpe_tokenizer(root, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN3_TEMPLATE, eos="<|im_end|>",
                         pad="<|endoftext|>", added=("<think>", "</think>"))


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def llama3_tokenizer(root: Path):
    """Llama 3's layout: bos, header tokens, `<|eot_id|>` ends a turn, reserved special tokens."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    return bpe_tokenizer(root, specials, LLAMA3_TEMPLATE, eos="<|eot_id|>", pad="<|end_of_text|>",
                         bos="<|begin_of_text|>")


def tiny_target_folder(root: Path, tok, arch: str = "qwen3", layers: int = 4, extra_rows: int = 0) -> Path:
    """A randomly initialised causal LM + the tokenizer, saved like a hub checkpoint."""
    from transformers import AutoModelForCausalLM

    cfg = (qwen3_config if arch == "qwen3" else llama_config)(vocab_size=len(tok) + extra_rows, layers=layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return qwen3_tokenizer(tmp_path_factory.mktemp("qwen3tok"))


# ------------------------------------------------------------------------------ golden loss masks


def _golden(tok, segments: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


@pytest.mark.parametrize("thinking", [False, True], ids=["thinking_off", "thinking_on"])
def test_qwen3_golden_loss_masks(tok, thinking):
    ids, mask = tokenize_chat(tok, CHAT, {"enable_thinking": thinking})
    head = [
        ("<|im_start|>system\nYou write Python.<|im_end|>\n", 0),
        ("<|im_start|>user\nAdd two numbers.<|im_end|>\n", 0),
        # history answer: its think block is dropped by the template; content + <|im_end|> trained
        ("<|im_start|>assistant\n", 0), ("def add(a, b):\n    return a + b<|im_end|>", 1), ("\n", 0),
        ("<|im_start|>user\nNow print squares.<|im_end|>\n", 0),
    ]
    if thinking:  # the model writes its think block: trained
        last = [("<|im_start|>assistant\n", 0),
                ("<think>\na loop\n</think>\n\nfor i in range(10):\n    print(i * i)<|im_end|>", 1), ("\n", 0)]
    else:  # the generation prompt holds the (empty) think block: only the answer is trained.
        # Data made with thinking off has no reasoning on its last turn.
        chat = [*CHAT[:-1], {"role": "assistant", "content": CHAT[-1]["content"]}]
        ids, mask = tokenize_chat(tok, chat, {"enable_thinking": thinking})
        last = [("<|im_start|>assistant\n<think>\n\n</think>\n\n", 0),
                ("for i in range(10):\n    print(i * i)<|im_end|>", 1), ("\n", 0)]
    want_ids, want_mask = _golden(tok, head + last)
    assert ids == want_ids
    assert mask == want_mask


def test_thinking_flag_reaches_template_and_generation_prompt(tok):
    off = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------ record layouts


def test_record_layouts():
    ultrachat = record_to_messages({"id": "1", "data": ["hi", "hello", "how?", "so"]})
    assert [m["role"] for m in ultrachat] == ["user", "assistant", "user", "assistant"]
    assert ultrachat[3]["content"] == "so"
    msgs = record_to_messages({"prompt": "p", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]})
    assert msgs == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    share = record_to_messages({"system": "sys", "conversations": [
        {"from": "gpt", "value": "Hi! How can I help?"},  # greeting before any user turn: dropped
        {"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}]})
    assert share == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]
    parts = record_to_messages({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                             {"role": "assistant", "content": "y"}]})
    assert parts[0]["content"] == "x"
    assert record_to_messages({"instruction": "do", "input": "this", "output": "done"})[0]["content"] == "do\n\nthis"
    assert record_to_messages({"prompt": "p", "completion": "c"})[1] == {"role": "assistant", "content": "c"}
    from metattt.data.prepare import BadRecord

    for rec, reason in [({"text": "plain"}, "no_chat_fields"),
                        ({"messages": [{"role": "narrator", "content": "x"}]}, "unknown_role"),
                        ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn"),
                        ({"messages": [{"role": "assistant", "content": "a"}]}, "no_user_turn")]:
        with pytest.raises(BadRecord) as e:
            record_to_messages(rec)
        assert e.value.reason == reason
    # prompt-only records are fine when the target writes the answers
    assert record_to_messages({"prompt": "q"}, need_assistant=False) == [{"role": "user", "content": "q"}]


# ------------------------------------------------------------------------------ prepare: no regeneration


def _write_sources(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    good = [{"messages": CHAT[1:3]}, {"messages": CHAT}, {"conversations": [
        {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hello, how are you?"}]}]
    bad = [{"text": "no chat here"}, {"messages": [{"role": "narrator", "content": "x"}]},
           {"messages": [{"role": "user", "content": "unanswered"}]}]
    jsonl = root / "chat.jsonl"
    with open(jsonl, "w") as f:
        for rec in [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[0]]:
            f.write(json.dumps(rec) + "\n")
    parquet = root / "ultrachat.parquet"
    datasets.Dataset.from_list([{"id": str(i), "data": ["Add two numbers.", f"def add(a, b):\n    return a + b  # {i}"]}
                                for i in range(3)]).to_parquet(str(parquet))
    return {"jsonl": jsonl, "parquet": parquet}


def test_prepare_tokenizes_counts_bad_records_resumes_and_feeds_the_datamodule(tmp_path, tok, monkeypatch):
    src = _write_sources(tmp_path / "src")
    out = tmp_path / "data"
    cfg = PrepareConfig(train_files=[str(src["jsonl"]), str(src["parquet"])], val_files=str(src["parquet"]),
                        shard_size=2, enable_thinking=False)
    manifest = prepare_chat_data(cfg, tok, out, progress=False)
    s = manifest["summary"]["train"]
    assert (s["read"], s["written"]) == (10, 7)
    assert s["bad"] == {"no_chat_fields": 1, "unknown_role": 1, "no_assistant_turn": 1}
    assert manifest["settings"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert not (out / ".shards").exists()

    train = load_records(str(out / "train"))
    assert len(train) == 7 and {"messages", "input_ids", "loss_mask"} <= set(train.column_names)
    row = train[1]  # the second good record of chat.jsonl: the full CHAT
    ids, mask = tokenize_chat(tok, [{k: v for k, v in m.items() if v is not None} for m in row["messages"]],
                              {"enable_thinking": False})
    assert row["input_ids"] == ids and row["loss_mask"] == mask
    assert row["input_ids"] == tokenize_chat(tok, CHAT, {"enable_thinking": False})[0]

    # the DataModule reads the prepared folders as they are (no re-tokenization)
    dm = SequenceDataModule(tok, str(out / "train"), val_files=str(out / "validation"), pack=False,
                            max_length=64, batch_size=2)
    dm.setup("fit")
    assert dm.train_dataset[1]["input_ids"] == ids[:64]
    batch = next(iter(dm.val_dataloader()))
    assert batch["loss_mask"].sum() > 0

    # a rerun with the same settings reuses everything; other settings are refused; overwrite rebuilds
    import metattt.data.prepare as prep

    calls = []
    real = prep.process_records
    monkeypatch.setattr(prep, "process_records", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert prepare_chat_data(cfg, tok, out, progress=False)["summary"] == manifest["summary"]
    assert calls == []
    other = PrepareConfig(**{**cfg.__dict__, "enable_thinking": True})
    with pytest.raises(ValueError, match="other settings"):
        prepare_chat_data(other, tok, out, progress=False)

    # resume: a run killed in its third shard keeps the two finished ones; the rerun does the other 6
    out2 = tmp_path / "data2"

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    calls.clear()
    monkeypatch.setattr(prep, "process_records", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_chat_data(cfg, tok, out2, progress=False)
    assert len(list((out2 / ".shards" / "train").glob("*/_shard_stats.json"))) == 2
    calls.clear()
    monkeypatch.setattr(prep, "process_records", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert prepare_chat_data(cfg, tok, out2, progress=False)["summary"] == manifest["summary"]
    assert len(calls) == 8 - 2  # 4 + 2 train shards and 2 validation shards, 2 of them done before
    assert load_records(str(out2 / "train"))["input_ids"] == train["input_ids"]


# ------------------------------------------------------------------------------ regeneration


class _StubOpenAI(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions, deterministic; fails the first call for a prompt that
    says FLAKY (503, retried), truncates a prompt that says LONG."""

    seen: list = []
    flaky_done: set = set()
    max_requests = 200

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": "stub-model"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(req)
        if len(type(self).seen) > self.max_requests:
            return self._send(500, {"error": "too many requests for a test"})
        last = req["messages"][-1]["content"]
        if "FLAKY" in last and last not in type(self).flaky_done:
            type(self).flaky_done.add(last)
            return self._send(503, {"error": "warming up"})
        turn = sum(m["role"] == "assistant" for m in req["messages"])
        msg = {"role": "assistant", "content": f"R{turn}: {last[:12]}"}
        if (req.get("chat_template_kwargs") or {}).get("enable_thinking"):
            msg["reasoning_content"] = "thinking"
        finish = "length" if "LONG" in last else "stop"
        self._send(200, {"choices": [{"index": 0, "message": msg, "finish_reason": finish}]})


@pytest.fixture
def stub_server():
    _StubOpenAI.seen, _StubOpenAI.flaky_done = [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubOpenAI)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_endpoint_regeneration(tmp_path, tok, stub_server, monkeypatch):
    monkeypatch.setattr(EndpointBackend, "backoff_s", 0.01)
    src = tmp_path / "prompts.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": "Add two numbers."}, {"role": "assistant", "content": "old"},
                      {"role": "user", "content": "Now print squares."}, {"role": "assistant", "content": "old"}]},
        {"prompt": "FLAKY prompt"},  # prompt only: its answer is generated (after one 503)
        {"prompt": "LONG prompt"},  # truncated: dropped
        {"conversations": [{"from": "human", "value": "Hello"}]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = PrepareConfig(train_files=str(src), regenerate="endpoint", endpoint_url=stub_server, enable_thinking=True,
                        endpoint_concurrency=4, endpoint_retries=2, endpoint_timeout_s=10, max_new_tokens=32)
    manifest = prepare_chat_data(cfg, tok, tmp_path / "out", progress=False)
    s = manifest["summary"]["train"]
    assert (s["written"], s["bad"]) == (3, {"truncated": 1})
    rows = load_records(str(tmp_path / "out" / "train"))
    conv = rows[0]["messages"]
    # every assistant turn is the target's; turn 2 was generated after the regenerated turn 1
    assert [m["content"] for m in conv if m["role"] == "assistant"] == ["R0: Add two numb", "R1: Now print sq"]
    assert all(m["reasoning_content"] == "thinking" for m in conv if m["role"] == "assistant")
    second = next(r for r in _StubOpenAI.seen if r["messages"][-1]["content"] == "Now print squares.")
    assert second["messages"][1] == {"role": "assistant", "content": "R0: Add two numb"}
    assert all(r["chat_template_kwargs"] == {"enable_thinking": True} and r["model"] == "stub-model"
               for r in _StubOpenAI.seen)
    assert rows[1]["messages"][-1]["content"] == "R0: FLAKY prompt"[:16]
    # thinking on: the reasoning is in the trained tokens of the last turn
    trained = tok.decode([t for t, m in zip(rows[1]["input_ids"], rows[1]["loss_mask"]) if m])
    assert trained == "<think>\nthinking\n</think>\n\nR0: FLAKY prompt<|im_end|>"
    assert len(_StubOpenAI.seen) == 6  # 4 first turns + 1 retry + 1 second turn: bounded


def test_endpoint_down_fails_fast_and_failures_are_per_record(tmp_path, tok, stub_server, monkeypatch):
    monkeypatch.setattr(EndpointBackend, "backoff_s", 0.0)
    with pytest.raises(RuntimeError, match="no OpenAI-compatible server answers"):
        EndpointBackend("http://127.0.0.1:9/v1", "m", {}, 8, retries=1, timeout_s=2, progress=False)
    backend = EndpointBackend(stub_server, None, {}, 8, retries=0, timeout_s=5, progress=False)
    backend.url = "http://127.0.0.1:9/v1"  # the server goes away mid-run: that record fails, the run goes on
    out = backend.generate([[{"role": "user", "content": "x"}]])
    assert isinstance(out[0], RuntimeError)


def test_transformers_regeneration_batches_like_single_prompts(tmp_path, tok):
    folder = tiny_target_folder(tmp_path / "target", tok)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [[{"role": "user", "content": "Add two numbers."}],
               [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Hello"}]]
    batched = TransformersBackend(model, tok, {"enable_thinking": False}, max_new_tokens=6, batch_size=2,
                                  progress=False).generate(prompts)
    single = [TransformersBackend(model, tok, {"enable_thinking": False}, max_new_tokens=6, batch_size=1,
                                  progress=False).generate([p])[0] for p in prompts]
    assert [g.content for g in batched] == [g.content for g in single]
    assert all(g.truncated or g.content for g in batched)
    # what the backend decodes is exactly what greedy generate continues the prompt with
    text = tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stop = TransformersBackend(model, tok, {}, 6, progress=False).stop_ids
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop)[0, ids.shape[1]:].tolist()
    cut = next((j for j, t in enumerate(gen) if t in stop), len(gen))
    assert batched[0].content == tok.decode(gen[:cut], skip_special_tokens=False)


# ------------------------------------------------------------------------------ feature cache


def _packed_dm(tok, tmp_path: Path, **kw) -> SequenceDataModule:
    src = tmp_path / "text.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CODE_SNIPPETS * 2))
    dm = SequenceDataModule(tok, str(src), val_fraction=0.25, max_length=32, batch_size=3, pack=True, **kw)
    dm.setup("fit")
    return dm


def test_cached_features_equal_online_features_and_loss(tmp_path, tok, capsys):
    from metattt.lit.distill import DistillModule
    from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
    from metattt.models.target import FrozenTarget

    target = FrozenTarget.from_config(qwen3_config(vocab_size=len(tok)), layer_ids=[1, 2], seed=0)
    online = _packed_dm(tok, tmp_path)
    cache_dir = tmp_path / "cache"
    for ds in (online.train_dataset, online.val_dataset):
        write_feature_cache(target, ds, cache_dir, dtype="float32", batch_size=2, shard_bytes=20_000, progress=False)
    assert "tokens to write" in capsys.readouterr().out  # the expected size is printed
    cache = FeatureCache(cache_dir)
    rows = [*online.train_dataset, *online.val_dataset]
    assert len(cache) == len({sequence_key(r["input_ids"]) for r in rows})  # keyed by content: deduplicated
    assert len(list(cache_dir.glob("features-*.safetensors"))) > 1  # sharded

    cached = _packed_dm(tok, tmp_path, feature_cache=str(cache_dir))
    b_online = next(iter(online.train_dataloader()))
    b_cached = next(iter(cached.train_dataloader()))  # same seed: same order
    assert torch.equal(b_online["input_ids"], b_cached["input_ids"])
    want = target(b_online["input_ids"], attention_mask=b_online["attention_mask"], return_logits=False).features
    torch.testing.assert_close(b_cached["features"], want, rtol=1e-5, atol=1e-5)

    torch.manual_seed(1)
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=[1, 2], num_hidden_layers=1,
                                    block_size=4)
    module = DistillModule(target, BlockDrafter(cfg), num_anchors=8)
    loss_online = module._step(b_online, 0, "val").loss
    real_forward = target.forward
    target.forward = lambda *a, **k: pytest.fail("the cached path ran the target")
    loss_cached = module._step(b_cached, 0, "val").loss
    target.forward = real_forward
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-5, atol=1e-6)

    # bf16 cache: the features a bf16 target would give (rounded), written beside; resuming skips
    bf = tmp_path / "cache_bf16"
    r1 = write_feature_cache(target, online.val_dataset, bf, batch_size=2, progress=False)
    r2 = write_feature_cache(target, online.val_dataset, bf, batch_size=2, progress=False)
    unique = len({sequence_key(r["input_ids"]) for r in online.val_dataset})
    assert r1["written_sequences"] == unique and r2["written_sequences"] == 0
    assert r1["bytes"] == r1["expected_bytes"] == unique * 32 * 64 * 2
    got = FeatureCache(bf).get(online.val_dataset[0]["input_ids"])
    assert got.dtype == torch.bfloat16
    ref = target(torch.tensor([online.val_dataset[0]["input_ids"]]), return_logits=False).features[0]
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)

    # layer mismatch and a stale cache say what to do
    with pytest.raises(ValueError, match="holds layers"):
        cache.check([1, 3])
    with pytest.raises(KeyError, match="not in the feature cache"):
        cache.get([1, 2, 3])


def test_feature_cache_checks_free_disk_first(tmp_path, tok, monkeypatch):
    from collections import namedtuple

    import metattt.data.feature_cache as fc
    from metattt.models.target import FrozenTarget

    target = FrozenTarget.from_config(qwen3_config(vocab_size=len(tok)), layer_ids=[1, 2], seed=0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match="not enough disk"):
        write_feature_cache(target, [[5, 6, 7, 8] * 8], tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("features-*"))
    assert sequence_key([1, 2]) == sequence_key(torch.tensor([1, 2])) != sequence_key([2, 1])
