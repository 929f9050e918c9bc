"""Interoperability with the tools drafters are served with (issue 18): RoPE scaling as transformers
computes it, config.json read as DFlash's reader (transformers' Qwen3Config) reads it, re-exports that
keep the source folder's other files, the `export` stage with a merged LoRA, and an export that has
every key vLLM's DFlash loader reads."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import MASK_ID, qwen3_config
from safetensors.torch import load_file, save_file

from metattt.export.serving import export_merged
from metattt.models import ar_drafter as ar_module
from metattt.models import drafter as drafter_module
from metattt.models.ar_drafter import ARDrafter, ARDrafterConfig
from metattt.models.base import rotary_cos_sin
from metattt.models.dflash import export_dflash, load_dflash_state_dict
from metattt.models.drafter import BlockDrafter, BlockDrafterConfig
from metattt.models.target import FrozenTarget

# --- RoPE -------------------------------------------------------------------------------------

# max_position_embeddings is 256 in the tiny config; positions past it exercise dynamic scaling
ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}
LONG = 300


def _target_config(rope: dict | None, vocab_size: int = 96):
    cfg = qwen3_config(vocab_size=vocab_size)
    if rope is not None:  # through the constructor, so transformers standardizes it as for a real config
        from transformers import Qwen3Config

        cfg = Qwen3Config(**{**cfg.to_dict(), "rope_scaling": dict(rope), "rope_parameters": None})
    return cfg


def _hf_cos_sin(target_config, positions: torch.Tensor, seq_len: int | None = None):
    """transformers' own rotary embedding (a fresh module, as in one forward) at `positions`; with
    `seq_len`, the positions of one call reaching seq_len - 1 (one forward over context and block)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    rotary = Qwen3RotaryEmbedding(target_config)
    flat = positions.reshape(1, -1)
    if seq_len is not None:
        flat = torch.cat([flat, flat.new_tensor([[seq_len - 1]])], 1)
    cos, sin = rotary(torch.zeros(1), flat)
    n = positions.numel()
    return cos[0, :n].reshape(*positions.shape, -1), sin[0, :n].reshape(*positions.shape, -1)


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rotary_tables_are_transformers_own(name):
    tcfg = _target_config(ROPE_CASES[name])
    cfg = BlockDrafterConfig.from_target(tcfg, mask_token_id=MASK_ID, target_layer_ids=[1, 2], num_hidden_layers=2)
    assert (cfg.rope_scaling is None) == (name == "default")
    plain = BlockDrafterConfig.from_target(qwen3_config(), mask_token_id=MASK_ID, target_layer_ids=[1, 2])
    for positions in (torch.arange(40)[None], torch.arange(LONG)[None], torch.arange(200, 230).view(2, 15)):
        cos, sin = rotary_cos_sin(positions, cfg, torch.float32)
        ref_cos, ref_sin = _hf_cos_sin(tcfg, positions)
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
    if name != "default":  # the setting matters where it is tested: not plain RoPE
        far = torch.arange(LONG)[None]
        assert (rotary_cos_sin(far, cfg, torch.float32)[0] - rotary_cos_sin(far, plain, torch.float32)[0]).abs().max() > 1e-2


