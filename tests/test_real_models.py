"""Real-model recipes (Qwen3-4B/8B, Llama-3.1-8B) on tiny stand-ins, and DFlash checkpoint import/export.

Nothing is downloaded: each recipe runs its own code path against a tiny target folder of the
same architecture, with only the dimensions (and the CPU settings) overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import qwen3_config
from safetensors.torch import save_file
from test_prepare import CHAT, llama3_tokenizer, qwen3_tokenizer, tiny_target_folder

from metattt.cli import main, parse_recipe
from metattt.loading import build_drafter, load_target, load_tokenizer
from metattt.models.dflash import export_dflash, load_dflash_state_dict
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.target import FrozenTarget, default_target_layer_ids

REAL_RECIPES = {
    # recipe: (architecture, target layers, layer_ids the recipe names)
    "qwen3_4b": ("qwen3", 36, [1, 9, 17, 25, 33]),
    "qwen3_8b": ("qwen3", 36, [1, 9, 17, 25, 33]),
    "llama3_8b": ("llama", 32, [1, 8, 15, 22, 29]),
}
SPARE_ROWS = 8  # Qwen3: 151,669 tokens, 151,936 embedding rows


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    qtok = qwen3_tokenizer(root / "qwen3_tok")
    ltok = llama3_tokenizer(root / "llama3_tok")
    return {
        "qwen3": tiny_target_folder(root / "qwen3", qtok, "qwen3", layers=4, extra_rows=SPARE_ROWS),
        "llama": tiny_target_folder(root / "llama", ltok, "llama", layers=4),
    }


def shrink(recipe: str, target: Path, out: Path, *extra: str) -> list[str]:
    """The recipe with tiny dimensions and CPU settings: everything else is the recipe's."""
    return [
        "--config", f"recipes/{recipe}.yaml",
        f"--run.output_root={out}",
        f"--target.path={target}", "--target.layer_ids=[1, 2]", "--target.dtype=float32",
        "--drafter.num_hidden_layers=2",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        "--data.max_length=48", "--data.batch_size=2", "--data.num_workers=0", "--data.num_proc=null",
        "--distill.num_anchors=4", "--distill.limit_val_batches=1",
        *extra,
    ]


@pytest.mark.parametrize("recipe", list(REAL_RECIPES))
def test_recipe_instantiates_shrunk(recipe, targets, tmp_path):
    arch, layers, layer_ids = REAL_RECIPES[recipe]
    # the recipe as written: DFlash's layer rule for the real target, block 16, bf16, 5 layers
    for stage in ("prepare", "distill", "meta-train", "eval"):
        _, full = parse_recipe([stage, "--config", f"recipes/{recipe}.yaml"])
    assert full.target.layer_ids == layer_ids == default_target_layer_ids(layers, 5)
    assert (full.drafter.block_size, full.drafter.num_hidden_layers) == (16, 5)
    assert full.trainer.precision == "bf16-mixed" and full.target.dtype == "bfloat16"
    assert full.drafter.intermediate_size is None and full.drafter.num_attention_heads is None

    _, r = parse_recipe(["distill", *shrink(recipe, targets[arch], tmp_path)])
    target = load_target(r.target, r.drafter.num_hidden_layers)
    tokenizer = load_tokenizer(r.target.path)
    drafter = build_drafter(r.drafter, target, tokenizer)
    cfg, tcfg = drafter.config, target.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
        tcfg.hidden_size, tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.intermediate_size)
    assert cfg.head_dim == getattr(tcfg, "head_dim", tcfg.hidden_size // tcfg.num_attention_heads)
    assert (cfg.block_size, cfg.num_hidden_layers, cfg.target_layer_ids) == (16, 2, [1, 2])
    if arch == "qwen3":  # no <|mask|> in a Qwen3 tokenizer: the first spare embedding row
        assert cfg.mask_token_id == len(tokenizer)
    else:
        assert cfg.mask_token_id == tokenizer.convert_tokens_to_ids("<|reserved_special_token_0|>")
    # one forward of the recipe's block size through the real pipeline objects
    ids = torch.randint(3, len(tokenizer), (1, 40))
    anchors = torch.tensor([[3, 20]])
    blocks = torch.full((1, 2, 16), cfg.mask_token_id)
    blocks[:, :, 0] = ids.gather(1, anchors)
    hidden = drafter(blocks, anchors, context_features=target(ids).features)
    assert hidden.shape == (1, 2, 16, tcfg.hidden_size) and torch.isfinite(hidden).all()


@pytest.mark.e2e
def test_qwen3_recipe_prepare_cache_distill_end_to_end(targets, tmp_path, caplog):
    """`prepare` (chat → tokenized Arrow + feature cache) then `distill` reading the cache, all
    through the CLI with the qwen3_4b recipe shrunk."""
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(6)))
    data = tmp_path / "out" / "qwen3_4b" / "data"
    cache = tmp_path / "features"
    args = shrink("qwen3_4b", targets["qwen3"], tmp_path / "out",
                  f"--prepare.train_files={src}", f"--prepare.val_files={src}", "--prepare.regenerate=none",
                  "--prepare.max_val_records=2", "--prepare.cache_features=true", "--prepare.cache_dtype=float32",
                  f"--data.train_files={data / 'train'}", f"--data.val_files={data / 'validation'}",
                  f"--data.feature_cache={cache}", "--distill.max_steps=2", "--distill.val_check_interval=2",
                  "--data.max_length=128")
    main(["prepare", *args])
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["summary"]["train"]["written"] == 6 and manifest["summary"]["validation"]["written"] == 2
    assert manifest["settings"]["chat_template_kwargs"] == {"enable_thinking": False}  # the recipe's explicit flag
    assert json.loads((cache / "feature_cache.json").read_text())["layer_ids"] == [1, 2]
    main(["prepare", *args])  # a rerun reuses the data and finds every sequence cached
    caplog.clear()
    with caplog.at_level("INFO", logger="metattt"):
        main(["distill", *args])
    assert "embedding and LM head only" in caplog.text  # reading cached features, the decoder is never loaded
    drafter = BlockDrafter.from_pretrained(tmp_path / "out" / "qwen3_4b" / "drafter")
    assert drafter.config.block_size == 16 and drafter.config.num_hidden_layers == 2


# ------------------------------------------------------------------------------ DFlash layout


def released_config(hidden: int, vocab: int, layer_ids: list[int], mask_id: int, *, rope_style: str = "top",
                    block_in_dflash: bool = False) -> dict:
    """A config.json shaped like the released DFlash drafters (a Qwen3 config.to_dict() plus DFlash keys)."""
    cfg = {
        "architectures": ["DFlashDraftModel"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": 4,
        "bos_token_id": 0,
        "dflash_config": {"mask_token_id": mask_id, "target_layer_ids": layer_ids},
        "eos_token_id": 0,
        "head_dim": 8,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 256,
        "max_window_layers": 2,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_target_layers": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }
    if rope_style == "parameters":  # transformers 5 writes rope_parameters and dtype
        del cfg["rope_theta"], cfg["rope_scaling"], cfg["torch_dtype"]
        cfg["rope_parameters"] = {"rope_theta": 1000000.0, "rope_type": "default"}
        cfg["dtype"] = "bfloat16"
    if block_in_dflash:
        del cfg["block_size"]
        cfg["dflash_config"]["block_size"] = 4
    return cfg


def write_released(path: Path, config: dict, state: dict[str, torch.Tensor], shards: int = 1,
                   prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "dflash.py").write_text("# the remote code auto_map names\n")  # as released folders ship it
    tensors = {prefix + k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    tensors.update(extra or {})
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def target():
    return FrozenTarget.from_config(qwen3_config(), layer_ids=[1, 2], seed=0)


def _random_state(target) -> dict[str, torch.Tensor]:
    cfg = BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=[1, 2], num_hidden_layers=2,
                                    block_size=4)
    torch.manual_seed(3)
    model = BlockDrafter(cfg)
    for p in model.parameters():  # norms away from 1 too, so a swapped tensor would show
        p.data.normal_(0, 0.1 if p.dim() > 1 else 1.0)
    return model.state_dict()


def _logits(drafter, target) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (1, 24))
    anchors = torch.tensor([[5, 12, 19]])
    blocks = torch.full((1, 3, 4), drafter.config.mask_token_id)
    blocks[:, :, 0] = ids.gather(1, anchors)
    hidden = drafter(blocks, anchors, context_features=target(ids).features)  # (1, 3, 4, H) in the drafter's dtype
    return drafter.logits(hidden.to(target.lm_head.weight.dtype))  # the target's (fp32) head


@pytest.mark.parametrize("layout", ["sharded_top_level", "single_rope_parameters_block_in_dflash"])
def test_dflash_import_export_round_trip(tmp_path, target, layout):
    state = _random_state(target)
    sharded = layout.startswith("sharded")
    config = released_config(32, 96, [1, 2], 1, rope_style="top" if sharded else "parameters",
                             block_in_dflash=not sharded)
    src = write_released(tmp_path / "released", config, state, shards=3 if sharded else 1)

    drafter = BlockDrafter.from_pretrained(src)
    assert next(drafter.parameters()).dtype == torch.bfloat16
    assert (drafter.config.block_size, drafter.config.rope_theta, drafter.config.head_dim) == (4, 1e6, 8)
    out = export_dflash(drafter, tmp_path / "exported", max_shard_bytes=20_000 if sharded else None)
    assert (out / "model.safetensors.index.json").is_file() == sharded

    # tensors: byte for byte; config.json: equal, every extra key kept where it was
    a, b = load_dflash_state_dict(src), load_dflash_state_dict(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    # (DFlash's loader reads block_size at the top level only: export writes it there as well)
    expected = config if sharded else {**config, "block_size": 4}
    assert json.loads((out / "config.json").read_text()) == expected
    assert (out / "dflash.py").read_bytes() == (src / "dflash.py").read_bytes()
    # and BlockDrafter.save_pretrained / from_pretrained are the same code path
    again = BlockDrafter.from_pretrained(drafter.save_pretrained(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == expected

    # the imported drafter computes what our native drafter computes with the same weights
    native = BlockDrafter(BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=[1, 2],
                                                    num_hidden_layers=2, block_size=4, rope_theta=1e6)).to(torch.bfloat16)
    native.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    torch.testing.assert_close(_logits(drafter.attach_target(target), target), _logits(native.attach_target(target), target),
                               rtol=0, atol=0)
    torch.testing.assert_close(_logits(again.attach_target(target), target), _logits(native, target), rtol=0, atol=0)


def test_import_tolerates_prefixes_and_borrowed_weights_and_starts_distillation(tmp_path, target):
    state = _random_state(target)
    src = write_released(tmp_path / "prefixed", released_config(32, 96, [1, 2], 1), state, prefix="model.",
                         extra={"model.embed_tokens.weight": torch.zeros(96, 32, dtype=torch.bfloat16)})
    drafter = BlockDrafter.from_pretrained(src, dtype="float32")
    assert next(drafter.parameters()).dtype == torch.float32
    for k, v in state.items():
        assert torch.equal(drafter.state_dict()[k], v.to(torch.bfloat16).float()), k
    # drafter.init_from goes through the same import
    from metattt.config import DrafterConfig

    via_pipeline = build_drafter(DrafterConfig(init_from=str(src)), target, tokenizer=None)  # ids come from config.json
    assert via_pipeline.config.target_layer_ids == [1, 2] and via_pipeline.config.mask_token_id == 1

    # ours → bf16, sharded, in the released layout → imports back to the same weights
    ours = BlockDrafter(BlockDrafterConfig.from_target(target.config, mask_token_id=1, target_layer_ids=[1, 2],
                                                  num_hidden_layers=2, block_size=4))
    out = ours.save_pretrained(tmp_path / "ours", dtype="bfloat16", max_shard_bytes=10_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["dflash_config"] == {"mask_token_id": 1, "target_layer_ids": [1, 2]}
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    back = BlockDrafter.from_pretrained(out)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16)), k


def test_import_refuses_what_it_cannot_compute(tmp_path, target):
    state = _random_state(target)
    cases = {
        "dflash2": ({"architectures": ["DFlash2DraftModel"]}, "only the DFlash block drafter"),
        "sliding": ({"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True},
                    "sliding-window"),
        "softcap": ({"dflash_config": {"mask_token_id": 1, "target_layer_ids": [1, 2],
                                       "final_logit_softcapping": 20.0}}, "does not implement"),
        "shape": ({"intermediate_size": 48}, "do not fit"),
    }
    for name, (patch, match) in cases.items():
        src = write_released(tmp_path / name, {**released_config(32, 96, [1, 2], 1), **patch}, state)
        with pytest.raises(ValueError, match=match):
            BlockDrafter.from_pretrained(src)
    # RoPE scaling is applied now (tests/test_interop.py); a rope_type transformers lacks is refused
    unknown = write_released(tmp_path / "unknown_rope", {**released_config(32, 96, [1, 2], 1), "rope_scaling": {
        "rope_type": "not_a_rope", "factor": 8.0}}, state)
    with pytest.raises(ValueError, match="not_a_rope"):
        BlockDrafter.from_pretrained(unknown)
    index_missing = write_released(tmp_path / "broken", released_config(32, 96, [1, 2], 1), state, shards=2)
    next(index_missing.glob("model-00002-*")).unlink()
    with pytest.raises(FileNotFoundError, match="names shards"):
        BlockDrafter.from_pretrained(index_missing)