def _random_weights(model: torch.nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():  # norms away from 1 too, so RoPE differences reach the logits
        p.data.normal_(0, 0.2 if p.dim() > 1 else 1.0)


@pytest.mark.parametrize("kind", ["block", "autoregressive"])
@pytest.mark.parametrize("name", [n for n in ROPE_CASES if n != "default"])
def test_drafter_outputs_under_transformers_rotary_embedding(name, kind, monkeypatch):
    """The drafter's logits equal those computed with transformers' rotary embedding in its place,
    and differ from plain RoPE's (so the scaling reaches the drafter, for both kinds)."""
    tcfg = _target_config(ROPE_CASES[name])
    target = FrozenTarget.from_config(tcfg, layer_ids=[1, 2], seed=0)
    cls, config_cls = (BlockDrafter, BlockDrafterConfig) if kind == "block" else (ARDrafter, ARDrafterConfig)
    cfg = config_cls.from_target(tcfg, mask_token_id=MASK_ID, target_layer_ids=[1, 2], num_hidden_layers=2,
                                 block_size=4)
    drafter = cls(cfg).attach_target(target)
    _random_weights(drafter)
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (1, LONG))
    anchors = torch.tensor([[20, 150, LONG - 4]])
    blocks = ids[0, anchors[0, :, None] + torch.arange(4)][None]  # (1, 3, 4): teacher-forced chains / blocks
    if kind == "block":
        blocks[..., 1:] = MASK_ID
    feats = target(ids).features

    def logits():
        return drafter.logits(drafter(blocks, anchors, context_features=feats))

    ours = logits()
    ref_fn = lambda pos, config, dtype, seq_len=None: tuple(t.to(dtype) for t in _hf_cos_sin(tcfg, pos, seq_len))  # noqa: E731
    monkeypatch.setattr(drafter_module, "rotary_cos_sin", ref_fn)
    monkeypatch.setattr(ar_module, "rotary_cos_sin", ref_fn)
    torch.testing.assert_close(ours, logits(), rtol=0, atol=1e-5)
    monkeypatch.undo()
    drafter.config.rope_scaling = None
    assert (logits() - ours).abs().max() > 1e-2, "the rope setting did not change the drafter's outputs"


def test_decoding_cache_uses_the_same_rope_as_the_packed_forward():
    """The cached decode path (context K/V extended step by step) rotates as the packed forward."""
    tcfg = _target_config(ROPE_CASES["llama3"])
    target = FrozenTarget.from_config(tcfg, layer_ids=[1, 2], seed=0)
    drafter = BlockDrafter(BlockDrafterConfig.from_target(tcfg, mask_token_id=MASK_ID, target_layer_ids=[1, 2],
                                                     num_hidden_layers=2, block_size=4)).attach_target(target)
    _random_weights(drafter)
    ids = torch.randint(3, 90, (1, 60))
    feats = target(ids).features
    cache = drafter.extend_cache(drafter.extend_cache(None, feats[:, :37]), feats[:, 37:50])
    block = torch.full((1, 1, 4), MASK_ID)
    block[0, 0, 0] = ids[0, 50]
    anchors = torch.tensor([[50]])
    torch.testing.assert_close(drafter(block, anchors, cache=cache),
                               drafter(block, anchors, context_features=feats[:, :50]), rtol=0, atol=1e-5)


# --- config.json: DFlash's reader, export round trips --------------------------------------------


def _config(**patch) -> dict:
    """A small released-style DFlash config.json (Qwen3Config keys + DFlash's)."""
    cfg = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "attention_bias": False, "block_size": 4,
        "dflash_config": {"mask_token_id": MASK_ID, "target_layer_ids": [1, 2]}, "head_dim": 8, "hidden_act": "silu",
        "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 256, "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "num_target_layers": 4, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000, "vocab_size": 96, "torch_dtype": "float32",
    }
    for k, v in patch.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def _write(folder: Path, config: dict, weights_for: BlockDrafterConfig | None = None, seed: int = 3) -> Path:
    """config.json (+ random weights shaped for `weights_for`)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if weights_for is not None:
        model = BlockDrafter(weights_for)
        _random_weights(model, seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def _native(tcfg=None, **overrides) -> BlockDrafterConfig:
    return BlockDrafterConfig.from_target(tcfg or qwen3_config(), mask_token_id=MASK_ID, target_layer_ids=[1, 2],
                                     num_hidden_layers=2, block_size=4, **overrides)


def _logits(drafter, target, T: int = 40) -> torch.Tensor:
    torch.manual_seed(0)
    ids = torch.randint(3, 90, (1, T))
    anchors = torch.tensor([[5, 17, T - 4]])
    blocks = torch.full((1, 3, 4), MASK_ID)
    blocks[:, :, 0] = ids.gather(1, anchors)
    return drafter.logits(drafter(blocks, anchors, context_features=target(ids).features))


def test_missing_rope_theta_reads_as_qwen3configs_default(tmp_path):
    from transformers import Qwen3Config

    default = Qwen3Config()
    expected = float((getattr(default, "rope_parameters", None) or {}).get("rope_theta", getattr(default, "rope_theta", 0)))
    assert expected == 10000.0
    src = _write(tmp_path / "src", _config(rope_theta=None), _native(rope_theta=10000.0))
    drafter = BlockDrafter.from_pretrained(src)
    assert drafter.config.rope_theta == 10000.0
    target = FrozenTarget.from_config(qwen3_config(), layer_ids=[1, 2], seed=0)
    drafter.attach_target(target)
    for theta, same in ((1e4, True), (1e6, False)):
        native = BlockDrafter(_native(rope_theta=theta)).attach_target(target)
        native.load_state_dict(load_file(str(src / "model.safetensors")))
        diff = (_logits(drafter, target) - _logits(native, target)).abs().max()
        assert (diff == 0) == same, (theta, diff)
    # vLLM defaults a missing rope_theta to 1e6: the export says 10000 outright
    assert json.loads((export_dflash(drafter, tmp_path / "out") / "config.json").read_text())["rope_theta"] == 10000.0


def test_missing_head_dim_reads_as_128_not_hidden_over_heads(tmp_path):
    src = _write(tmp_path / "src", _config(head_dim=None), _native(head_dim=128))
    drafter = BlockDrafter.from_pretrained(src)
    assert drafter.config.head_dim == 128 and drafter.layers[0].self_attn.q_proj.weight.shape == (4 * 128, 32)
    # weights shaped for hidden / heads = 8 do not fit what the config means
    bad = _write(tmp_path / "bad", _config(head_dim=None), _native(head_dim=8))
    with pytest.raises(ValueError, match="do not fit"):
        BlockDrafter.from_pretrained(bad)
    assert json.loads((export_dflash(drafter, tmp_path / "out") / "config.json").read_text())["head_dim"] == 128


def test_missing_kv_heads_read_as_qwen3config_does(tmp_path):
    missing = _write(tmp_path / "missing", _config(num_key_value_heads=None, num_attention_heads=32))
    assert BlockDrafterConfig.from_pretrained(missing).num_key_value_heads == 32
    null = _write(tmp_path / "null", {**_config(), "num_key_value_heads": None})
    assert BlockDrafterConfig.from_pretrained(null).num_key_value_heads == 4  # null: as many as query heads


def test_top_level_block_size_wins_and_disagreement_is_warned(tmp_path, caplog):
    both = _config(block_size=4, dflash_config={"mask_token_id": MASK_ID, "target_layer_ids": [1, 2], "block_size": 8})
    src = _write(tmp_path / "both", both, _native())
    with caplog.at_level(logging.WARNING, logger="metattt.models.dflash"):
        drafter = BlockDrafter.from_pretrained(src)
    assert drafter.config.block_size == 4
    assert re.search(r"block_size 4 at the top level and 8 in dflash_config", caplog.text)
    out = json.loads((export_dflash(drafter, tmp_path / "out") / "config.json").read_text())
    assert out["block_size"] == out["dflash_config"]["block_size"] == 4

    caplog.clear()
    agree = _write(tmp_path / "agree", {**both, "block_size": 8}, _native())
    with caplog.at_level(logging.WARNING, logger="metattt.models.dflash"):
        assert BlockDrafter.from_pretrained(agree).config.block_size == 8
    assert "block_size" not in caplog.text

    nested = _config(block_size=None, dflash_config={"mask_token_id": MASK_ID, "target_layer_ids": [1, 2],
                                                     "block_size": 8})
    drafter = BlockDrafter.from_pretrained(_write(tmp_path / "nested", nested, _native()))
    assert drafter.config.block_size == 8
    # DFlash's loader reads block_size at the top level only: the export writes it there too
    out = json.loads((export_dflash(drafter, tmp_path / "out2") / "config.json").read_text())
    assert out["block_size"] == out["dflash_config"]["block_size"] == 8


@pytest.mark.parametrize("style", ["rope_scaling", "rope_parameters"])
def test_imported_rope_settings_are_applied_and_kept(tmp_path, style, caplog):
    rope = ROPE_CASES["llama3"] if style == "rope_scaling" else ROPE_CASES["yarn"]
    patch = {"rope_scaling": dict(rope)} if style == "rope_scaling" else {
        "rope_scaling": None, "rope_theta": None, "rope_parameters": {"rope_theta": 1000000.0, **rope}}
    tcfg = _target_config(rope)
    config = _config(**patch)
    src = _write(tmp_path / "src", config, _native(tcfg, rope_theta=1e6))
    with caplog.at_level(logging.WARNING, logger="metattt.models.dflash"):
        drafter = BlockDrafter.from_pretrained(src)
    assert not [r for r in caplog.records if r.name == "metattt.export.dflash"]
    assert drafter.config.rope_scaling == rope
    target = FrozenTarget.from_config(tcfg, layer_ids=[1, 2], seed=0)
    native = BlockDrafter(_native(tcfg, rope_theta=1e6)).attach_target(target)
    native.load_state_dict(load_file(str(src / "model.safetensors")))
    assert native.config.rope_scaling is not None
    torch.testing.assert_close(_logits(drafter.attach_target(target), target, T=LONG), _logits(native, target, T=LONG),
                               rtol=0, atol=0)
    out = json.loads((export_dflash(drafter, tmp_path / "out") / "config.json").read_text())
    assert out == config  # the round trip keeps the settings where they were


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope_type 'nonsense'"):
        _native(rope_scaling={"rope_type": "nonsense", "factor": 2.0})
    with pytest.raises(ValueError, match="partial rotary"):
        _native(rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.5})


# --- re-export keeps the folder's other files; auto_map only where it can be honoured -------------


def test_reexport_keeps_every_non_weight_file_byte_for_byte(tmp_path):
    code = b"# remote code as the release ships it\nclass DFlashDraftModel: ...\n\x00\xff"
    src = _write(tmp_path / "release", _config(auto_map={"AutoModel": "dflash.DFlashDraftModel"}), _native())
    files = {"dflash.py": code, "README.md": b"---\nlicense: mit\n---\n# a drafter\n",
             "generation_config.json": b'{"do_sample": false}', "assets/notes.txt": bytes(range(256))}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    drafter = BlockDrafter.from_pretrained(src)
    files["dflash.py"] = code + b"# edited after import\n"  # what is on disk when exporting is what ships
    (src / "dflash.py").write_bytes(files["dflash.py"])
    out = export_dflash(drafter, tmp_path / "re", dtype="bfloat16")
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        [*files, "config.json", "model.safetensors"])
    assert json.loads((out / "config.json").read_text())["auto_map"] == {"AutoModel": "dflash.DFlashDraftModel"}
    # a re-export of the re-export carries them on
    again = export_dflash(BlockDrafter.from_pretrained(out), tmp_path / "again")
    assert all((again / rel).read_bytes() == data for rel, data in files.items())
    # exporting into the source folder itself (twice) copies neither the export nor its temp folder
    for _ in range(2):
        inside = export_dflash(drafter, src / "exported")
    assert sorted(p.name for p in inside.iterdir()) == sorted(["assets", "config.json", "dflash.py",
                                                              "generation_config.json", "model.safetensors",
                                                              "README.md"])


def test_auto_map_without_its_code_file_is_not_exported(tmp_path, caplog):
    src = _write(tmp_path / "release", _config(auto_map={"AutoModel": "dflash.DFlashDraftModel",
                                                         "AutoConfig": "z-lab/dflash--configuration.Cfg"}), _native())
    with caplog.at_level(logging.WARNING, logger="metattt.models.dflash"):
        out = export_dflash(BlockDrafter.from_pretrained(src), tmp_path / "re")
    assert json.loads((out / "config.json").read_text())["auto_map"] == {"AutoConfig": "z-lab/dflash--configuration.Cfg"}
    assert "dflash.py is not in the drafter's folder" in caplog.text
    # a drafter built here never names remote code
    native = export_dflash(BlockDrafter(_native()), tmp_path / "native")
    assert "auto_map" not in json.loads((native / "config.json").read_text())


def test_separate_mask_embedding_is_refused(tmp_path):
    src = _write(tmp_path / "src", _config(), _native())
    torch.save(torch.zeros(32), src / "mask_embedding.pt")
    with pytest.raises(ValueError, match="mask_embedding.pt"):
        BlockDrafter.from_pretrained(src)


# --- metattt export --merge-lora ------------------------------------------------------------------


def _meta_run(tmp_path: Path, base_dtype=None) -> tuple[Path, FrozenTarget]:
    """A run folder with drafter/ and meta_lora/ (a LoRA with B != 0, as meta-training leaves it)."""
    from metattt.export.meta_lora import export_meta_lora
    from metattt.models.lora import add_lora
    from metattt.ttt.tasks import TTTConfig

    target = FrozenTarget.from_config(qwen3_config(), layer_ids=[1, 2], seed=0)
    drafter = BlockDrafter(_native()).attach_target(target)
    _random_weights(drafter)
    run = tmp_path / "run"
    drafter.save_pretrained(run / "drafter", dtype=base_dtype)
    model = add_lora(BlockDrafter.from_pretrained(run / "drafter", dtype="float32").attach_target(target), r=4, alpha=8)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    export_meta_lora(model, run / "meta_lora", TTTConfig(), run / "drafter")
    return run, target


@pytest.mark.e2e
def test_merged_export_equals_the_drafter_with_its_lora(tmp_path):
    from peft import PeftModel

    from metattt.cli import main

    run, target = _meta_run(tmp_path)
    # export reads the run folder only; data.train_files is the one key every recipe must name
    recipe = [f"--run.output_root={tmp_path}", "--run.name=run", "--data.train_files=unused.jsonl"]
    main(["export", *recipe, "--merge-lora"])
    merged = BlockDrafter.from_pretrained(run / "serve" / "meta_static").attach_target(target)
    assert not any("lora" in k for k in load_dflash_state_dict(run / "serve" / "meta_static"))
    with_lora = PeftModel.from_pretrained(BlockDrafter.from_pretrained(run / "drafter").attach_target(target), str(run / "meta_lora"))
    ref = _logits(with_lora, target)
    torch.testing.assert_close(_logits(merged, target), ref, rtol=0, atol=1e-5)
    with with_lora.disable_adapter():
        assert (_logits(with_lora, target) - ref).abs().max() > 1e-2, "the LoRA does not change the drafter"
    # without --merge-lora: the static drafter, the same weights as drafter/
    main(["export", *recipe])
    static, base = load_dflash_state_dict(run / "serve" / "static"), load_dflash_state_dict(run / "drafter")
    assert static.keys() == base.keys() and all(torch.equal(static[k], base[k]) for k in base)


def test_merged_export_keeps_the_drafters_dtype(tmp_path):
    run, target = _meta_run(tmp_path, base_dtype="bfloat16")
    out = export_merged(run / "drafter", run / "meta_lora", tmp_path / "merged")
    assert {v.dtype for v in load_dflash_state_dict(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_refuses_the_autoregressive_drafter(tmp_path):
    from metattt.config import ExportConfig
    from metattt.export.serving import run_export

    cfg = ARDrafterConfig.from_target(qwen3_config(), mask_token_id=MASK_ID, target_layer_ids=[1, 2],
                                      num_hidden_layers=1, block_size=4)
    ARDrafter(cfg).save_pretrained(tmp_path / "run" / "drafter")
    with pytest.raises(ValueError, match="DFlash-layout block drafters only"):
        run_export(tmp_path / "run", ExportConfig())


# --- what vLLM's DFlash loader reads --------------------------------------------------------------


def vllm_dflash_problems(folder: Path, target_vocab_size: int, target_num_layers: int) -> list[str]:
    """Every key and value vLLM's DFlash path reads from a drafter folder, checked against what that
    code expects. Written from reading vllm-project/vllm (the copy stored for this project's search
    tool; no version file, so by file commits): `vllm/model_executor/models/qwen3_dflash.py` @ 036a00d1
    (DFlashQwen3ForCausalLM / DFlashQwen3Model / DFlashQwen3DecoderLayer: load_weights, layer and
    attention construction), `vllm/v1/spec_decode/dflash.py` @ 01046b9a (DFlashProposer: mask token),
    `vllm/config/speculative.py` @ 002e77c1 (method "dflash": parallel drafting, block =
    num_speculative_tokens + 1), `vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py` @ 0cfdd2e1
    (aux layer ids) and `vllm/transformers_utils/config.py` (`set_default_rope_theta`). The registry
    entry `"DFlashDraftModel": ("qwen3_dflash", "DFlashQwen3ForCausalLM")` is quoted from vLLM forks'
    patches against it (the stored upstream registry.py predates DFlash); notes on vLLM 0.20.2 and
    0.25.0 show the same entry and proposer."""
    problems: list[str] = []
    cfg = json.loads((folder / "config.json").read_text())
    dflash = cfg.get("dflash_config") or {}

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    # registry + hf config: the architecture picks DFlashQwen3ForCausalLM; model_type gives Qwen3Config
    expect((cfg.get("architectures") or [None])[0] == "DFlashDraftModel", "architectures[0] == 'DFlashDraftModel'")
    expect(cfg.get("model_type") == "qwen3", "model_type == 'qwen3' (AutoConfig -> Qwen3Config)")
    # DFlashProposer._init_parallel_drafting_params: raises without dflash_config.mask_token_id
    mask = dflash.get("mask_token_id")
    expect(isinstance(mask, int) and 0 <= mask < target_vocab_size, "dflash_config.mask_token_id in the target vocab")
    # eagle3_utils.get_eagle3_aux_layers_from_config: eagle_aux_hidden_state_layer_ids wins over
    # dflash_config.target_layer_ids (taken + 1, hidden_states indexing)
    ids = dflash.get("target_layer_ids")
    expect(isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i < target_num_layers for i in ids),
           "dflash_config.target_layer_ids: target decoder layers")
    expect("eagle_aux_hidden_state_layer_ids" not in cfg, "no eagle_aux_hidden_state_layer_ids (it would override)")
    # DFlashQwen3Model: use_aux_hidden_state (default True) decides whether fc exists
    expect(dflash.get("use_aux_hidden_state", cfg.get("use_aux_hidden_state", True)) is True, "use_aux_hidden_state")
    # _resolve_layer_attention / _dflash_layer_causal: full, non-causal attention in every layer
    expect(not cfg.get("is_causal") and not dflash.get("causal"), "non-causal layers (is_causal, dflash_config.causal)")
    expect(all(t == "full_attention" for t in cfg.get("layer_types") or []), "layer_types all full_attention")
    expect(not dflash.get("use_swa"), "no dflash_config.use_swa")
    expect(not dflash.get("attention_sink_bias", cfg.get("add_swa_attention_sink_bias", False)), "no sink bias")
    expect(cfg.get("is_neox_style", True) is True, "is_neox_style (rotate-half RoPE)")
    # _get_dflash_fc_input_size: target_hidden_size (default hidden_size) x number of aux layers
    expect(cfg.get("target_hidden_size", cfg.get("hidden_size")) == cfg.get("hidden_size"), "target_hidden_size")
    # DFlashQwen3ForCausalLM.__init__: a draft_vocab_size other than the target's expects a d2t map
    expect(cfg.get("draft_vocab_size", cfg.get("vocab_size")) == target_vocab_size, "draft_vocab_size == target vocab")
    expect(cfg.get("logit_scale", 1.0) == 1.0, "logit_scale 1")
    expect(cfg.get("hidden_act", "silu") == "silu", "hidden_act 'silu' (Qwen3MLP; Qwen3Config's default)")
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "rms_norm_eps", "num_hidden_layers", "max_position_embeddings", "vocab_size", "attention_bias"):
        expect(key in cfg, f"{key} written (the layers are built from it)")
    # DFlashQwen3DecoderLayer: set_default_rope_theta(config, 1e6) when the file names none
    rope = cfg.get("rope_parameters") or {}
    expect("rope_theta" in cfg or "rope_theta" in rope, "rope_theta written (vLLM's default would be 1e6)")
    expect(isinstance(cfg.get("block_size"), int), "block_size (num_speculative_tokens = block_size - 1)")

    # load_weights: every name gets "model." and must be a DFlashQwen3Model parameter (after its
    # q/k/v -> qkv_proj and gate/up -> gate_up_proj stacking); embed_tokens / lm_head would replace
    # the target's; mask_hidden is asserted against; d2t / t2d belong to other vocabularies
    from safetensors import safe_open

    state = load_dflash_state_dict(folder)

    raw_names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            raw_names |= set(sf.keys())  # noqa: SIM118
    expect(raw_names == set(state), "unprefixed weight names")
    H, heads, kv = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    d, inter, n = cfg.get("head_dim"), cfg.get("intermediate_size"), cfg.get("num_hidden_layers", 0)
    shapes = {"fc.weight": (H, len(ids or []) * (H or 0)), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(n):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (heads * d, H), p + "self_attn.k_proj.weight": (kv * d, H),
                   p + "self_attn.v_proj.weight": (kv * d, H), p + "self_attn.o_proj.weight": (H, heads * d),
                   p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                   p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                   p + "mlp.down_proj.weight": (H, inter)}
        if cfg.get("attention_bias"):
            shapes |= {p + f"self_attn.{m}_proj.bias": (s,) for m, s in
                       (("q", heads * d), ("k", kv * d), ("v", kv * d), ("o", H))}
    got = {k: tuple(v.shape) for k, v in state.items()}
    expect(set(got) == set(shapes), f"weights are exactly the DFlash layer set (extra {sorted(set(got) - set(shapes))[:4]}, "
                                    f"missing {sorted(set(shapes) - set(got))[:4]})")
    expect(all(got[k] == s for k, s in shapes.items() if k in got), "weight shapes follow the config")
    expect(not any(k in raw_names for k in ("embed_tokens.weight", "lm_head.weight")), "no embed_tokens / lm_head")
    expect(not any("mask_hidden" in k or "d2t" in k or "t2d" in k for k in raw_names), "no mask_hidden / d2t / t2d")
    # _read_mask_embedding: a mask_embedding.pt would replace the target's embedding of the mask token
    expect(not (folder / "mask_embedding.pt").exists(), "no mask_embedding.pt")
    # vLLM builds its hf_config with transformers: the file must load as a Qwen3Config with our RoPE
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(folder)
    hf_rope = getattr(hf, "rope_parameters", None) or {"rope_theta": getattr(hf, "rope_theta", None)}
    expect(type(hf).__name__ == "Qwen3Config", "loads as Qwen3Config")
    expect(float(hf_rope.get("rope_theta")) == float(cfg.get("rope_theta", rope.get("rope_theta", 0))),
           "transformers reads the same rope_theta")
    return problems


def test_exports_have_what_vllms_dflash_loader_reads(tmp_path):
    run, target = _meta_run(tmp_path)
    tcfg = target.config
    merged = export_merged(run / "drafter", run / "meta_lora", tmp_path / "merged", dtype="bfloat16")
    llama3 = export_dflash(BlockDrafter(_native(_target_config(ROPE_CASES["llama3"]))), tmp_path / "llama3")
    released = _write(tmp_path / "released", _config(rope_theta=None, head_dim=None), _native(head_dim=128))
    reexported = export_dflash(BlockDrafter.from_pretrained(released), tmp_path / "reexported", max_shard_bytes=40_000)
    assert len(list(reexported.glob("model-*-of-*.safetensors"))) > 1
    for folder in (run / "drafter", merged, llama3, reexported):
        assert vllm_dflash_problems(folder, tcfg.vocab_size, tcfg.num_hidden_layers) == [], folder
    assert json.loads((llama3 / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"

    # and the check catches what vLLM would trip on
    broken = _write(tmp_path / "broken", _config(rope_theta=None, dflash_config={"target_layer_ids": [1, 2]},
                                                 eagle_aux_hidden_state_layer_ids=[2, 3]), _native(rope_theta=1e4))
    save_file({**load_file(str(broken / "model.safetensors")), "embed_tokens.weight": torch.zeros(96, 32)},
              str(broken / "model.safetensors"))
    problems = vllm_dflash_problems(broken, tcfg.vocab_size, tcfg.num_hidden_layers)
    for what in ("mask_token_id", "eagle_aux_hidden_state_layer_ids", "rope_theta written", "embed_tokens"):
        assert any(what in p for p in problems), (what, problems)
